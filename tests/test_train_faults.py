"""Issue 7, faults while training and augmenting, with real SIGKILLs: the `train` stage killed
during the encoding cache build, mid-training between checkpoints and right after a checkpoint
write resumes each time to the bitwise same adapter as an uninterrupted run (CPU); a full disk
while writing a checkpoint is a clear error that keeps the previous checkpoint; `augment` killed
mid-sample redoes only the unfinished samples. (NaN loss: test_train.py.)

The kills are real: the stage runs in a subprocess that sends itself SIGKILL at the chosen point
(no exception handler, `finally` or atexit runs), then the test re-runs the stage."""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.launch import offline_env
from safetensors.torch import load_file, save_file
from helpers.augment import FAST as AUGMENT_FAST
from helpers.training import FAST, killed_at_step, make_run_cfg

from artmaster import augment, train
from artmaster.config import ConfigError, project_root
from artmaster.training.checkpoints import list_checkpoints

KILL_TRAIN = r"""
import os, signal, sys
from artmaster import runtime, train
from artmaster.training import checkpoints, encodings, loop
from artmaster.config import compose

point, overrides = sys.argv[1], sys.argv[2:]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def step_of(args, kwargs):
    return kwargs.get("step", args[2] if len(args) > 2 else None)

if point == "cache":  # the third cache entry is torn half-way through its write
    real_save, writes = encodings.save_file, []
    def save_file(tensors, filename, *args, **kwargs):
        if str(filename).endswith(".tmp"):
            writes.append(filename)
            if len(writes) == 3:
                real_save(tensors, filename, *args, **kwargs)
                os.truncate(filename, os.path.getsize(filename) // 2)
                die()
        return real_save(tensors, filename, *args, **kwargs)
    encodings.save_file = save_file
elif point == "training":  # between the checkpoints of steps 4 and 8
    real_step = loop.training_step
    def training_step(*args, **kwargs):
        if step_of(args, kwargs) == 7:
            die()
        return real_step(*args, **kwargs)
    loop.training_step = training_step
elif point == "checkpoint":  # right after step-000008 is written
    real_checkpoint = loop.save_checkpoint
    def save_checkpoint(*args, **kwargs):
        path = real_checkpoint(*args, **kwargs)
        if step_of(args, kwargs) == 8:
            die()
        return path
    loop.save_checkpoint = save_checkpoint
cfg = compose(overrides)
runtime.apply(cfg.runtime)  # as the stage's entry point does (and the tests' conftest)
train.run(cfg)
"""


def _overrides(cfg) -> list[str]:
    return [f"paths.data_dir={cfg.paths.data_dir}", f"model.path={cfg.model.path}",
            f"tracking.uri={cfg.tracking.uri}", f"tracking.artifact_dir={cfg.tracking.artifact_dir}", *FAST]


