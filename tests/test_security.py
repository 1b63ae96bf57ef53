"""Issue 7, security: safetensors only (no pickle loading), remote code only when the user asks,
no network when offline (sockets blocked through demo_scans -> ingest -> crop -> caption and
generate with an adapter; the raw scans stay byte-identical), and no path read from a manifest
can leave its data folder."""

from __future__ import annotations

import ast
import hashlib
import json
import socket
from pathlib import Path

import pytest
import yaml

from artmaster import augment, caption, crop, demo_scans, generate, ingest, retrain
from artmaster.config import compose
from artmaster.files import UnsafePath, inside, read_jsonl
from artmaster.painter import STYLES, paint

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "src" / "artmaster").rglob("*.py"))


def _calls(path: Path):
    """(name, node, source text) of every call in a module."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            yield name, node, ast.unparse(node)


def _keyword(node: ast.Call, name: str):
    for keyword in node.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _is_true(value) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


# --- safetensors only, remote code off ------------------------------------------------------------


def test_no_pickle_is_ever_loaded():
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        assert not any(word in text for word in ("import pickle", "import joblib", "import dill", "allow_pickle=True")), path
        for name, node, source in _calls(path):
            if name == "load" and source.startswith("torch.load"):
                assert _is_true(_keyword(node, "weights_only")), f"{path.name}: {source}"
            if name == "load_lora_weights":  # diffusers falls back to a pickled .bin unless told not to
                assert _is_true(_keyword(node, "use_safetensors")), f"{path.name}: {source}"
            if name == "from_pretrained" and not any(k in source for k in ("Processor", "Tokenizer")):
                assert _is_true(_keyword(node, "use_safetensors")), f"{path.name}: {source}"


def test_weights_are_written_as_safetensors():
    """torch.save writes only the optimizer/scheduler state of a checkpoint (read back with
    weights_only=True); every tensor file of an adapter or a cache is safetensors."""
    writers = {path.name for path in SOURCES for name, _, source in _calls(path) if source.startswith("torch.save")}
    assert writers <= {"checkpoints.py"}  # artmaster.training.checkpoints
    for name, node, source in _calls(ROOT / "src" / "artmaster" / "base.py"):
        if name == "save_pretrained":
            assert _is_true(_keyword(node, "safe_serialization")), source


def test_remote_code_runs_only_when_the_user_sets_trust_remote_code():
    for path in SOURCES:
        for _, node, source in _calls(path):
            value = _keyword(node, "trust_remote_code")
            if value is not None:
                assert not _is_true(value) and "settings.trust_remote_code" in ast.unparse(value), source
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        def walk(tree):
            if isinstance(tree, dict):
                for key, value in tree.items():
                    assert key != "trust_remote_code" or value is False, f"{path}: trust_remote_code must default to false"
                    walk(value)
        walk(yaml.safe_load(path.read_text(encoding="utf-8")))


def test_readme_binds_the_mlflow_ui_to_localhost():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "mlflow ui" in readme and "--host 127.0.0.1" in readme and "0.0.0.0" not in readme


# --- no network when offline ----------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection or name lookup is refused and recorded."""
    attempts = []

    def refuse(what):
        def blocked(*args, **kwargs):
            attempts.append((what, args[1:] if what.startswith("socket.") else args))
            raise OSError(f"network blocked by the test ({what})")

        return blocked

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse(f"socket.{name}"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DO_NOT_TRACK"):
        monkeypatch.setenv(flag, "1" if flag != "DO_NOT_TRACK" else "true")
    return attempts


def _tree_hash(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _tiny_lora(pipe, folder: Path) -> None:
    import torch
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    pipe.transformer.delete_adapters("default")


def test_the_pipeline_runs_with_every_socket_blocked_and_leaves_the_scans_untouched(no_network, tmp_path, capsys):
    from artmaster.models import build_random_pipeline

    data = tmp_path / "data"
    cfg = compose([
        f"paths.data_dir={data}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_dir={tmp_path / 'mlartifacts'}", "data.demo.count=3", "data.demo.in_subfolder=1",
        "data.demo.min_long_side=1024", "data.demo.max_long_side=1200", "data.holdout.scans=0",
    ])
    demo_scans.run(cfg)
    scans = data / "demo_scans"
    before = _tree_hash(scans)
    assert len(before) >= 4  # scans and sidecars
    ingest.run(cfg)
    crop.run(cfg)
    caption.run(cfg)
    assert _tree_hash(scans) == before  # the raw scans are only ever read

    pipe = build_random_pipeline(cfg.model)
    pipe.save_pretrained(data / "base" / "pipeline")
    _tiny_lora(pipe, tmp_path / "lora")
    out = tmp_path / "generated" / "grid.png"
    status = generate.cli("generate", [
        "zxh style, misty gorge", "--count", "1", "--steps", "2", "--adapter", str(tmp_path / "lora"),
        "--out", str(out), f"paths.data_dir={data}", "base.generate.width=64", "base.generate.height=64",
    ])
    assert status == 0 and out.is_file()
    assert no_network == [], f"network attempted: {no_network[:5]}"
    assert (data / "caption" / "captions.jsonl").is_file()


# --- paths from manifests stay inside their folder ------------------------------------------------


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "a/../../b.png", "C:\\\\Windows\\\\x.png", ""])
def test_inside_refuses_paths_that_leave_the_folder(tmp_path, bad):
    with pytest.raises(UnsafePath, match="crops.jsonl:7: path .* is not a relative path inside"):
        inside(tmp_path, bad, where="crops.jsonl:7")


