"""MLflow record of every stage run: one experiment, a run per stage, tagged for lineage.

The store is SQLite at the project root (``mlflow.db``), anchored at $DVC_ROOT when DVC sets it,
so ``mlflow ui`` run from the repo root shows every stage, sweep and experiment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from artmaster.config import ConfigError, params_hash, project_root, store_root

# The pipeline runs offline: MLflow sends no usage telemetry unless MLFLOW_DISABLE_TELEMETRY=false.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


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
    name = cfg.tracking.experiment_name
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifacts = (store_root() / cfg.tracking.artifact_dir).resolve()
    return mlflow.create_experiment(name, artifact_location=artifacts.as_uri())


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


def check_store(uri: str, timeout: float) -> None:
    """Fail fast (TrackingUnavailable) when the store cannot take a run: an http(s) server must
    accept a connection within `timeout` s; a SQLite file must take a write lock within `timeout` s
    (or, when it does not exist yet, its folder must be writable). Other schemes are left to MLflow."""
    import socket
    import sqlite3
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as error:
            raise _unavailable(uri, f"no server answers at {host}:{port} within {timeout:g} s ({error})") from None
    elif parsed.scheme == "sqlite" and uri.startswith("sqlite:///"):
        path = Path(unquote(uri[len("sqlite:///"):].split("?")[0]))
        if not path.exists():
            folder = path.parent if str(path.parent) else Path(".")
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                raise _unavailable(uri, f"folder {folder} does not exist or is not writable")
            return
        try:
            connection = sqlite3.connect(str(path), timeout=timeout)
            try:
                connection.execute("BEGIN IMMEDIATE")  # a write lock, as MLflow needs; released at once
                connection.rollback()
            finally:
                connection.close()
        except sqlite3.Error as error:
            hint = f"locked by another process for over {timeout:g} s" if "locked" in str(error) else "not usable"
            raise _unavailable(uri, f"SQLite file {path} is {hint} ({error})") from None


_LOGGERS = ("log_metric", "log_metrics", "log_param", "log_params", "log_artifact", "log_artifacts",
            "log_image", "log_table", "log_text", "log_dict", "log_figure", "set_tag", "set_tags")


@contextmanager
def _untracked(stage: str) -> Iterator[None]:
    """`tracking.enabled=false`: inside the `with`, `import mlflow` gives a stand-in whose log_* and
    set_tag(s) do nothing, so the stages' calls record nothing and a machine without mlflow
    installed (a GPU box) runs every stage; the real module, if it was imported, comes back after."""
    print(f"{stage}: tracking.enabled=false: this run is not recorded in MLflow", file=sys.stderr)
    stand_in = types.ModuleType("mlflow", "tracking.enabled=false: nothing is recorded")
    for name in _LOGGERS:
        setattr(stand_in, name, lambda *args, **kwargs: None)
    saved = sys.modules.get("mlflow")
    sys.modules["mlflow"] = stand_in
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop("mlflow", None)
        else:
            sys.modules["mlflow"] = saved


@contextmanager
def stage_run(cfg: DictConfig, stage: str, sections: tuple[str, ...]) -> Iterator[object]:
    """Open an MLflow run for one stage, logging the config sections it reads as params.

    Nested under the active run when there is one (a Hydra sweep's parent run). The store is
    checked first: TrackingUnavailable (naming the URI and the fix) before any work when it cannot
    be used. With `tracking.enabled=false` nothing is recorded and the run is None.
    """
    if not cfg.tracking.get("enabled", True):
        with _untracked(stage):
            yield None
        return
    import mlflow

    uri = tracking_uri(cfg)
    try:
        check_store(uri, float(cfg.tracking.get("timeout_s") or 10))
        mlflow.set_tracking_uri(uri)
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


@contextmanager
def child_run(cfg: DictConfig, stage: str, label: str) -> Iterator[None]:
    """A run "<stage> <label>" nested under the stage's open run (one per training replicate), so
    each keeps its own loss curve; nothing when tracking is off."""
    if not cfg.tracking.get("enabled", True):
        yield
        return
    import mlflow

    with mlflow.start_run(run_name=f"{stage} {label}", nested=True):
        mlflow.set_tag("artmaster.stage", stage)
        yield
