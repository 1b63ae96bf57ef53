"""`dvc repro` on a copy of the repository: a second run runs nothing, changing one caption
parameter in conf/ re-runs only `compose` and `caption` (stages after caption are not asked for),
and outputs pushed to a DVC remote (a local folder standing in for S3/GCS/SSH) are pulled into a
fresh git clone byte for byte, after which `dvc repro caption` runs nothing. The three share one
build up to `caption`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.launch import offline_env

ROOT = Path(__file__).resolve().parents[1]
GIT = ("git", "-c", "user.name=artmaster-test", "-c", "user.email=test@artmaster.invalid")
pytestmark = pytest.mark.slow


def run(*command: str, cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, env=offline_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def set_value(path: Path, key: str, value: str) -> None:
    text, count = re.subn(rf"(?m)^{key}:.*$", f"{key}: {value}", path.read_text(encoding="utf-8"), count=1)
    assert count == 1, f"{path}: no top-level {key!r}"
    path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A fresh clone of the working tree (tracked and new files), with fewer, smaller demo scans."""
    repo = tmp_path_factory.mktemp("repo")
    listed = run("git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", cwd=ROOT)
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    demo = repo / "conf" / "data" / "demo.yaml"
    text = demo.read_text(encoding="utf-8")
    smaller = {"scans": "1", "count": "3", "in_subfolder": "1", "min_long_side": "1024", "max_long_side": "1200"}
    for key, value in smaller.items():
        text, count = re.subn(rf"(?m)^  {key}:\s*\S+", f"  {key}: {value}", text, count=1)
        assert count == 1, key
    demo.write_text(text, encoding="utf-8")
    # built from scratch (other scans): the repository's lock says nothing here, and a `dvc repro`
    # running in the repository itself (CI runs the tests beside it) may be rewriting it
    (repo / "dvc.lock").unlink(missing_ok=True)
    run("git", "init", "-q", cwd=repo)
    run("dvc", "repro", "caption", cwd=repo)
    return repo


def test_a_second_repro_runs_nothing(workspace):
    output = run("dvc", "repro", "caption", cwd=workspace)
    assert stages_run(output) == [], output


def test_changing_a_caption_parameter_reruns_only_compose_and_caption(workspace):
    before = (workspace / "data" / "caption" / "captions.jsonl").read_text(encoding="utf-8")
    set_value(workspace / "conf" / "caption" / "template.yaml", "trigger", "xiaohu-zeng style")
    output = run("dvc", "repro", "caption", cwd=workspace)
    assert stages_run(output) == ["compose", "caption"], output
    after = (workspace / "data" / "caption" / "captions.jsonl").read_text(encoding="utf-8")
    assert after != before and "xiaohu-zeng style" in after and "zxh style" not in after
    assert "trigger: xiaohu-zeng style" in (workspace / "params.yaml").read_text(encoding="utf-8")


def _outputs(repo: Path) -> dict[str, bytes]:
    data = repo / "data"
    return {p.relative_to(data).as_posix(): p.read_bytes() for p in sorted(data.rglob("*"))
            if p.is_file() and p.name != ".gitignore"}


def test_outputs_pushed_to_a_remote_are_pulled_into_a_fresh_clone_and_nothing_reruns(workspace, tmp_path):
    remote, clone = tmp_path / "remote", tmp_path / "clone"
    run("dvc", "remote", "add", "-f", "-d", "local", str(remote), cwd=workspace)
    run(*GIT, "add", "-A", cwd=workspace)
    run(*GIT, "commit", "-q", "--allow-empty", "-m", "pipeline up to caption", cwd=workspace)
    pushed = run("dvc", "push", cwd=workspace)
    assert remote.is_dir() and any(remote.rglob("*")), pushed

    run("git", "clone", "-q", str(workspace), str(clone), cwd=tmp_path)
    assert not (clone / "data" / "caption").exists()  # outputs travel through the remote, not git
    run("dvc", "pull", "--with-deps", "caption", cwd=clone)  # the outputs up to caption
    assert _outputs(clone) == _outputs(workspace)
    output = run("dvc", "repro", "caption", cwd=clone)
    assert stages_run(output) == [], output
    assert "up to date" in run("dvc", "status", "--with-deps", "caption", cwd=clone).lower()
