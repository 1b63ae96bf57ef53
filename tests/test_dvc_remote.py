"""Scale-out with a DVC remote (a local folder standing in for S3/GCS/SSH): build up to `caption`
in a copy of the repository, push the cache, clone the git repository fresh, pull, and `dvc repro
caption` runs nothing: the clone has every output, byte for byte."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from test_dvc_repro import ROOT, run, stages_run

pytestmark = pytest.mark.slow

GIT = ("git", "-c", "user.name=artmaster-test", "-c", "user.email=test@artmaster.invalid")


def _small_demo(repo: Path) -> None:
    """Three small demo scans, none held out (small scans give few crops)."""
    demo = repo / "conf" / "data" / "demo.yaml"
    text = demo.read_text(encoding="utf-8")
    for key, value in {"count": "3", "in_subfolder": "1", "min_long_side": "1024", "max_long_side": "1200"}.items():
        text, count = re.subn(rf"(?m)^  {key}:\s*\S+", f"  {key}: {value}", text, count=1)
        assert count == 1, key
    text = re.sub(r"(?m)^(holdout:\n  scans:)\s*\d+", r"\1 0", text)
    demo.write_text(text, encoding="utf-8")


def _outputs(repo: Path) -> dict[str, bytes]:
    data = repo / "data"
    return {p.relative_to(data).as_posix(): p.read_bytes() for p in sorted(data.rglob("*"))
            if p.is_file() and p.name != ".gitignore"}


def test_outputs_pushed_to_a_remote_are_pulled_into_a_fresh_clone_and_nothing_reruns(tmp_path):
    repo, remote, clone = tmp_path / "repo", tmp_path / "remote", tmp_path / "clone"
    listed = run("git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", cwd=ROOT)
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)
    (repo / "dvc.lock").unlink(missing_ok=True)
    _small_demo(repo)
    run("git", "init", "-q", cwd=repo)
    run("dvc", "repro", "caption", cwd=repo)

    run("dvc", "remote", "add", "-d", "local", str(remote), cwd=repo)
    run(*GIT, "add", "-A", cwd=repo)
    run(*GIT, "commit", "-q", "-m", "pipeline up to caption", cwd=repo)
    pushed = run("dvc", "push", cwd=repo)
    assert remote.is_dir() and any(remote.rglob("*")), pushed

    run("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    assert not (clone / "data" / "caption").exists()  # outputs travel through the remote, not git
    run("dvc", "pull", "--with-deps", "caption", cwd=clone)  # the outputs up to caption
    assert _outputs(clone) == _outputs(repo)
    output = run("dvc", "repro", "caption", cwd=clone)
    assert stages_run(output) == [], output
    assert "up to date" in run("dvc", "status", "--with-deps", "caption", cwd=clone).lower()
