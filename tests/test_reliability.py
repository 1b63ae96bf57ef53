"""Issue 7, faults and bad input: atomic stage outputs (a SIGKILLed stage leaves the previous
output whole), the MLflow store failing fast (unreachable server, locked SQLite file) or switched
off, wrong-typed config values as one clear line, and a 10:1 handscroll cut into several crops.

Training faults (SIGKILL at three points, NaN loss, a full disk) are in test_train_faults.py."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.bad_scans import MIN_SIDE, painting, shared_tracking_overrides
from helpers.launch import offline_env
from omegaconf import OmegaConf

from artmaster import crop, ingest
from artmaster.cli import STAGES
from artmaster.config import ConfigError, compose, project_root, validate
from artmaster.files import remove_abandoned, staged_dir
from artmaster.painter import STYLES, scan
from artmaster.tracking import TrackingUnavailable

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "artmaster"


def _tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under folder (none: {})."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """Three small distinct paintings (ingest with data.ingest.min_side=MIN_SIDE)."""
    folder = tmp_path_factory.mktemp("scans")
    for index in range(3):
        painting(50 + index).save(folder / f"scan_{index}.png")
    return folder


@pytest.fixture
def cfg_for(tmp_path, tmp_path_factory, scans):
    def _make(*overrides: str):
        return compose([
            f"paths.data_dir={tmp_path / 'data'}", *shared_tracking_overrides(tmp_path_factory),
            f"data.scans_dir={scans}", f"data.ingest.min_side={MIN_SIDE}", *overrides,
        ])

    return _make


# --- atomic outputs ---------------------------------------------------------------------------------


def _calls(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            function = node.func
            names.add(function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", ""))
    return names


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_writes_its_outputs_through_a_temporary_name_and_a_rename(stage):
    """Whole-folder stages write into `staged_dir`; stages that resume (train, augment, retrain)
    write each file with `write_atomic` / `save_image_atomic` / a staged sub-folder (train through
    the training package it runs); compose writes params.yaml with `write_atomic`."""
    module = PACKAGE / f"{STAGES[stage].split('.')[-1]}.py"
    files = [module] + (sorted((PACKAGE / "training").glob("*.py")) if "artmaster.training" in module.read_text() else [])
    calls = set().union(*map(_calls, files))
    assert calls & {"staged_dir", "write_atomic", "save_image_atomic"}, f"{stage} writes no output atomically"


def test_write_atomic_and_staged_dir_leave_the_old_output_when_the_write_fails(tmp_path):
    from artmaster.files import write_atomic

    target = tmp_path / "params.yaml"
    write_atomic(target, "old: 1\n")
    with pytest.raises(TypeError):
        write_atomic(target, None)  # the write itself fails
    assert target.read_text() == "old: 1\n"
    final = tmp_path / "ingest"
    with staged_dir(final) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), staged_dir(final) as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert _tree(final) == {"a.txt": hashlib.sha256(b"first").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ingest", "params.yaml"]  # no litter either


def test_folders_abandoned_by_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    final = tmp_path / "crop"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    abandoned = [tmp_path / f".crop.tmp-{dead_pid}-x1", tmp_path / f".crop.old-{dead_pid}"]
    live = tmp_path / f".crop.tmp-{os.getpid()}-x2"
    other = tmp_path / f".crop2.tmp-{dead_pid}-x3"
    for folder in (*abandoned, live, other):
        folder.mkdir()
    assert sorted(remove_abandoned(final)) == sorted(abandoned)
    assert live.is_dir() and other.is_dir()


KILL_INGEST = r"""
import os, signal, sys
from artmaster import ingest
from artmaster.config import compose
real, done = ingest.ingest_file, []
def dying(*args, **kwargs):
    result = real(*args, **kwargs)
    done.append(1)
    if len(done) == 2:  # two scans written into the staging folder: killed with no cleanup at all
        os.kill(os.getpid(), signal.SIGKILL)
    return result
