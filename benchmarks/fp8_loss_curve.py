"""Does `train.fp8_base` train like the bf16 base? The same optimizer steps, both ways, at FLUX.1-dev size.

Builds the FLUX.1-dev transformer with random bf16 weights, random tensors shaped like cached
encodings (train_step.py's, 512x512 + the recipe's 128 text tokens), and trains the recipe's
AdaLoRA step (`training_step` as `experiment=artmaster_flux` composes it, an AdaLoRA schedule of
--steps steps) three times on one transformer:

- bf16: the recipe;
- fp8: the recipe with `train.fp8_base=true`, the same seed (the same adapter init, samples,
  noise and noise levels at every step: per-step losses compare directly);
- control: the recipe with another seed: how far two equally valid bf16 runs lie apart, the
  yardstick for the fp8 difference.

Each run logs its training loss every step and the validation loss (held samples at fixed noise
levels with fixed noise, `training.validation`) every --validate-every steps. The fp8 curve matches
when every --window-step mean of its training loss and every validation loss lie within
--tolerance (relative) of the bf16 run's. Prints the curves side by side and the verdict; writes JSON.

    python benchmarks/fp8_loss_curve.py --json fp8_loss_curve.json            # one GPU, FLUX.1-dev size
    python benchmarks/fp8_loss_curve.py --profile tiny --device cpu --steps 20 --validate-every 10 --window 10
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from train_step import (PROFILES, Row, bare_transformer, encodings_for, fresh_accelerator, recipe_config, row_config,
                        sync, undo_levers)

from artmaster import float8, models
from artmaster.training.batches import keyed_generator, make_batch
from artmaster.training.state import build_training_state
from artmaster.training.step import training_step
from artmaster.training.validation import validation_loss, validation_set

HELD = 2  # held samples for the validation loss


def train_curve(name: str, cfg, ctx: SimpleNamespace, steps: int, validate_every: int) -> dict:
    """`steps` recipe steps on the transformer, cycling over the training samples; the transformer
    is bare again afterwards."""
    transformer, device = ctx.transformer, ctx.device
    accelerator = fresh_accelerator(str(cfg.train.mixed_precision), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    state = build_training_state(cfg, transformer, ctx.vae_config, steps, accelerator, keep_original_base=True)
    train_ids, held_ids = ctx.ids[HELD:], ctx.ids[:HELD]
    # the same held noise for every run, the control's too: its validation differs by training alone
    vset = validation_set(ctx.encodings, held_ids, list(cfg.train.validation.sigmas), ctx.seed, state.flow, device)
    initial = [param.detach().to("cpu", copy=True) for param in state.params]

    def validate() -> float:
        eager = models.eager_blocks(transformer) if state.cudagraphs else nullcontext()
        with eager:
            return float(validation_loss(state.adapter, vset, state.flow))

    losses, validation = [], [(0, validate())]
    seconds = []
    for step in range(1, steps + 1):
        batch = make_batch(ctx.encodings, [train_ids[(step - 1) % len(train_ids)]])
        sync(device)
        started = time.perf_counter()
        out = training_step(state, [batch], step, [keyed_generator(cfg.seed, "step", 0, step, 0, device=device)])
        sync(device)
        seconds.append(time.perf_counter() - started)
        losses.append(out["mse"].detach())
        if step % validate_every == 0 or step == steps:
            validation.append((step, validate()))
    result = {
        "run": name, "seed": int(cfg.seed), "fp8_base": bool(cfg.train.fp8_base), "cudagraphs": state.cudagraphs,
        "losses": [float(loss) for loss in losses], "validation": validation,
        "first_step_seconds": seconds[0], "median_step_seconds": statistics.median(seconds[1:] or seconds),
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "fp8_layers": sum(isinstance(m, float8.Float8FrozenLinear) for m in transformer.modules()),
        # what training changed in the adapter tensors (not written to JSON)
        "update": torch.cat([(param.detach().cpu() - start).flatten() for param, start in zip(state.params, initial)]),
    }
    state.adapter.unload()
    undo_levers(transformer)
    accelerator.free_memory()
    state = vset = None  # the optimizer's and allocator's tensors go before the next run builds its own
    gc.collect()
    if device.type == "cuda":
        # the CUDA-graph trees stay: the control run replays the bf16 run's compiled blocks
        torch.cuda.empty_cache()
    return result


def window_means(losses: list[float], window: int) -> list[float]:
    return [statistics.fmean(losses[start:start + window]) for start in range(0, len(losses), window)]


def relative_gaps(curve: list[float], reference: list[float]) -> list[float]:
    return [abs(a - b) / abs(b) for a, b in zip(curve, reference)]


def compare(runs: dict[str, dict], window: int, tolerance: float) -> dict:
    """The fp8 and control curves against bf16: window means of the training loss, validation
    losses, per-step gaps (same seed only); the verdict is the fp8 run's."""
    base = runs["bf16"]
    base_windows = window_means(base["losses"], window)
    base_validation = [value for _, value in base["validation"]]
    out = {"window": window, "tolerance": tolerance, "bf16_windows": base_windows,
           "bf16_validation": base_validation, "bf16_change": base_windows[-1] / base_windows[0] - 1}
    for name in ("fp8", "control"):
        if name not in runs:
            continue
        run = runs[name]
        windows = window_means(run["losses"], window)
        validation = [value for _, value in run["validation"]]
        out[name] = {
            "windows": windows,
            "window_gaps": relative_gaps(windows, base_windows),
            "validation": validation,
            "validation_gaps": relative_gaps(validation, base_validation),
            "step_gap_median": statistics.median(relative_gaps(run["losses"], base["losses"])),
            "step_gap_max": max(relative_gaps(run["losses"], base["losses"])),
        }
        out[name]["max_window_gap"] = max(out[name]["window_gaps"])
        if name == "fp8":  # same seed, same initial adapter: how differently did the adapter move?
            out[name]["update_gap"] = float((run["update"] - base["update"]).norm() / base["update"].norm())
        out[name]["max_validation_gap"] = max(out[name]["validation_gaps"])
    fp8 = out["fp8"]
    out["matches"] = fp8["max_window_gap"] <= tolerance and fp8["max_validation_gap"] <= tolerance
    return out


