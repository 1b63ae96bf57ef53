"""Config plumbing shared by every stage: where conf/ lives, composing it, and the Hydra entry point.

Each stage module exposes a plain function ``run(cfg) -> dict`` that tests call directly, and a
thin ``main = hydra_entry(run)`` that the ``artmaster`` command and dvc.yaml call.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import sys
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from types import UnionType

import hydra
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent


# --- ArtAug rounds: computed config values (resolvers), so dvc.yaml can `foreach` over them ----


def round_plan(rounds: int, first_adapter: str, data_dir: str) -> dict:
    """One entry per ArtAug round r: `adapter`, the LoRA folder augment paints with (round 0:
    `augment.adapter`; r > 0: the one retrained in round r-1), and `previous`, the folder retrain
    round r starts from (data/train, then data/retrain/round_<r-1>)."""
    rounds = int(rounds)
    if rounds < 1:
        raise ValueError(f"augment.rounds={rounds}: at least one round")
    plan = {}
    for r in range(rounds):
        previous = f"{data_dir}/train" if r == 0 else f"{data_dir}/retrain/round_{r - 1}"
        plan[f"round_{r}"] = {"round": r, "adapter": str(first_adapter) if r == 0 else f"{previous}/lora",
                              "previous": previous}
    return plan


def round_entry(cfg: DictConfig, r: int) -> dict:
    """`augment.plan`'s entry for round r as plain data ({"round", "adapter", "previous"})."""
    plan = cfg.augment.plan
    plan = OmegaConf.to_container(plan, resolve=True) if OmegaConf.is_config(plan) else plan
    key = f"round_{int(r)}"
    if key not in plan:
        raise ValueError(f"round {r} is not planned: augment.rounds={cfg.augment.rounds}")
    return plan[key]


def _register_resolvers() -> None:
    resolvers = {
        "artmaster_rounds": round_plan,
        "artmaster_last_round": lambda rounds: int(rounds) - 1,
    }
    for name, function in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)


_register_resolvers()


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
    """Compose conf/ with Hydra overrides, without running a Hydra app (tests, notebooks, tools).
    Values of the wrong type are a ConfigError naming the key (see `validate`)."""
    overrides = list(overrides)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
        validate(cfg, overrides)
    return cfg


# --- validation: a wrong-typed value stops at compose time with one clear line ----------------


class ConfigError(ValueError):
    """A problem the user fixes in conf/, an override or the environment. The `artmaster` command
    prints its message alone (one line, no traceback) and exits with status 2."""


class Settings:
    """Base of the typed settings a stage reads once from its config section: a frozen dataclass
    whose fields are named like the section's keys and annotated int, float, bool, str or tuple
    (`| None` where null switches a setting off), or another Settings dataclass for a subsection;
    a field with a default may be absent from the section. `from_config` converts each value to its
    field's type (an integer given for a float setting reads as a float), so the code reads typed
    attributes instead of casting at every use."""

    @classmethod
    def from_config(cls, section: DictConfig):
        values = {}
        for name, (kind, item) in _field_types(cls).items():
            if name not in section:
                continue  # the field's default
            value = section[name]
            if value is not None and issubclass(kind, Settings):
                value = kind.from_config(value)
            elif value is not None:
                value = kind(value) if item is None else kind(item(entry) for entry in value)
            values[name] = value
        return cls(**values)

    @classmethod
    def kinds(cls, prefix: str) -> dict[str, str]:
        """key -> the kind `validate` checks (int, number, bool) for every such field, subsections'
        included, under the section `prefix`."""
        kinds = {}
        for name, (kind, _) in _field_types(cls).items():
            if issubclass(kind, Settings):
                kinds |= kind.kinds(f"{prefix}.{name}")
            elif kind in _KIND_NAMES:
                kinds[f"{prefix}.{name}"] = _KIND_NAMES[kind]
        return kinds


_KIND_NAMES = {bool: "bool", int: "int", float: "number"}


@functools.cache
def _field_types(cls: type) -> dict[str, tuple[type, type | None]]:
    """field name -> (the type its value is converted to, and its entries' for `tuple[X, ...]`):
    X for `X | None`, (tuple, str) for `tuple[str, ...]`, (tuple, None) for a plain `tuple`."""
    types = {}
    for name, hint in typing.get_type_hints(cls).items():
        if typing.get_origin(hint) is UnionType:
            hint = next(option for option in typing.get_args(hint) if option is not type(None))
        entries = typing.get_args(hint)
        item = entries[0] if typing.get_origin(hint) is tuple and entries[1:] == (Ellipsis,) else None
        types[name] = (typing.get_origin(hint) or hint, item)
    return types


