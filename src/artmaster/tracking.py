"""MLflow record of every stage run: one experiment, a run per stage, tagged for lineage.

The store is SQLite at the project root (``mlflow.db``), anchored at $DVC_ROOT when DVC sets it,
so ``mlflow ui`` run from the repo root shows every stage, sweep and experiment.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from artmaster.config import ConfigError, params_hash, project_root, store_root

# The pipeline runs offline: MLflow sends no usage telemetry unless MLFLOW_DISABLE_TELEMETRY=false.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# MLflow's HTTP request bounds as the user's environment set them (they win over tracking.*)
_USER_HTTP_BOUNDS = {name: os.environ.get(name)
                     for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")}


def tracking_uri(cfg: DictConfig) -> str:
    if cfg.tracking.uri:
        return str(cfg.tracking.uri)
    return f"sqlite:///{store_root() / 'mlflow.db'}"


def flatten(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": value} with MLflow's 6000-character value limit respected."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def experiment_id_for(mlflow, cfg: DictConfig) -> str:
    """The experiment's id, created with its artifacts in `tracking.artifact_dir` of this workspace.
    An experiment of a SQLite store whose artifacts lie elsewhere on disk (the workspace was moved
    or copied with its mlflow.db) is pointed back at this workspace's folder, said on stderr, so
    new runs never write into the other place; older runs keep theirs."""
    name = cfg.tracking.experiment_name
    artifacts = (store_root() / cfg.tracking.artifact_dir).resolve().as_uri()
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        return mlflow.create_experiment(name, artifact_location=artifacts)
    uri = tracking_uri(cfg)
    stored = str(found.artifact_location)
    if stored != artifacts and stored.startswith("file:") and uri.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(_sqlite_file(uri)) as connection:  # MLflow has no call that moves it
            connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                                (artifacts, found.experiment_id))
        print(f"tracking: experiment {name!r} kept its artifacts in {stored} (workspace moved or copied?); "
              f"its new runs keep them in {artifacts}", file=sys.stderr)
    return found.experiment_id


def _sqlite_file(uri: str) -> Path:
    from urllib.parse import unquote

    return Path(unquote(uri[len("sqlite:///"):].split("?")[0]))


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


class TrackingUnavailable(ConfigError):
    """The MLflow store cannot be used (server unreachable, SQLite file locked or unwritable):
    raised when a stage opens its run, before it does any work."""


def _unavailable(uri: str, reason: str) -> TrackingUnavailable:
    return TrackingUnavailable(
        f"MLflow tracking store {uri} cannot be used: {reason}. Nothing was run. Start or unlock the "
        "store, point tracking.uri= at one that works (e.g. tracking.uri=sqlite:///$PWD/mlflow.db), "
        "or run without an MLflow record: tracking.enabled=false"
    )


def bound_http_requests(timeout: float, retries: int) -> None:
    """Every MLflow HTTP request waits at most `timeout` s (rounded up to whole seconds, as MLflow
    reads it) and is retried `retries` times: MLflow's own defaults, 120 s and 7 retries with
    exponential backoff, let a server that accepts connections but never answers hang a stage for
    many minutes. MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES set in the environment win."""
    values = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout))),
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(retries))}
    for name, value in values.items():
        if _USER_HTTP_BOUNDS[name] is None:
            os.environ[name] = value


def _check_server(uri: str, timeout: float) -> None:
    """An http(s) server must accept a connection and answer a request (any status) within `timeout` s."""
    import http.client
    import ssl
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    if parsed.scheme == "https":  # only whether it answers is checked here; MLflow verifies certificates
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl._create_unverified_context())
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        try:
            connection.connect()
        except OSError as error:
            raise _unavailable(uri, f"no server answers at {host}:{port} within {timeout:g} s ({error})") from None
        try:
            connection.request("GET", parsed.path.rstrip("/") + "/health")
            connection.getresponse().read()
        except (OSError, http.client.HTTPException) as error:
            raise _unavailable(uri, f"the server at {host}:{port} accepts connections but sends no answer within "
                                    f"{timeout:g} s ({type(error).__name__}: {error})") from None
    finally:
        connection.close()


def check_store(uri: str, timeout: float) -> None:
    """Fail fast (TrackingUnavailable) when the store cannot take a run: an http(s) server must
    accept a connection and answer within `timeout` s; a SQLite file must take a write lock within
    `timeout` s and a write (rolled back: a read-only file fails here, not in MLflow's long log), or,
    when it does not exist yet, its folder must be writable. Other schemes are left to MLflow."""
    import sqlite3
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif parsed.scheme == "sqlite" and uri.startswith("sqlite:///"):
        path = _sqlite_file(uri)
        if not path.exists():
            folder = path.parent if str(path.parent) else Path(".")
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                raise _unavailable(uri, f"folder {folder} does not exist or is not writable")
            return
        try:
            connection = sqlite3.connect(str(path), timeout=timeout)
            try:
                connection.execute("BEGIN IMMEDIATE")  # a write lock, as MLflow needs
                connection.execute("CREATE TABLE artmaster_write_probe (x)")  # and a write; both rolled back
                connection.rollback()
            finally:
                connection.close()
        except sqlite3.Error as error:
            if "locked" in str(error):
                hint = f"locked by another process for over {timeout:g} s"
            elif "readonly" in str(error) or "unable to open" in str(error):
                hint = "read-only (make the file and its folder writable)"
            else:
                hint = "not usable"
            raise _unavailable(uri, f"SQLite file {path} is {hint} ({error})") from None


def connect(cfg: DictConfig) -> str:
    """Point MLflow at the configured store once it is checked (`check_store`), with every HTTP
    request bounded by `tracking.timeout_s` and `tracking.retries`; returns its URI."""
    import mlflow

    uri = tracking_uri(cfg)
    timeout = float(cfg.tracking.get("timeout_s") or 10)
    bound_http_requests(timeout, int(cfg.tracking.get("retries", 2)))
    check_store(uri, timeout)
    mlflow.set_tracking_uri(uri)
    return uri


_LOGGERS = ("log_metric", "log_metrics", "log_param", "log_params", "log_artifact", "log_artifacts",
            "log_image", "log_table", "log_text", "log_dict", "log_figure", "set_tag", "set_tags")


@contextmanager
def _untracked(mlflow, stage: str) -> Iterator[None]:
    """`tracking.enabled=false`: the stage's mlflow.log_* / set_tag(s) calls do nothing."""
    print(f"{stage}: tracking.enabled=false: this run is not recorded in MLflow", file=sys.stderr)
    saved = {name: getattr(mlflow, name) for name in _LOGGERS if hasattr(mlflow, name)}
    for name in saved:
        setattr(mlflow, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(mlflow, name, function)


@contextmanager
def stage_run(cfg: DictConfig, stage: str, sections: tuple[str, ...]) -> Iterator[object]:
    """Open an MLflow run for one stage, logging the config sections it reads as params.

    Nested under the active run when there is one (a Hydra sweep's parent run). The store is
    checked first: TrackingUnavailable (naming the URI and the fix) before any work when it cannot
    be used. With `tracking.enabled=false` nothing is recorded and the run is None.
    """
    import mlflow

    if not cfg.tracking.get("enabled", True):
        with _untracked(mlflow, stage):
            yield None
        return
    uri = tracking_uri(cfg)
    try:
        connect(cfg)
        experiment_id = experiment_id_for(mlflow, cfg)
        active = mlflow.start_run(run_name=stage, experiment_id=experiment_id, nested=mlflow.active_run() is not None)
    except TrackingUnavailable:
        raise
    except Exception as error:  # MLflow's own errors (server errors, a broken store) at the start
        raise _unavailable(uri, f"{type(error).__name__}: {' '.join(str(error).split())[:300]}") from error
    read = {name: _plain(cfg[name]) for name in sections if name in cfg}
    with active as run:
        mlflow.set_tags(
            {
                "artmaster.stage": stage,
                "dvc.stage": os.environ.get("DVC_STAGE", stage),
                "params_hash": params_hash(read),
                "git_commit": git_commit(),
                "hydra_overrides": " ".join(sys.argv[1:])[:5000],
                "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
            }
        )
        params = flatten(read)
        items = list(params.items())
        for start in range(0, len(items), 100):
            mlflow.log_params(dict(items[start : start + 100]))
        yield run


def log_picture(path: Path, artifact_dir: str = "pictures") -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_dir)
