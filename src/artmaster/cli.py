"""The `artmaster` command: `artmaster <stage> [hydra overrides]` and a few tools.

Stages are the modules dvc.yaml runs; each takes Hydra overrides (and `-m` for sweeps).
Tools (`score`, `validate-metric`, `generate`) take their own flags, then Hydra overrides.
"""

from __future__ import annotations

import importlib
import sys

# stage name -> module holding `main` (a Hydra entry) and `run(cfg)` (a plain function)
STAGES = {
    "compose": "artmaster.compose",
    "demo-scans": "artmaster.demo_scans",
    "ingest": "artmaster.ingest",
    "crop": "artmaster.crop",
    "caption": "artmaster.caption",
    "base": "artmaster.base",
    "train": "artmaster.train",
    "augment": "artmaster.augment",
    "retrain": "artmaster.retrain",
    "evaluate": "artmaster.evaluate",
}

# stage name -> the config sections that are its own options (`artmaster <stage> --help` shows them)
OPTIONS = {
    "compose": (),
    "demo-scans": ("data.demo",),
    "ingest": ("data.scans_dir", "data.ingest"),
    "crop": ("crop", "data.holdout"),
    "caption": ("caption",),
    "base": ("base",),
    "train": ("train",),
    "augment": ("augment", "critic", "refine"),
    "retrain": ("retrain",),
    "evaluate": ("evaluate",),
}

# tool name -> module holding `cli(argv)`
TOOLS = {
    "generate": "artmaster.generate",
    "score": "artmaster.score",
    "validate-metric": "artmaster.score",
}


def _usage() -> str:
    return (
        "usage: artmaster <command> [options] [hydra overrides]\n\n"
        "Pipeline stages (what `dvc repro` runs, in order):\n"
        + "".join(f"  {name}\n" for name in STAGES)
        + "\nTools:\n"
        "  generate \"a prompt\" [--adapter DIR] [--count N] [--seed S] [--out grid.png]\n"
        "  score --reference DIR --images DIR [--json out.json]\n"
        "  validate-metric --painter DIR --others DIR [--json out.json]\n\n"
        "Overrides are Hydra's: `artmaster train train.optim.lr=1e-4`,\n"
        "sweeps: `artmaster train -m train.adalora.target_r=4,8 train.optim.lr=1e-4,2e-4`.\n"
        "`artmaster <stage> --help` shows that stage's options.\n"
    )


def stage_help(command: str, overrides: list[str]) -> str:
    """What `artmaster <stage> --help` prints: what the stage does and its own options with their
    current values (after `overrides`), instead of Hydra's listing of every stage's config."""
    import yaml
    from omegaconf import OmegaConf

    from artmaster.config import compose, conf_dir

    module = importlib.import_module(STAGES[command])
    cfg = compose(overrides)
    lines = [f"usage: artmaster {command} [key=value ...]   (sweep: artmaster {command} -m key=a,b ...)", "",
             (module.__doc__ or "").strip(), ""]
    for key in OPTIONS[command]:
        value = OmegaConf.select(cfg, key)
        plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        group = key.split(".")[0]
        files = sorted(conf_dir().glob(f"{group}/*.yaml"))
        where = f"conf/{group}/ ({', '.join(f.stem for f in files)}; pick one with {group}=NAME)" if files else "conf/"
        lines += [f"Options {key}.* (current values; commented in {where}):" if isinstance(plain, dict)
                  else f"Option {key}:", ""]
        text = yaml.safe_dump({key: plain}, sort_keys=False, allow_unicode=True, width=100)
        lines += ["  " + line for line in text.rstrip().splitlines()] + [""]
    lines += ["Shared by every stage: model=tiny|flux_dev|flux_dev_random, experiment=demo|artmaster_flux, seed=N,",
              "paths.data_dir=DIR, tracking.enabled=false. Set any key as key=value, e.g.",
              f"  artmaster {command} {OPTIONS[command][0] + '.' if OPTIONS[command] else ''}...=VALUE",
              f"`artmaster {command} --cfg job` prints the whole composed config; `--hydra-help` Hydra's own flags."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in STAGES and {"-h", "--help"} & set(rest):
        print(stage_help(command, [arg for arg in rest if arg not in {"-h", "--help", "-m", "--multirun"}]), end="")
        return 0
    if command in STAGES:
        module = importlib.import_module(STAGES[command])
        sys.argv = [f"artmaster {command}", *rest]
        module.main()
        return 0
    if command in TOOLS:
        module = importlib.import_module(TOOLS[command])
        return int(module.cli(command, rest) or 0)
    print(f"artmaster: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