def _sigkilled(script: str, *argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=project_root(), env=offline_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, f"not killed (rc {done.returncode}):\n{done.stderr[-3000:]}"
    return done


def _same_adapter(out: Path, out_ref: Path) -> None:
    for relative in ("checkpoints/step-000012/adapter.safetensors", "lora/pytorch_lora_weights.safetensors"):
        tensors, expected = load_file(out / relative), load_file(out_ref / relative)
        assert tensors.keys() == expected.keys(), relative
        assert all(torch.equal(tensors[k], expected[k]) for k in tensors), f"{relative} differs"
    assert (out / "loss.csv").read_text() == (out_ref / "loss.csv").read_text()
    # the exported LoRA, headers and model card included, is byte for byte the same: what DVC hashes
    lora, lora_ref = ({p.name: p.read_bytes() for p in (o / "lora").iterdir()} for o in (out, out_ref))
    assert lora.keys() == lora_ref.keys() and all(lora[name] == lora_ref[name] for name in lora), "lora/ differs"


def _count_calls(monkeypatch, target: str) -> list:
    """Record the `step` (or just the call) of every call to `target` (module.function, as the
    module that calls it sees it)."""
    module, _, name = target.rpartition(".")
    calls, real = [], getattr(importlib.import_module(module), name)

    def counted(*args, **kwargs):
        calls.append(kwargs.get("step", args[2] if len(args) > 2 else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(target, counted)
    return calls


@pytest.mark.slow  # a subprocess per kill (~30 s each on 2 shared cores); test_train.py has an in-process kill
@pytest.mark.parametrize(
    ("point", "checkpoints_left", "steps_rerun"),
    [
        ("cache", [], list(range(1, 13))),
        ("training", ["step-000004"], list(range(5, 13))),
        ("checkpoint", ["step-000004", "step-000008"], list(range(9, 13))),
    ],
)
def test_train_killed_with_sigkill_resumes_to_the_bitwise_same_adapter(
    train_reference, train_assets, tmp_path, monkeypatch, point, checkpoints_left, steps_rerun
):
    _, metrics_ref, out_ref = train_reference
    cfg = make_run_cfg(train_assets, tmp_path)
    _sigkilled(KILL_TRAIN, point, *_overrides(cfg))
    out = tmp_path / "data" / "train"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == checkpoints_left
    assert not (out / "metrics.json").exists() and not (out / "lora").exists()
    cached = sorted(p.name for p in (out / "cache").iterdir())
    if point == "cache":  # two entries written, the third torn before its rename
        assert len([n for n in cached if n.endswith(".safetensors")]) == 2
        assert len([n for n in cached if n.endswith(".tmp")]) == 1

    steps = _count_calls(monkeypatch, "artmaster.training.loop.training_step")
    encodes = _count_calls(monkeypatch, "artmaster.training.encodings.encode_image")
    metrics = train.run(cfg)  # train.resume=auto, what `dvc repro train` runs again
    assert steps == steps_rerun
    assert len(encodes) == (6 - 2 if point == "cache" else 0)  # finished cache entries are reused
    _same_adapter(out, out_ref)
    assert metrics["loss"] == metrics_ref["loss"]


def test_a_full_disk_while_writing_a_checkpoint_is_a_clear_error_and_keeps_the_previous_one(
    train_reference, train_assets, tmp_path, monkeypatch
):
    _, _, out_ref = train_reference
    cfg = make_run_cfg(train_assets, tmp_path)
    real_save = save_file

    def disk_full(tensors, filename, *args, **kwargs):
        if "step-000008" in str(filename):  # half the file reaches the disk, then ENOSPC
            real_save(tensors, filename, *args, **kwargs)
            os.truncate(filename, os.path.getsize(filename) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr("artmaster.training.checkpoints.save_file", disk_full)
    with pytest.raises(OSError, match=r"could not write checkpoint .*step-000008 .*No space left on device.*"
                                      r"previous checkpoints in .* are intact"):
        train.run(cfg)
    checkpoints = tmp_path / "data" / "train" / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-000004"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000004"]  # no half-written folder
    previous = load_file(checkpoints / "step-000004" / "adapter.safetensors")
    assert previous and all(torch.isfinite(t).all() for t in previous.values())

    monkeypatch.undo()  # space freed: the re-run resumes from step 4 and ends where the reference did
    train.run(cfg)
    _same_adapter(tmp_path / "data" / "train", out_ref)


KILL_AUGMENT = r"""
import os, signal, sys
from artmaster import augment
from artmaster.config import compose

real = augment.write_atomic
def write_atomic(path, data):
    if str(path).endswith("0001.json"):  # sample 0001's images are written, its record (written last) not
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, data)
augment.write_atomic = write_atomic
augment.run(compose(sys.argv[1:]))
"""


@pytest.mark.slow
def test_augment_killed_with_sigkill_redoes_only_the_unfinished_samples(augment_upstream, make_cfg, tmp_path, monkeypatch):
    shutil.copytree(augment_upstream, tmp_path / "data")
    cfg = make_cfg(*AUGMENT_FAST)
    out = Path(cfg.paths.data_dir) / "augment" / "round_0"
    _sigkilled(KILL_AUGMENT, f"paths.data_dir={cfg.paths.data_dir}", f"tracking.uri={cfg.tracking.uri}",
               f"tracking.artifact_dir={cfg.tracking.artifact_dir}", *AUGMENT_FAST)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["0000.json"]
    assert (out / "pairs" / "0001-original.png").is_file() and not (out / "samples.jsonl").exists()
    kept = (out / "samples" / "0000.json").stat().st_mtime_ns

    done, real = [], augment.process_sample
    monkeypatch.setattr(augment, "process_sample", lambda sample, *a: done.append(sample.sample_id) or real(sample, *a))
    metrics = augment.run(cfg)
    assert done == ["0001", "0002"]  # 0000 was finished: not redone
    assert (out / "samples" / "0000.json").stat().st_mtime_ns == kept
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in records] == ["0000", "0001", "0002"] and metrics["samples"] == 3


# --- issue 15: damaged checkpoints and cache entries, a failing export, place-free outputs ---------


def _flip_bit(path: Path, tensor: str) -> None:
    """Flip one exponent bit in the first value of the first tensor whose name contains `tensor`,
    as a bad sector or a power cut would: the file still loads, with a different number in it."""
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    name = next(key for key in sorted(header) if tensor in key)
    data[8 + header_size + header[name]["data_offsets"][0] + 3] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_intact_one(
    train_reference, train_assets, tmp_path, monkeypatch, capsys
):
    _, metrics_ref, out_ref = train_reference
    cfg = make_run_cfg(train_assets, tmp_path)
    killed_at_step(cfg, monkeypatch, 9)  # after the checkpoint of step 8
    out = tmp_path / "data" / "train"
    newest = out / "checkpoints" / "step-000008"
    _flip_bit(newest / "adapter.safetensors", ".lora_A.")
    capsys.readouterr()

    steps = _count_calls(monkeypatch, "artmaster.training.loop.training_step")
    metrics = train.run(cfg)
    assert f"train: skipping checkpoint step-000008: {newest / 'adapter.safetensors'} does not match the sha256" \
        in capsys.readouterr().out
    assert steps == list(range(5, 13))  # resumed from step-000004, the newest intact one
    _same_adapter(out, out_ref)
    assert metrics["loss"] == metrics_ref["loss"]
    recorded = json.loads((out / "checkpoints" / "step-000012" / "meta.json").read_text())["files"]
    assert sorted(recorded) == ["adapter.safetensors", "training_state.pt"]  # every file hashed when written

    _flip_bit(out / "checkpoints" / "step-000012" / "adapter.safetensors", ".lora_B.")
    with pytest.raises(ConfigError, match=r"train\.resume=.*step-000012: .*adapter\.safetensors does not match"):
        train.run(make_run_cfg(train_assets, tmp_path, f"train.resume={out / 'checkpoints' / 'step-000012'}"))


def test_a_flipped_bit_in_a_cached_latent_is_detected_and_the_entry_recomputed(
    train_reference, train_assets, tmp_path, monkeypatch, caplog
):
    _, metrics_ref, out_ref = train_reference
    cfg = make_run_cfg(train_assets, tmp_path)
    out = tmp_path / "data" / "train"
    shutil.copytree(out_ref / "cache", out / "cache")
    damaged = sorted(path for path in (out / "cache").glob("*.safetensors") if "latent_mean" in load_file(path))
    assert len(damaged) == 6
    for path in damaged:
        _flip_bit(path, "latent_mean")

    encodes = _count_calls(monkeypatch, "artmaster.training.encodings.encode_image")
    metrics = train.run(cfg)
    assert len(encodes) == len(damaged)  # exactly the damaged entries are encoded again
    for path in damaged:
        assert f"cache file {path} does not match the hash recorded" in caplog.text
    _same_adapter(out, out_ref)
    assert metrics["loss"] == metrics_ref["loss"]


def test_a_failing_export_leaves_the_previous_outputs_whole(train_reference, train_assets, tmp_path, monkeypatch):
    from artmaster import adalora

    _, _, out_ref = train_reference
    cfg = make_run_cfg(train_assets, tmp_path)
    out = tmp_path / "data" / "train"
    shutil.copytree(out_ref, out)  # a finished run; its checkpoints make the re-run go straight to the export
    (out / "adapter" / "from_the_previous_run.txt").write_text("previous")
    exported = ("adapter", "lora", "ranks.json", "ranks.png", "loss.csv", "metrics.json")
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()
              and path.relative_to(out).parts[0] in exported}

    def no_lora(*args, **kwargs):
        raise ValueError("every module has rank 0: there is no LoRA to save")

    monkeypatch.setattr(adalora, "save_lora", no_lora)
    with pytest.raises(ValueError, match="every module has rank 0"):
        train.run(cfg)
    after = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()
             and path.relative_to(out).parts[0] in exported}
    assert after == before  # the previous run's outputs, all of them, untouched
    assert not list(out.glob(".outputs*")), "staging folders left behind"

    monkeypatch.undo()  # the export works again: the outputs are replaced together, and only they
    train.run(cfg)
    assert not (out / "adapter" / "from_the_previous_run.txt").exists()
    _same_adapter(out, out_ref)