ingest.ingest_file = dying
ingest.run(compose(sys.argv[1:]))
"""


def test_a_stage_killed_with_sigkill_leaves_the_previous_output_whole(cfg_for, tmp_path):
    cfg = cfg_for()
    ingest.run(cfg)
    out = Path(cfg.paths.data_dir) / "ingest"
    before = _tree(out)
    overrides = [f"paths.data_dir={cfg.paths.data_dir}", f"tracking.uri={cfg.tracking.uri}",
                 f"tracking.artifact_dir={cfg.tracking.artifact_dir}", f"data.scans_dir={cfg.data.scans_dir}",
                 f"data.ingest.min_side={MIN_SIDE}"]
    killed = subprocess.run([sys.executable, "-c", KILL_INGEST, *overrides], cwd=project_root(), env=offline_env(),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _tree(out) == before  # what DVC would see (and cache) is the previous, complete output
    litter = list(out.parent.glob(".ingest.tmp-*"))
    assert len(litter) == 1 and len(list((litter[0] / "images").iterdir())) == 2  # the half-written one

    ingest.run(cfg)  # the next run clears what the killed one abandoned
    assert _tree(out) == before
    assert not list(out.parent.glob(".ingest.*"))


# --- the MLflow store --------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_tracking_server_stops_the_stage_before_any_work(cfg_for, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = cfg_for(f"tracking.uri={uri}", "tracking.timeout_s=1")
    started = time.perf_counter()
    with pytest.raises(TrackingUnavailable) as raised:
        ingest.run(cfg)
    assert time.perf_counter() - started < 10
    message = str(raised.value)
    assert uri in message and "no server answers" in message and "Nothing was run" in message
    assert "tracking.uri=" in message and "tracking.enabled=false" in message and "\n" not in message
    assert not (Path(cfg.paths.data_dir) / "ingest").exists() and not list(Path(cfg.paths.data_dir).glob(".ingest*"))


def test_a_locked_sqlite_store_stops_the_stage_naming_the_file(cfg_for, tmp_path):
    import mlflow

    database = tmp_path / "locked.db"
    mlflow.MlflowClient(f"sqlite:///{database}").search_experiments()  # an MLflow store
    cfg = cfg_for(f"tracking.uri=sqlite:///{database}", "tracking.timeout_s=0.5")
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process is writing and holds the lock
    try:
        with pytest.raises(TrackingUnavailable, match=r"SQLite file .*locked\.db is locked by another process"):
            ingest.run(cfg)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not (Path(cfg.paths.data_dir) / "ingest").exists()
    assert ingest.run(cfg)["accepted"] == 3  # the lock released, the same stage runs


def test_tracking_can_be_switched_off_and_the_outputs_are_still_written(cfg_for, tmp_path):
    import mlflow

    real = mlflow.log_metrics
    cfg = cfg_for(f"tracking.uri=sqlite:///{tmp_path / 'never.db'}", "tracking.enabled=false")
    assert ingest.run(cfg)["accepted"] == 3
    assert (Path(cfg.paths.data_dir) / "ingest" / "manifest.jsonl").is_file()
    assert not (tmp_path / "never.db").exists() and mlflow.active_run() is None
    assert mlflow.log_metrics is real  # the no-op loggers are put back


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "artmaster.cli", *argv], cwd=project_root(), env=offline_env(),
                          capture_output=True, text=True, timeout=300)


def test_the_command_prints_one_line_and_exits_2_for_an_unusable_store_or_a_wrong_type(tmp_path, scans):
    uri = f"http://127.0.0.1:{_closed_port()}"
    done = _cli("ingest", f"paths.data_dir={tmp_path / 'data'}", f"data.scans_dir={scans}",
                f"tracking.uri={uri}", "tracking.timeout_s=1")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith(f"artmaster: MLflow tracking store {uri} cannot be used")
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr + done.stdout

    done = _cli("crop", f"paths.data_dir={tmp_path / 'data'}", "crop.max_iou=abc")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "artmaster: config: crop.max_iou='abc' is a str, expected a number; fix the override or the conf/ file "
        "that sets it"
    )
    assert not (tmp_path / "data").exists()


# --- config values of the wrong type ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("crop.max_iou=abc", r"crop\.max_iou='abc' is a str, expected a number"),
        ("train.optim.lr=fast", r"train\.optim\.lr='fast' is a str, expected a number"),
        ("train.epochs=2.5", r"train\.epochs=2\.5 is a float, expected an integer"),
        ("tracking.enabled=maybe", r"tracking\.enabled='maybe' is a str, expected true or false"),
        ("crop.contact_sheet.tile=big", r"crop\.contact_sheet\.tile='big' is a str, expected an integer like its "
                                        r"value in conf/ \(320\)"),
        ("train.samples.guidance=[1]", r"train\.samples\.guidance=\[1\] is a ListConfig, expected a number"),
    ],
)
def test_a_wrong_typed_override_is_one_clear_error_naming_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        compose([override])


def test_right_types_nulls_and_group_choices_pass():
    cfg = compose(["crop.max_iou=1", "train.optim.lr=1e-4", "train.checkpoint.every=null", "model=flux_dev",
                   "model.dtype=float32", "+extra.key=anything"])
    assert cfg.crop.max_iou == 1 and cfg.train.checkpoint.every is None


def test_a_wrong_type_in_a_conf_file_is_caught_for_the_important_keys():
    cfg = compose([])
    OmegaConf.update(cfg, "train.optim.lr", "fast")  # as if conf/train/default.yaml said `lr: fast`
    with pytest.raises(ConfigError, match=r"train\.optim\.lr='fast'"):
        validate(cfg)


# --- a handscroll --------------------------------------------------------------------------------------


def test_a_ten_to_one_handscroll_is_accepted_and_cut_into_several_crops(tmp_path, tmp_path_factory):
    folder = tmp_path / "handscroll"
    folder.mkdir()
    scan(STYLES["zeng_xiaohu"], 7000, 700, seed=5).save(folder / "shoujuan.png")
    cfg = compose([f"paths.data_dir={tmp_path / 'data'}", *shared_tracking_overrides(tmp_path_factory),
                   f"data.scans_dir={folder}", "data.holdout.scans=0"])
    assert ingest.run(cfg)["accepted"] == 1
    summary = crop.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "data" / "crop" / "crops.jsonl").read_text().splitlines()]
    assert summary["crops"] == len(rows) >= 6
    lefts = sorted(row["box"][0] for row in rows)
    assert lefts[0] < 7000 / 4 and lefts[-1] > 7000 / 2  # spread along the scroll, not bunched
    top, bottom = summary["paintings"][rows[0]["scan_id"]][1::2]
    assert top < 0.15 * 700 and bottom > 0.85 * 700  # the painting's own horizon is not taken for the mount


# --- issue 15: a silent tracking server, a read-only or moved store, ranges, missing weights -------


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections; `answers_health`: GET /health gets
    `200 OK` (a live MLflow server would), every other request is read and never answered."""

    def __init__(self, answers_health: bool):
        import threading

        self.answers_health = answers_health
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(connection)  # kept open, so the client waits for an answer
            request = connection.recv(65536)
            if self.answers_health and request.startswith(b"GET /health "):
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK")

    def close(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()


@pytest.mark.parametrize("answers_health", [False, True], ids=["answers_nothing", "answers_only_health"])
def test_a_server_that_accepts_connections_but_never_answers_stops_the_stage_in_one_line(tmp_path, scans,
                                                                                          answers_health):
    """Before: the check only opened a connection, then MLflow waited 120 s per request with 7
    retries. Now the check asks for an answer, and tracking.timeout_s / tracking.retries bound
    every request MLflow makes once the run is open."""
    server = SilentServer(answers_health)
    uri = f"http://127.0.0.1:{server.port}"
    env = {key: value for key, value in offline_env().items() if not key.startswith("MLFLOW_HTTP_REQUEST")}
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "artmaster.cli", "ingest", f"paths.data_dir={tmp_path / 'data'}",
             f"data.scans_dir={scans}", f"data.ingest.min_side={MIN_SIDE}", f"tracking.uri={uri}",
             "tracking.timeout_s=1"],
            cwd=project_root(), env=env, capture_output=True, text=True, timeout=90)
    finally:
        server.close()
    assert time.perf_counter() - started < 60
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"artmaster: MLflow tracking store {uri} cannot be used: ")
    if answers_health:  # the check passes; MLflow's own request times out after 1 s (tracking.retries: 2)
        assert "timeout" in lines[0].lower() and "Nothing was run" in lines[0]
    else:
        assert f"the server at 127.0.0.1:{server.port} accepts connections but sends no answer within 1 s" in lines[0]
    assert not (tmp_path / "data" / "ingest").exists()