def print_curves(runs: dict[str, dict], comparison: dict) -> None:
    window = comparison["window"]
    names = [name for name in ("bf16", "fp8", "control") if name in runs]
    print(f"training loss, mean over {window}-step windows")
    print(f"{'steps':>11} " + " ".join(f"{name:>9}" for name in names) + f" {'fp8 gap':>8}")
    for index, base in enumerate(comparison["bf16_windows"]):
        values = [base] + [comparison[name]["windows"][index] for name in names[1:]]
        print(f"{index * window + 1:>5}-{min((index + 1) * window, len(runs['bf16']['losses'])):<5} "
              + " ".join(f"{value:>9.5f}" for value in values)
              + f" {100 * comparison['fp8']['window_gaps'][index]:>7.2f}%")
    print("validation loss")
    for index, (step, base) in enumerate(runs["bf16"]["validation"]):
        values = [base] + [comparison[name]["validation"][index] for name in names[1:]]
        print(f"{step:>11} " + " ".join(f"{value:>9.5f}" for value in values)
              + f" {100 * comparison['fp8']['validation_gaps'][index]:>7.2f}%")
    for name in names:
        run = runs[name]
        peak = f", peak {run['peak_gb']:.1f} GB" if run["peak_gb"] is not None else ""
        print(f"{name}: {run['median_step_seconds']:.3f} s/step (median), first step {run['first_step_seconds']:.1f} s"
              f"{peak}, {run['fp8_layers']} FP8 layers")
    for name in names[1:]:
        entry = comparison[name]
        print(f"{name} vs bf16: windows up to {100 * entry['max_window_gap']:.2f}%, validation up to "
              f"{100 * entry['max_validation_gap']:.2f}%, per step median {100 * entry['step_gap_median']:.2f}% "
              f"(max {100 * entry['step_gap_max']:.2f}%)")
    print(f"fp8 vs bf16: the adapter's change over the run differs by {100 * comparison['fp8']['update_gap']:.2f}%; "
          f"bf16's training loss moved {100 * comparison['bf16_change']:+.2f}% from the first window to the last")
    print(f"fp8 {'MATCHES' if comparison['matches'] else 'DOES NOT MATCH'} bf16 within "
          f"{100 * comparison['tolerance']:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="flux")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (the AdaLoRA schedule's total)")
    parser.add_argument("--samples", type=int, default=10, help="random training samples, cycled")
    parser.add_argument("--validate-every", type=int, default=50)
    parser.add_argument("--window", type=int, default=50, help="steps per window mean of the training loss")
    parser.add_argument("--tolerance", type=float, default=0.02, help="relative gap the fp8 curve may have")
    parser.add_argument("--no-control", action="store_true", help="skip the other-seed bf16 run")
    parser.add_argument("--json", default="fp8_loss_curve.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_args()
    began = time.perf_counter()
    profile = PROFILES[args.profile]
    cfg, device = recipe_config(profile, args.device, args.overrides)
    transformer, vae_config = bare_transformer(cfg)
    size, text = profile["sizes"][0], int(cfg.model.max_sequence_length)
    encodings = encodings_for(cfg, size, text, HELD + args.samples, device, transformer.dtype)
    ctx = SimpleNamespace(device=device, seed=int(cfg.seed), transformer=transformer, vae_config=vae_config,
                          encodings=encodings, ids=sorted(encodings, key=lambda key: int(key.removeprefix("sample"))))
    plans = {"bf16": (), "fp8": ("train.fp8_base=true",)}
    if not args.no_control:
        plans["control"] = (f"seed={int(cfg.seed) + 1}",)
    runs = {}
    for name, overrides in plans.items():
        run_cfg = row_config(Row(name, "adalora", size, text, overrides=overrides), cfg)
        print(f"[{time.perf_counter() - began:5.0f}s] {name}: {args.steps} steps {' '.join(overrides)}", flush=True)
        runs[name] = train_curve(name, run_cfg, ctx, args.steps, args.validate_every)
        run = runs[name]
        print(f"    {run['median_step_seconds']:.3f} s/step, first {run['first_step_seconds']:.1f} s, loss windows "
              + " ".join(f"{value:.5f}" for value in window_means(run["losses"], args.window))
              + ", validation " + " ".join(f"{value:.5f}" for _, value in run["validation"]), flush=True)
    comparison = compare(runs, args.window, args.tolerance)
    print_curves(runs, comparison)
    for run in runs.values():
        del run["update"]
    import diffusers
    import peft

    report = {
        "what": "train.fp8_base against the bf16 base, the same steps (benchmarks/fp8_loss_curve.py)",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
        "profile": args.profile, "size": "%dx%d" % size, "text_tokens": text, "steps": args.steps,
        "samples": args.samples, "runs": runs, "comparison": comparison, "seconds": time.perf_counter() - began,
    }
    with open(args.json, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {args.json} ({report['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