def test_the_exported_lora_holds_no_timing(train_reference):
    from safetensors import safe_open

    _, metrics, out = train_reference
    assert metrics["steps_per_second"] > 0  # measured, and kept in metrics.json and MLflow
    assert "steps_per_second" in (out / "metrics.json").read_text()
    for path in (out / "lora").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            assert "second" not in json.dumps(handle.metadata()), path.name
    assert "second" not in (out / "lora" / "README.md").read_text()
    assert "time" not in json.loads((out / "checkpoints" / "step-000012" / "meta.json").read_text())


def test_a_checkpoints_folder_that_is_a_symbolic_link_is_emptied_and_kept(train_assets, tmp_path):
    elsewhere = tmp_path / "big_disk" / "checkpoints"
    stale = elsewhere / "step-000099"
    stale.mkdir(parents=True)
    (stale / "meta.json").write_text(json.dumps({"step": 99, "fingerprint": "another recipe"}))
    out = tmp_path / "data" / "train"
    out.mkdir(parents=True)
    (out / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    cfg = make_run_cfg(train_assets, tmp_path, "train.epochs=1", "train.checkpoint.keep_after_success=false")
    train.run(cfg)
    assert (out / "checkpoints").is_symlink() and elsewhere.is_dir()
    assert list(elsewhere.iterdir()) == []  # the stale checkpoint and this run's, gone after the export
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
