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
        "`artmaster <stage> --help` shows that stage's composed config.\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
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
