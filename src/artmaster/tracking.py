"""MLflow record of every stage run: one experiment, a run per stage, tagged for lineage.

The store is SQLite at the project root (``mlflow.db``), anchored at $DVC_ROOT when DVC sets it,
so ``mlflow ui`` run from the repo root shows every stage, sweep and experiment.

`stage_run` opens a stage's run and hands back its `Tracker`; the stages log through it (and code
running inside a stage through `active()`), never through mlflow itself. With
`tracking.enabled=false` the tracker is its no-op twin and mlflow is never imported.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from artmaster.config import ConfigError, Settings, params_hash, project_root, store_root

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


# MLflow 3's UI opens a "custom model development" experiment on its runs table (training runs,
# charts, artifacts); an experiment without this tag opens in the GenAI view (traces, evaluations).
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "ArtMaster: one run per pipeline stage (`dvc repro`, or `artmaster <stage>` by hand), named by what "
        "distinguishes it (`train r=8 lr=1e-2`, `retrain round 0`); sweeps (`artmaster train -m ...`) are a "
        "parent run `sweep train (N points)` with one child per point. Each run's description says what the "
        "stage did and lists its summary numbers; its headline numbers are the `result/*` metrics, the same "
        "ones `dvc metrics show` prints."
    ),
}


def experiment_id_for(mlflow, cfg: DictConfig) -> str:
    """The experiment's id, created with its artifacts in `tracking.artifact_dir` of this workspace.
    An experiment of a SQLite store whose artifacts lie elsewhere on disk (the workspace was moved
    or copied with its mlflow.db) is pointed back at this workspace's folder, said on stderr, so
    new runs never write into the other place; older runs keep theirs."""
    name = cfg.tracking.experiment_name
    artifacts = (store_root() / cfg.tracking.artifact_dir).resolve().as_uri()
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        return mlflow.create_experiment(name, artifact_location=artifacts, tags=EXPERIMENT_TAGS)
    missing = {k: v for k, v in EXPERIMENT_TAGS.items() if found.tags.get(k) != v}
    for key, value in missing.items():  # a store made before these tags existed
        mlflow.MlflowClient().set_experiment_tag(found.experiment_id, key, value)
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


# --- what a run is called and says --------------------------------------------------------------


# set by the sweep callback (artmaster.sweep) for its jobs: the keys the sweep varies
SWEEP_KEYS_ENV = "ARTMASTER_SWEEP_KEYS"


def sweep_job_overrides() -> list[str]:
    """This Hydra multirun job's values of the keys its sweep varies (`train.optim.lr=1e-4` ...;
    every override of the job when the swept keys are unknown), [] outside a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return []
    swept = [key for key in os.environ.get(SWEEP_KEYS_ENV, "").split(",") if key]
    overrides = [str(o) for o in HydraConfig.get().overrides.task if not o.startswith(("hydra.", "hydra/"))]
    chosen = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept]
    return chosen or overrides


def short_overrides(overrides: list[str]) -> str:
    """`train.adalora.target_r=4 train.optim.lr=1e-4` -> `target_r=4 lr=1e-4` (full keys where the
    last parts would clash)."""
    pairs = [o.split("=", 1) if "=" in o else (o, "") for o in overrides]
    last = [key.rsplit(".", 1)[-1].rsplit("/", 1)[-1] for key, _ in pairs]
    return " ".join(f"{short if last.count(short) == 1 else key}={value}"
                    for (key, value), short in zip(pairs, last))


def _command(stage: str) -> str:
    """The command line that reproduces this run: `artmaster <stage> <Hydra overrides>`."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return " ".join(["artmaster", stage.replace("_", "-"), *overrides])[:500]


def run_name(stage: str, label: str = "") -> str:
    """`<stage> <what distinguishes this run>`: a sweep job's own overrides, else `label`."""
    overrides = sweep_job_overrides()
    return f"{stage} {short_overrides(overrides) if overrides else label}".strip()