# The sections (and single keys) checked whatever set them (a conf/ file or an override), each with
# the Settings dataclass its stage reads it through ("module:class", imported when validating: these
# modules load without torch, as every stage validates before it starts). Every other key is checked
# only when an override sets it: against the type of its conf/ value.
CHECKED: dict[str, str | type] = {
    "seed": int,
    "data.demo": "artmaster.demo_scans:DemoSettings",
    "data.ingest": "artmaster.ingest:IngestSettings",
    # crop reads its section as written (no conversions): the values its window choice rests on
    "crop.max_iou": float,
    "crop.max_per_scan": int,
    "crop.per_bucket_scale": int,
    "crop.stride": float,
    "crop.min_ink_fraction": float,
    "train": "artmaster.training.settings:TrainSettings",
    "augment": "artmaster.augment_settings:AugmentSettings",
    "tracking": "artmaster.tracking:TrackingSettings",
}


@functools.cache
def checked_keys() -> dict[str, str]:
    """key -> kind (int, number, bool) of every key CHECKED covers."""
    keys = {}
    for prefix, spec in CHECKED.items():
        if isinstance(spec, type):
            keys[prefix] = _KIND_NAMES[spec]
        else:
            module, _, name = spec.partition(":")
            keys |= getattr(importlib.import_module(module), name).kinds(prefix)
    return keys


_KINDS = {"int": (int,), "number": (int, float), "bool": (bool,)}
_WORDS = {"int": "an integer", "number": "a number", "bool": "true or false"}


