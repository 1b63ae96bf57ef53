"""MLflow record of every stage run: one experiment, a run per stage, tagged for lineage.

The store is SQLite at the project root (``mlflow.db``), anchored at $DVC_ROOT when DVC sets it,
so ``mlflow ui`` run from the repo root shows every stage, sweep and experiment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from artmaster.config import params_hash, project_root, store_root


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


@contextmanager
def stage_run(cfg: DictConfig, stage: str, sections: tuple[str, ...]) -> Iterator[object]:
    """Open an MLflow run for one stage, logging the config sections it reads as params.

    Nested under the active run when there is one (a Hydra sweep's parent run).
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    experiment_id = experiment_id_for(mlflow, cfg)
    read = {name: _plain(cfg[name]) for name in sections if name in cfg}
    with mlflow.start_run(
        run_name=stage, experiment_id=experiment_id, nested=mlflow.active_run() is not None
    ) as run:
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