def test_a_read_only_sqlite_store_is_one_line_before_any_work(tmp_path, scans):
    import mlflow

    store = tmp_path / "store"
    store.mkdir()
    database = store / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{database}").search_experiments()  # an MLflow store, then read-only
    database.chmod(0o444)
    command = [sys.executable, "-m", "artmaster.cli", "ingest", f"paths.data_dir={tmp_path / 'data'}",
               f"data.scans_dir={scans}", f"data.ingest.min_side={MIN_SIDE}", f"tracking.uri=sqlite:///{database}",
               f"tracking.artifact_dir={tmp_path / 'mlartifacts'}"]
    if os.geteuid() == 0:  # root writes read-only files: run without the capability that allows it
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: a read-only file cannot be made")
        command = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *command]
    done = subprocess.run(command, cwd=project_root(), env=offline_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == (
        f"artmaster: MLflow tracking store sqlite:///{database} cannot be used: SQLite file {database} is read-only "
        "(make the file and its folder writable) (attempt to write a readonly database). Nothing was run. Start or "
        "unlock the store, point tracking.uri= at one that works (e.g. tracking.uri=sqlite:///$PWD/mlflow.db), or "
        "run without an MLflow record: tracking.enabled=false"
    )
    assert not (tmp_path / "data" / "ingest").exists()


def test_a_moved_or_copied_workspace_keeps_its_mlflow_artifacts_inside_itself(tmp_path, scans, monkeypatch, capsys):
    """The store records the experiment's artifact folder as an absolute path: a copy of the
    workspace used to log its new runs' artifacts into the original's folder."""
    import mlflow

    def ingest_in(workspace: Path) -> Path:
        monkeypatch.setenv("DVC_ROOT", str(workspace))  # the store and artifacts are anchored here
        cfg = compose([f"paths.data_dir={workspace / 'data'}", f"data.scans_dir={scans}",
                       f"data.ingest.min_side={MIN_SIDE}"])  # tracking.uri and artifact_dir: the defaults
        ingest.run(cfg)
        client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
        run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id],
                                 order_by=["attributes.start_time DESC"])[0]
        return Path(run.info.artifact_uri.removeprefix("file://"))

    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    assert ingest_in(original).is_relative_to(original / "mlartifacts")
    shutil.copytree(original, copy)
    before = _tree(original)
    capsys.readouterr()

    artifacts = ingest_in(copy)
    assert artifacts.is_relative_to(copy / "mlartifacts") and (artifacts / "manifest.jsonl").is_file()
    assert _tree(original) == before  # nothing written into the workspace it was copied from
    assert f"kept its artifacts in {(original / 'mlartifacts').as_uri()} (workspace moved or copied?)" \
        in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.optim.lr=0", r"train\.optim\.lr=0 is out of range: it must be greater than 0"),
        ("train.batch_size=0", r"train\.batch_size=0 is out of range: it must be at least 1"),
        ("train.epochs=0", r"train\.epochs=0 is out of range: it must be at least 1"),
        ("train.adalora.init_r=0", r"train\.adalora\.init_r=0 is out of range: it must be at least 1"),
        ("train.adalora.target_r=13", r"train\.adalora\.target_r=13 is out of range: it must be between 1 and "
                                      r"train\.adalora\.init_r"),
        ("train.samples.width=500", r"train\.samples\.width=500 is out of range: it must be a multiple of 16"),
        ("crop.buckets.portrait.height=760", r"crop\.buckets\.portrait\.height=760 is out of range: it must be a "
                                             r"multiple of 16"),
        ("train.image_scale=0.3", r"train\.image_scale=0\.3 is out of range: it must be greater than 0 and keep both "
                                  r"sides of every enabled crop bucket multiples of 16"),
    ],
)
def test_an_out_of_range_value_is_one_clear_error_naming_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected) as raised:
        compose([override])
    assert "\n" not in str(raised.value)


def test_the_command_says_in_one_line_what_is_out_of_range_or_missing_before_any_work(tmp_path):
    from test_train import SQUARE, write_fixture_data

    done = _cli("train", f"paths.data_dir={tmp_path / 'data'}", "train.batch_size=0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("artmaster: config: train.batch_size=0 is out of range: it must be at least 1; "
                                   "fix the override or the conf/ file that sets it")

    write_fixture_data(tmp_path / "data", [SQUARE] * 2)  # crops and captions: train gets as far as the model
    done = subprocess.run(
        [sys.executable, "-m", "artmaster.cli", "train", "experiment=artmaster_flux",
         f"paths.data_dir={tmp_path / 'data'}", "tracking.enabled=false",
         "model.repo_id=artmaster-tests/not-downloaded"],
        cwd=project_root(), env={**offline_env(), "HF_HUB_CACHE": str(tmp_path / "empty_cache")}, capture_output=True,
        text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "artmaster: artmaster-tests/not-downloaded at revision main is not in the Hugging Face cache: download it "
        "once (`hf download artmaster-tests/not-downloaded --revision main`) or set model.path to a local pipeline "
        "folder"
    )