def _kind_of(value) -> str | None:
    """The checked kind a conf/ value declares: int, number (float) or bool; None for the rest."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    return None


def _check(key: str, value, kind: str, origin: str) -> None:
    if value is None:  # null is how optional settings are switched off
        return
    ok = isinstance(value, _KINDS[kind]) and (kind == "bool" or not isinstance(value, bool))
    if not ok:
        raise ConfigError(
            f"config: {key}={value!r} is a {type(value).__name__}, expected {_WORDS[kind]}{origin}; "
            "fix the override or the conf/ file that sets it"
        )


def _multiple_of_16(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 16 and value % 16 == 0


# Ranges, checked after the types: key -> (test of the value and the whole config, what it must be).
# `*` stands for every entry of a mapping (each crop bucket). Out of range is a ConfigError naming
# the key, before any work: `train.batch_size=0` would otherwise fail deep inside a stage.
RANGES: dict[str, tuple[Callable[[object, DictConfig], bool], str]] = {
    "train.optim.lr": (lambda v, cfg: v > 0, "greater than 0"),
    "train.epochs": (lambda v, cfg: v >= 1, "at least 1"),
    "train.repeats": (lambda v, cfg: v >= 1, "at least 1"),
    "train.batch_size": (lambda v, cfg: v >= 1, "at least 1"),
    "train.gradient_accumulation": (lambda v, cfg: v >= 1, "at least 1"),
    "train.log_every": (lambda v, cfg: v >= 1, "at least 1"),
    "train.checkpoint.keep": (lambda v, cfg: v >= 1, "at least 1"),
    "train.adalora.init_r": (lambda v, cfg: v >= 1, "at least 1"),
    "train.adalora.target_r": (lambda v, cfg: 1 <= v <= cfg.train.adalora.init_r,
                               "between 1 and train.adalora.init_r"),
    "train.adalora.lora_alpha": (lambda v, cfg: v > 0, "greater than 0"),
    "train.samples.batch_size": (lambda v, cfg: v >= 1, "at least 1"),
    "train.samples.width": (lambda v, cfg: _multiple_of_16(v), "a multiple of 16 (FLUX: VAE /8, then 2x2 patches)"),
    "train.samples.height": (lambda v, cfg: _multiple_of_16(v), "a multiple of 16 (FLUX: VAE /8, then 2x2 patches)"),
    "crop.buckets.*.width": (lambda v, cfg: _multiple_of_16(v), "a multiple of 16 (FLUX: VAE /8, then 2x2 patches)"),
    "crop.buckets.*.height": (lambda v, cfg: _multiple_of_16(v), "a multiple of 16 (FLUX: VAE /8, then 2x2 patches)"),
    "train.image_scale": (lambda v, cfg: v > 0 and all(
        _multiple_of_16(round(bucket[side] * v)) for bucket in cfg.crop.buckets.values() if bucket.enabled
        for side in ("width", "height")),
        "greater than 0 and keep both sides of every enabled crop bucket multiples of 16 (512 px: 0.25, 0.5, 1.0)"),
    "replicates.samples": (lambda v, cfg: v in ("product", "all"), "product or all"),
    "tracking.timeout_s": (lambda v, cfg: v > 0, "greater than 0"),
    "tracking.retries": (lambda v, cfg: v >= 0, "at least 0"),
}


def _expand(cfg: DictConfig, key: str) -> list[str]:
    """`key` with its `*` replaced by each entry of that mapping (absent mapping: none)."""
    if "*" not in key:
        return [key]
    head, _, tail = key.partition(".*")
    mapping = _select(cfg, head)
    names = list(mapping.keys()) if OmegaConf.is_dict(mapping) else []
    return [key for name in names for key in _expand(cfg, f"{head}.{name}{tail}")]


def check_ranges(cfg: DictConfig) -> None:
    """ConfigError (one line naming the key and the range) for the first value out of RANGES."""
    for pattern, (test, expected) in RANGES.items():
        for key in _expand(cfg, pattern):
            value = _select(cfg, key)
            if value is None:  # absent, or null: the stage reading it decides
                continue
            try:
                ok = test(value, cfg)
            except TypeError:  # a wrong type is reported by the type checks
                ok = True
            if not ok:
                shown = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
                raise ConfigError(f"config: {key}={shown!r} is out of range: it must be {expected}; "
                                  "fix the override or the conf/ file that sets it")


def _select(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except Exception:  # an interpolation that cannot resolve is reported where it is used
        return None


def _split_overrides(overrides: Iterable[str]) -> tuple[list[str], list[str]]:
    """(config group selections such as `model=flux_dev`, keys set to a value such as `crop.max_iou`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups, keys = [], []
    for override in OverridesParser.create().parse_overrides([str(o) for o in overrides]):
        key = override.key_or_group
        if key.startswith("hydra") or override.is_sweep_override():
            continue
        if (conf_dir() / key).is_dir():
            if not override.is_delete():
                groups.append(override.input_line)
        elif not override.is_delete() and not override.is_add():
            keys.append(key)
    return groups, keys


def validate(cfg: DictConfig, overrides: Iterable[str] = ()) -> None:
    """ConfigError (one line naming the key and the expected type) when a value has the wrong
    type: the keys CHECKED covers always, and every key an override sets against the type of its
    value in conf/ (`crop.max_iou=abc`, `train.optim.lr=fast`, `train.epochs=2.5`); then when a
    value is out of its range (RANGES: `train.optim.lr=0`, `train.batch_size=0`). Must run with
    Hydra initialised on conf/ when there are overrides (inside `compose` or a Hydra app)."""
    checked = checked_keys()
    for key, kind in checked.items():
        if OmegaConf.select(cfg, key, default="__absent__", throw_on_missing=False) != "__absent__":
            _check(key, _select(cfg, key), kind, "")
    groups, keys = _split_overrides(overrides)
    keys = [key for key in keys if key not in checked]
    if keys:
        baseline = hydra_compose(config_name="config", overrides=groups)
        for key in keys:
            kind = _kind_of(_select(baseline, key))
            if kind is not None:
                default = OmegaConf.to_yaml({"v": _select(baseline, key)}).strip()[3:]
                _check(key, _select(cfg, key), kind, f" like its value in conf/ ({default})")
    check_ranges(cfg)


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


def hydra_entry(run: Callable[[DictConfig], object],
                uses_torch: bool | Callable[[DictConfig], bool] = True) -> Callable[[], None]:
    """Wrap a stage's plain ``run(cfg)`` as a ``@hydra.main`` entry point over conf/config.yaml
    (``uses_torch`` False, or a function of the config that says False: the stage never runs torch
    and skips torch's runtime settings)."""

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig):
        from hydra.core.hydra_config import HydraConfig

        from artmaster import runtime

        try:
            validate(cfg, HydraConfig.get().overrides.task)
            runtime.apply(cfg.runtime, uses_torch(cfg) if callable(uses_torch) else uses_torch)
            return run(cfg)
        except ConfigError as error:  # the user's to fix: one clear line, no traceback
            print(f"artmaster: {error}", file=sys.stderr)
            sys.exit(2)

    _main.__doc__ = run.__doc__
    return _main