def _stage_summary(stage: str) -> str:
    """The first sentence of the stage module's docstring ("" for names that are not a stage)."""
    import importlib
    import importlib.util

    name = f"artmaster.{stage}"
    if importlib.util.find_spec(name) is None:
        return ""
    doc = (importlib.import_module(name).__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def describe(text: str) -> None:
    """The active run's description (MLflow shows it, as Markdown, above the run's details)."""
    import mlflow

    mlflow.set_tag("mlflow.note.content", text[:5000])


def _value_text(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(values: Mapping, header: tuple[str, str] = ("", "value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {_value_text(value)} |" for key, value in values.items()]
    return "\n".join(lines)


def headline_values(values: Mapping) -> dict:
    """Numbers rounded to 4 significant digits: what a person compares (DVC and MLflow show them as
    written, and 345.93266020690254 reads worse than 345.9)."""
    return {key: float(f"{value:.4g}") if isinstance(value, float) else value for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


HEADLINE_FILE = "headline.json"


def log_summary(headline: Mapping, details: Mapping | None = None, note: str = "",
                folder: Path | None = None) -> dict:
    """A stage's results, said once in each place a person looks:
    - `folder/headline.json` (when `folder` is given): the stage's handful of numbers; dvc.yaml
      declares these files as the pipeline's metrics, so `dvc metrics show` fits a terminal while
      every other number stays in the stage's own JSON files;
    - the same numbers as MLflow metrics `result/<name>` (runs-table columns, one small chart section);
    - the run's description: what the stage did (`note`) and a table of `details` (every summary
      number), instead of one single-bar chart per number.
    Returns the rounded headline."""
    from artmaster.files import write_atomic

    rounded = headline_values(headline)
    if folder is not None:
        write_atomic(Path(folder) / HEADLINE_FILE, json.dumps(rounded, indent=2) + "\n")
    tracker = active()
    tracker.log_metrics({f"result/{key}": float(value) for key, value in rounded.items()})
    if tracker.enabled:
        import mlflow

        current = mlflow.MlflowClient().get_run(tracker.run_id).data.tags.get("mlflow.note.content", "")
        parts = [current.split("\n\n**Results**")[0], "**Results**", note,
                 markdown_table(rounded, ("headline", "value")) if rounded else "",
                 markdown_table(headline_values(details), ("summary", "value")) if details else ""]
        describe("\n\n".join(part for part in parts if part))
    return rounded


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


@dataclass(frozen=True)
class TrackingSettings(Settings):
    enabled: bool = True
    timeout_s: float | None = None  # null: 10 s
    retries: int = 2


def connect(cfg: DictConfig) -> str:
    """Point MLflow at the configured store once it is checked (`check_store`), with every HTTP
    request bounded by `tracking.timeout_s` and `tracking.retries`; returns its URI."""
    import mlflow

    uri = tracking_uri(cfg)
    settings = TrackingSettings.from_config(cfg.tracking)
    timeout = settings.timeout_s or 10.0
    bound_http_requests(timeout, settings.retries)
    check_store(uri, timeout)
    mlflow.set_tracking_uri(uri)
    return uri


class Tracker:
    """What a stage records in MLflow, through one object: `stage_run` hands it out and library code
    running inside a stage gets it from `active()`; nothing else imports mlflow. A tracker made with
    `enabled=False` (tracking.enabled=false, or no stage run open) records nothing and never imports
    mlflow, so a machine without mlflow installed (a GPU box) runs every stage."""

    def __init__(self, enabled: bool = True, run_id: str | None = None):
        self.enabled = enabled
        self.run_id = run_id  # the MLflow run it records into

    @staticmethod
    def _mlflow():
        import mlflow

        return mlflow

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        if self.enabled:
            self._mlflow().log_metric(key, value, step=step)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.enabled:
            self._mlflow().log_metrics(dict(metrics), step=step)

    def log_param(self, key: str, value) -> None:
        if self.enabled:
            self._mlflow().log_param(key, value)

    def log_params(self, params: Mapping) -> None:
        if self.enabled:
            self._mlflow().log_params(dict(params))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.enabled:
            self._mlflow().set_tags(dict(tags))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._mlflow().log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._mlflow().log_artifacts(str(folder), artifact_path=artifact_path)

    def log_picture(self, path: Path, artifact_dir: str = "pictures") -> None:
        """A picture people look at (contact sheet, grid, heatmap), under `artifact_dir`."""
        self.log_artifact(path, artifact_path=artifact_dir)

    def log_image(self, image, key: str | None = None, step: int | None = None,
                  artifact_file: str | None = None) -> None:
        """An image: with `key` and `step`, one point of MLflow's image slider; else a file."""
        if self.enabled:
            if key is not None:
                self._mlflow().log_image(image, key=key, step=step)
            else:
                self._mlflow().log_image(image, artifact_file=artifact_file)

    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        if self.enabled:
            self._mlflow().log_table(data=dict(data), artifact_file=artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._mlflow().log_text(text, artifact_file)

    def log_dict(self, dictionary: Mapping, artifact_file: str) -> None:
        if self.enabled:
            self._mlflow().log_dict(dictionary, artifact_file)

    @contextmanager
    def child(self, stage: str, label: str) -> Iterator[Tracker]:
        """A run "<stage> <label>" nested under this one (one per training replicate, per retrain
        phase), so each keeps its own loss curve; its tracker is `active()` inside the `with`."""
        if not self.enabled:
            yield self
            return
        mlflow = self._mlflow()
        # in the parent's experiment: without experiment_id MLflow puts a nested run in "Default"
        experiment_id = mlflow.get_run(self.run_id).info.experiment_id
        with mlflow.start_run(run_name=f"{stage} {label}", nested=True, experiment_id=experiment_id) as run:
            mlflow.set_tag("artmaster.stage", stage)
            with _activated(Tracker(run_id=run.info.run_id)) as child:
                yield child


NO_TRACKING = Tracker(enabled=False)
_ACTIVE: list[Tracker] = []


def active() -> Tracker:
    """The tracker of the innermost open stage run (or child run); NO_TRACKING when none is open
    (tracking off, or a process of `accelerate launch` other than the main one)."""
    return _ACTIVE[-1] if _ACTIVE else NO_TRACKING


@contextmanager
def _activated(tracker: Tracker) -> Iterator[Tracker]:
    _ACTIVE.append(tracker)
    try:
        yield tracker
    finally:
        _ACTIVE.remove(tracker)


@contextmanager
def stage_run(cfg: DictConfig, stage: str, sections: tuple[str, ...], label: str = "",
              main: bool = True) -> Iterator[Tracker]:
    """Open an MLflow run for one stage, logging the config sections it reads as params.

    Named `run_name(stage, label)`, described by the stage module's first sentence and its command
    line (`log_summary` adds the results). Nested under the active run when there is one (a Hydra
    sweep's parent run, a retrain round). The store is
    checked first: TrackingUnavailable (naming the URI and the fix) before any work when it cannot
    be used. Yields the run's `Tracker`; with `tracking.enabled=false`, and in the processes of
    `accelerate launch` other than the main one (`main=False`), NO_TRACKING.
    """
    if not main:
        yield NO_TRACKING
        return
    if not TrackingSettings.from_config(cfg.tracking).enabled:
        print(f"{stage}: tracking.enabled=false: this run is not recorded in MLflow", file=sys.stderr)
        with _activated(NO_TRACKING) as tracker:
            yield tracker
        return
    import mlflow

    uri = tracking_uri(cfg)
    try:
        connect(cfg)
        experiment_id = experiment_id_for(mlflow, cfg)
        active = mlflow.start_run(run_name=run_name(stage, label), experiment_id=experiment_id,
                                  nested=mlflow.active_run() is not None)
    except TrackingUnavailable:
        raise
    except Exception as error:  # MLflow's own errors (server errors, a broken store) at the start
        raise _unavailable(uri, f"{type(error).__name__}: {' '.join(str(error).split())[:300]}") from error
    read = {name: _plain(cfg[name]) for name in sections if name in cfg}
    with active as run, _activated(Tracker(run_id=run.info.run_id)) as tracker:
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
        describe(f"{_stage_summary(stage)}\n\n`{_command(stage)}`".strip())
        mlflow.log_dict(read, "config.yaml")  # every setting the stage read, as composed
        params = run_params(read, _overridden_keys())
        items = list(params.items())
        for start in range(0, len(items), 100):
            mlflow.log_params(dict(items[start : start + 100]))
        yield tracker


# Settings that describe the model's shape or fixed lists rather than a run's recipe: kept in the
# run's config.yaml, not as params. MLflow prints every param of a run on each of its image cards
# (and offers each as a runs-table column), so 100+ params push the pictures out of sight.
QUIET_PARAMS = ("model.architecture.", "train.samples.", "train.checkpoint.", "train.validation.", "train.export.",
                "train.resume", "train.log_every", "augment.prompts", "evaluate.prompts", "evaluate.models",
                "caption.template.", "crop.border.", "crop.ink.", "crop.score.", "style_metric.")


def run_params(read: Mapping, overridden: set[str] = frozenset()) -> dict[str, str]:
    """The params a stage run logs: its config sections flattened, less QUIET_PARAMS unless an
    override set them (a sweep's keys always show)."""
    return {key: value for key, value in flatten(read).items()
            if key in overridden or not key.startswith(QUIET_PARAMS)}


def _overridden_keys() -> set[str]:
    from hydra.core.hydra_config import HydraConfig

    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return {str(o).split("=", 1)[0].lstrip("+~") for o in overrides}

