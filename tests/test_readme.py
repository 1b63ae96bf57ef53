"""Every `artmaster ...` command the README shows composes as written (stage overrides, sweep
points, the tools' flags), and every `dvc exp run -S file:key=...` names a key of that file, so a
newcomer who copies a line never meets an unknown key."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from artmaster.cli import STAGES, TOOLS
from artmaster.config import compose
from artmaster.generate import _parser as generate_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_commands(prefix: str) -> list[str]:
    """Commands starting with `prefix` in code blocks (one a line, comments cut) and code spans."""
    found = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", README, re.S):
        for line in block.splitlines():
            command = line.split("  #")[0].split("; ")[0].strip()
            if command.startswith(prefix):
                found.append(command)
    found += [span for span in re.findall(r"`([^`\n]+)`", README) if span.startswith(prefix)]
    return list(dict.fromkeys(found))


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Each point of a basic sweep (`a=1,2 b=x`) as plain overrides; hydra/* choices left out."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override in parsed:
        if override.key_or_group.startswith("hydra"):
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        choices.append([f"{override.key_or_group}={value}" for value in values])
    return [list(point) for point in itertools.product(*choices)]


ARTMASTER = readme_commands("artmaster ")


def words_of(command: str) -> list[str]:
    return shlex.split(re.sub(r"<[^>]+>", "PLACEHOLDER", command))  # `<painter's works>` and the like


def test_the_readme_shows_stage_and_tool_commands():
    commands = {words_of(c)[1] for c in ARTMASTER}
    assert {"crop", "train", "ingest", "generate", "score", "validate-metric"} <= commands


@pytest.mark.parametrize("command", ARTMASTER)
def test_readme_command_composes(command):
    words = words_of(command)
    name, rest = words[1], words[2:]
    if name in {"--help", "-h"} or {"--help", "-h"} & set(rest):
        return  # the help screens are tested in test_config.py
    assert name in STAGES or name in TOOLS, f"README: `{command}`: no such artmaster command"
    if name in TOOLS:
        parser = generate_parser(name) if name == "generate" else None
        overrides = parser.parse_intermixed_args(rest).overrides if parser else [w for w in rest if "=" in w]
    else:
        overrides = [w for w in rest if w not in {"-m", "--multirun"}]
    for point in sweep_points(overrides):
        compose(point)  # an unknown key or a wrong type raises, naming the key
    hydra_choices = [o for o in overrides if o.startswith("hydra/")]
    for choice in hydra_choices:
        group, option = choice.split("=")
        assert (ROOT / "conf" / group / f"{option}.yaml").is_file(), f"README: `{command}`: no conf/{group}/{option}.yaml"


@pytest.mark.parametrize("command", readme_commands("dvc exp run"))
def test_readme_dvc_experiment_names_keys_of_its_file(command):
    for spec in re.findall(r"-S '([^']+)'", command):
        path, assignment = spec.split(":", 1)
        key = assignment.split("=")[0]
        tree = OmegaConf.create(yaml.safe_load((ROOT / path).read_text(encoding="utf-8")))
        assert OmegaConf.select(tree, key, default="__missing__") != "__missing__", f"README: {path} has no {key}"
