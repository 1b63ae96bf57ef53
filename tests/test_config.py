from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from artmaster.compose import HEADER, render_params
from artmaster.config import Settings, compose, conf_dir, project_root


def test_params_yaml_is_up_to_date_with_conf():
    committed = (project_root() / "params.yaml").read_text(encoding="utf-8")
    assert committed == render_params(compose()), "params.yaml is stale: run `artmaster compose`"


def test_params_yaml_is_marked_generated():
    assert (project_root() / "params.yaml").read_text(encoding="utf-8").startswith(HEADER)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


GROUPS = sorted(p.name for p in conf_dir().iterdir() if p.is_dir())


@pytest.mark.parametrize(
    "override", [f"{group}={option}" for group in GROUPS for option in _options(group)]
)
def test_every_config_option_composes(override):
    cfg = compose([override])
    plain = yaml.safe_load(render_params(cfg))
    assert plain["paths"]["data_dir"]


def test_stage_folders_live_under_data_dir(make_cfg, tmp_path):
    from artmaster.config import stage_dir

    cfg = make_cfg()
    assert stage_dir(cfg, "crop") == Path(tmp_path / "data" / "crop")


def test_slurm_launcher_config_composes_for_sweeps_on_a_cluster():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1


def test_stage_help_shows_that_stage_and_its_options_only(capsys):
    from artmaster.cli import main

    assert main(["train", "--help", "train.optim.lr=3e-4"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: artmaster train") and "Stage `train`: AdaLoRA fine-tuning" in shown
    assert "Options train.* (current values" in shown and "lr: 0.0003" in shown  # overrides apply
    assert "max_per_scan" not in shown and "style_words" not in shown  # not the other stages' options
    assert "Powered by Hydra" not in shown and len(shown.splitlines()) < 150
    assert main(["crop", "-h"]) == 0
    shown = capsys.readouterr().out
    assert "Options crop.*" in shown and "Options data.holdout.*" in shown and "max_per_scan: 6" in shown


@dataclass(frozen=True)
class _Sampler(Settings):
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    guidance: float
    every: int | None
    entries: tuple = ()


def test_settings_convert_values_and_list_entries_to_their_annotated_types():
    section = OmegaConf.create({"prompts": [1984, "mist"], "seeds": [3, "4"], "guidance": 3, "every": None,
                                "entries": [{"name": "a"}]})
    settings = _Sampler.from_config(section)
    assert settings.prompts == ("1984", "mist") and settings.seeds == (3, 4)
    assert isinstance(settings.guidance, float) and settings.guidance == 3.0
    assert settings.every is None and settings.entries[0].name == "a"
    assert _Sampler.kinds("s") == {"s.guidance": "number", "s.every": "int"}
    assert _Sampler.from_config(OmegaConf.create({"prompts": [], "seeds": [], "guidance": 1, "every": 2})).entries == ()