def test_inside_keeps_ordinary_relative_paths(tmp_path):
    assert inside(tmp_path, "512x512/a..b.png") == tmp_path / "512x512" / "a..b.png"
    assert inside(tmp_path, "卷轴/画 一.png") == tmp_path / "卷轴" / "画 一.png"


def _crops_with(data: Path, bad_path: str) -> Path:
    crop_dir = data / "crop"
    (crop_dir / "512x512").mkdir(parents=True)
    paint(STYLES["zeng_xiaohu"], 64, 64, seed=0).save(crop_dir / "512x512" / "s0-512x512-00.png")
    rows = [{"crop_id": "s0-512x512-00", "scan_id": "s0", "path": "512x512/s0-512x512-00.png", "width": 512,
             "height": 512, "split": "train"},
            {"crop_id": "evil", "scan_id": "s0", "path": bad_path, "width": 512, "height": 512, "split": "train"}]
    (crop_dir / "crops.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return crop_dir


@pytest.mark.parametrize("bad_path", ["../../etc/passwd", "/etc/passwd"])
def test_caption_and_augment_refuse_a_crops_manifest_row_leaving_data_crop(make_cfg, tmp_path, bad_path):
    crop_dir = _crops_with(tmp_path / "data", bad_path)
    cfg = make_cfg()
    with pytest.raises(UnsafePath, match=rf"crops\.jsonl:2: field 'path': path '{bad_path}' is not a relative path"):
        caption.run(cfg)
    assert not (tmp_path / "data" / "caption").exists()
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(UnsafePath, match=r"crops\.jsonl:2"):
        augment.run(make_cfg(f"augment.adapter={tmp_path / 'lora'}"))
    assert crop_dir.is_dir()


def test_crop_refuses_a_scan_id_that_would_leave_data_ingest(make_cfg, tmp_path):
    manifest = tmp_path / "data" / "ingest" / "manifest.jsonl"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"id": "../../../outside", "status": "accepted"}) + "\n", encoding="utf-8")
    with pytest.raises(UnsafePath, match=r"manifest\.jsonl:1: field 'id': path '\.\./\.\./\.\./outside'"):
        crop.run(make_cfg())
    assert not (tmp_path / "data" / "crop").exists()


def test_retrain_refuses_an_augment_record_pointing_outside_its_round(tmp_path):
    samples = tmp_path / "samples.jsonl"
    row = {"sample_id": "0000", "accepted": True, "prompt": "p",
           "files": {"original": "pairs/0000-original.png", "accepted": "../../../../etc/passwd"}}
    samples.write_text(json.dumps(row) + "\n", encoding="utf-8")
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "0000-original.png").write_bytes(b"")
    with pytest.raises(UnsafePath, match=r"samples\.jsonl: sample 0000: path '\.\./\.\./\.\./\.\./etc/passwd'"):
        retrain.accepted_pairs(tmp_path, 0)


def test_every_stage_reading_crops_jsonl_checks_its_paths():
    """crops.jsonl rows name files under data/crop: readers pass `within` (dataset.load_examples,
    train's reader, checks each path itself and skips an escaping one with a message: test_train.py)."""
    for path in SOURCES:
        for name, node, source in _calls(path):
            if name == "read_jsonl" and ("crops" in source) and path.name != "dataset.py":
                assert _keyword(node, "within") is not None, f"{path.name}: {source}"


def test_read_jsonl_names_file_and_line_and_lets_good_rows_through(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "a/b.png"}\n\n{"path": "c.png"}\n{"path": "../d.png"}\n', encoding="utf-8")
    with pytest.raises(UnsafePath, match=r"m\.jsonl:4: field 'path'"):
        read_jsonl(manifest, within={"path": tmp_path})
    assert len(read_jsonl(manifest)) == 3  # without `within`, nothing is checked
