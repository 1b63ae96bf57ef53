"""Time peft's per-module AdaLoRA loops against artmaster.adalora's batched versions.

A FLUX.1-dev-size adapter set (conf `model=flux_dev_random`, `train.adalora`: 418 modules at
init_r 12, fp32) with random factors and gradients; the base transformer stays on the meta device,
so this needs no weights and little memory (about 3 GB at full size: two copies). Rows:
- importance update: what every optimizer step pays (`update_and_allocate` before the budget phase)
- update + masking: a step of the budget phase that re-allocates ranks (every delta_t steps)
- orthogonal term: the regulariser's forward and backward (peft's loop as AdaLoraModel.forward runs it)
  against orthogonal_penalty's, and against add_orthogonal_gradient_ (the gradient without autograd)
Before timing, both allocators run the same steps on the same tensors and the script checks that
their statistics and masks agree. On CUDA it also checks that the per-step path never syncs.

    python benchmarks/adalora_ops.py                   # full size; CUDA when available
    python benchmarks/adalora_ops.py --quick           # 2 double + 4 single blocks (a CPU smoke run)
    python benchmarks/adalora_ops.py train.adalora.init_r=16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types

import torch
from diffusers import FluxTransformer2DModel
from omegaconf import OmegaConf
from peft.tuners.adalora import AdaLoraLayer

from artmaster import adalora
from artmaster.config import compose

TOTAL_STEP = 1000  # schedule length used to place the timed steps; does not change their cost
QUICK = ["model.architecture.transformer.num_layers=2", "model.architecture.transformer.num_single_layers=4"]


def adapter_model(cfg, device: torch.device):
    """AdaLoRA around a meta-device FLUX transformer, adapter tensors materialised on `device`."""
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**OmegaConf.to_container(cfg.model.architecture.transformer))
    model = adalora.wrap_with_adalora(transformer, cfg.train.adalora, TOTAL_STEP)
    g = torch.Generator(device).manual_seed(0)
    for module in model.modules():
        if isinstance(module, AdaLoraLayer):
            for role in adalora.ROLES:
                shape = getattr(module, role)["default"].shape
                param = torch.nn.Parameter(0.02 * torch.randn(shape, generator=g, device=device))
                param.grad = 1e-3 * torch.randn(shape, generator=g, device=device)
                getattr(module, role)["default"] = param
            module.ranknum["default"] = torch.nn.Parameter(
                torch.full((1,), float(cfg.train.adalora.init_r), device=device), requires_grad=False)
    return model


def timed(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median wall time of fn() in ms, device work included."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def peft_orthogonal_backward(model, device: torch.device) -> None:
    """peft's own orthogonal-term loop (AdaLoraModel.forward adds it to outputs.loss, here over a
    stand-in forward whose loss is zero), then backward."""
    tuner = model.base_model
    tuner.model.forward = lambda: types.SimpleNamespace(loss=torch.zeros((), device=device))
    tuner().loss.backward()


def check_agreement(peft_model, allocator, mask_step: int) -> dict:
    """Run both allocators through the same steps on identical copies; compare what they keep."""
    peft_tuner = peft_model.base_model
    for step in (1, 2, mask_step):
        peft_tuner.update_and_allocate(step)
        allocator.update_and_allocate(step)
    ours = allocator.statistics()
    theirs = peft_tuner.rankallocator
    worst = max(
        (ours[key][name] - value).abs().max().item()
        for key, per_name in (("ipt", theirs.ipt), ("exp_avg_ipt", theirs.exp_avg_ipt),
                              ("exp_avg_unc", theirs.exp_avg_unc))
        for name, value in per_name.items()
    )
    peft_pattern = peft_model.peft_config["default"].rank_pattern
    differing = sum(a != b for name, row in peft_pattern.items()
                    for a, b in zip(row, allocator.rank_pattern[name]))
    return {"max_statistic_difference": worst, "mask_entries_differing": differing,
            "mask_entries": sum(len(row) for row in peft_pattern.values())}


def check_no_sync(allocator, step: int) -> str:
    """CUDA only: run one step with PyTorch's sync debug mode set to error."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        allocator.update_and_allocate(step)
        return "none"
    except RuntimeError as err:
        return f"synced: {str(err).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 double + 4 single blocks instead of 19 + 38")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ (model=flux_dev_random is set)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = compose(["model=flux_dev_random", *(QUICK if args.quick else []), *args.overrides])

    # identical copies: peft's masking writes lora_E, which would change the other's next update
    peft_model, model = adapter_model(cfg, device), adapter_model(cfg, device)
    allocator = adalora.FastRankAllocator(model)
    config = model.peft_config["default"]
    update_step = 1  # inside the warm-up: importance update only
    mask_step = config.tinit + config.deltaT - (config.tinit % config.deltaT)  # first re-allocation
    layout = allocator.layout
    adapter_params = sum(p.numel() for role in adalora.ROLES for p in layout.params(role))

    agreement = check_agreement(peft_model, allocator, mask_step)
    syncs = {}
    if device.type == "cuda":
        syncs = {"importance update": check_no_sync(allocator, update_step),
                 "update + masking": check_no_sync(allocator, mask_step)}

    def ours_orthogonal():
        adalora.orthogonal_penalty(model).backward()

    rows = {
        "importance update": (lambda: peft_model.base_model.update_and_allocate(update_step),
                              lambda: allocator.update_and_allocate(update_step)),
        "update + masking": (lambda: peft_model.base_model.update_and_allocate(mask_step),
                             lambda: allocator.update_and_allocate(mask_step)),
        "orthogonal term fwd+bwd": (lambda: peft_orthogonal_backward(peft_model, device), ours_orthogonal),
        "orthogonal gradient added": (lambda: peft_orthogonal_backward(peft_model, device),
                                      lambda: adalora.add_orthogonal_gradient_(model, 0.1)),
    }
    results = {}
    for name, (peft_fn, ours_fn) in rows.items():
        peft_ms = timed(peft_fn, device, args.repeats)
        ours_ms = timed(ours_fn, device, args.repeats)
        results[name] = {"peft_ms": peft_ms, "ours_ms": ours_ms, "speedup": peft_ms / ours_ms}

    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({threads} threads)"
    groups = {role: len(layout.groups[role]) for role in adalora.ROLES}
    print(f"AdaLoRA ops: {len(layout.names)} modules, init_r {cfg.train.adalora.init_r}, "
          f"{adapter_params / 1e6:.1f}M fp32 adapter parameters in {groups} shape groups; {device_name}, "
          f"torch {torch.__version__}, median of {args.repeats}")
    print(f"agreement with peft: {agreement}")
    if syncs:
        print(f"host syncs in our per-step path: {syncs}")
    print(f"| {'operation':<26} | {'peft ms':>9} | {'batched ms':>10} | {'speedup':>7} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 12}|{'-' * 9}|")
    for name, row in results.items():
        print(f"| {name:<26} | {row['peft_ms']:>9.2f} | {row['ours_ms']:>10.2f} | {row['speedup']:>6.1f}x |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"modules": len(layout.names), "init_r": cfg.train.adalora.init_r,
                       "adapter_parameters": adapter_params, "device": device_name,
                       "torch": torch.__version__, "repeats": args.repeats, "agreement": agreement,
                       "host_syncs": syncs, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
