"""Config plumbing shared by every stage: where conf/ lives, composing it, and the Hydra entry point.

Each stage module exposes a plain function ``run(cfg) -> dict`` that tests call directly, and a
thin ``main = hydra_entry(run)`` that the ``artmaster`` command and dvc.yaml call.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import hydra
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    """The workspace holding conf/: the nearest one above cwd, else the source checkout this package
    was installed from (editable install). A queued DVC experiment runs in a temporary copy, and
    its conf/ (with the experiment's -S edits) is the copy's, so this never follows $DVC_ROOT."""
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "conf" / "config.yaml").is_file():
            return folder
    return PACKAGE_DIR.parents[1]


def store_root() -> Path:
    """Where the MLflow store lives: $DVC_ROOT (the parent repo, also for queued experiments that
    DVC deletes afterwards), else the workspace."""
    return Path(os.environ["DVC_ROOT"]).resolve() if os.environ.get("DVC_ROOT") else project_root()


def conf_dir() -> Path:
    return project_root() / "conf"


def compose(overrides: Iterable[str] = ()) -> DictConfig:
    """Compose conf/ with Hydra overrides, without running a Hydra app (tests, notebooks, tools)."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def to_params(cfg: DictConfig) -> dict:
    """The composed config as plain data with interpolations resolved (what params.yaml holds)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    return plain


def params_hash(section) -> str:
    """Stable short hash of a config section, used to tag MLflow runs and key caches."""
    plain = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else section
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    """One output folder per stage: <data_dir>/<stage>."""
    return Path(cfg.paths.data_dir) / stage


def hydra_entry(run: Callable[[DictConfig], object]) -> Callable[[], None]:
    """Wrap a stage's plain ``run(cfg)`` as a ``@hydra.main`` entry point over conf/config.yaml."""

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig):
        return run(cfg)

    _main.__doc__ = run.__doc__
    return _main
