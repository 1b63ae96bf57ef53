"""FLUX.1-dev-size generation speed: ArtMaster's generation loop against a plain FluxPipeline call.

Builds FLUX.1-dev with random bf16 weights (`model=flux_dev_random`: transformer, VAE, CLIP and
T5-XXL; random weights cost what the real ones cost), writes a random rank-8 LoRA on the 418-module
set in the train stage's export format and loads it (`generate.load_adapter`), then generates
512x512 images in 28 steps and times:

- plain: a plain diffusers call per image, `pipe(prompt=..., height, width, num_inference_steps,
  guidance_scale, generator)`: the pipeline's defaults otherwise (T5 at 512 tokens, prompt encoded
  on every call), the LoRA as loaded, eager
- one_per_call: `artmaster.generate.generate_images` one image per call, the prompt encoded per call
  at `model.max_sequence_length` (128), LoRA as loaded, eager (the augment stage at
  `augment.generation.batch_size=1` without `model.fuse_lora`)
- one_per_call_compiled: the same with `model.compile` (regional torch.compile of the blocks)
- batched: `generate_images` with `augment.generation.batch_size` of experiment=artmaster_flux (4)
  and a shared embedding cache (eager, LoRA as loaded)
- batched_fused: + the LoRA folded into the weights (`pipe.fuse_lora()`, what
  `artmaster.generate.load_adapter(fuse=True)` does before it drops the LoRA layers)
- batched_fused_compiled: + regional torch.compile: how the augment stage paints its originals
  under experiment=artmaster_flux (`augment.Workers.paint_originals`)

Rows run in this order (one_per_call_compiled last, after the LoRA is unfused again); a row starts only
while --budget seconds remain. Each row: one untimed call (or batch) first, then --images images
(--images-b1 for the one-image-per-call rows). Prints images/s and the ratio to `plain`; writes
JSON after every row.

    python benchmarks/generate.py --json generate.json                          # one GPU
    python benchmarks/generate.py --rows plain,batched_fused_compiled --json g.json
    python benchmarks/generate.py --profile tiny --device cpu --json /tmp/g.json  # seconds, on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import re
import tempfile
import time
from pathlib import Path

import torch

from artmaster import models
from artmaster.adalora import ExportedLora, save_lora, target_modules_regex
from artmaster.config import compose
from artmaster.generate import generate_images, load_adapter

PROFILES = {
    "flux": {"overrides": ["model=flux_dev_random"], "size": 512, "steps": 28, "images": 8, "images_b1": 4},
    "tiny": {"overrides": ["model=tiny"], "size": 128, "steps": 4, "images": 4, "images_b1": 2},
}


def random_lora(transformer, target: str, rank: int, folder: Path) -> int:
    """A random plain LoRA on every module the target preset matches, saved like the train stage
    exports it (diffusers format, float32); returns the module count."""
    pattern = re.compile(target_modules_regex(target))
    generator = torch.Generator().manual_seed(0)
    lora_A, lora_B, ranks, out_features = {}, {}, {}, {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            out_features[name] = module.out_features
            if pattern.fullmatch(name):
                lora_A[name] = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
                lora_B[name] = 0.01 * torch.randn(module.out_features, rank, generator=generator)
                ranks[name] = rank
    save_lora(ExportedLora(lora_A, lora_B, ranks, out_features), folder, base_model="random",
              trigger="zxh style", metadata={}, kohya=False)
    return len(ranks)


def graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="flux")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default="generate.json")
    parser.add_argument("--images", type=int, help="timed images per batched row (a multiple of augment.generation.batch_size)")
    parser.add_argument("--images-b1", type=int, help="timed images per one-image-per-call row")
    parser.add_argument("--steps", type=int, help="denoising steps (default 28)")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds: no row starts after this")
    parser.add_argument("--compile-on-cpu", action="store_true")
    parser.add_argument("--rows", help="comma-separated row names to run (default: all)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_args()
    began = time.perf_counter()
    profile = PROFILES[args.profile]
    cfg = compose(["experiment=artmaster_flux", *profile["overrides"], f"model.device={args.device}",
                   "model.compile=false", *args.overrides])
    device = torch.device(models.resolve_device(cfg.model))
    size, steps = profile["size"], args.steps or profile["steps"]
    count = args.images or profile["images"]
    count_b1 = args.images_b1 or profile["images_b1"]
    guidance = float(cfg.augment.generation.guidance)
    max_len = int(cfg.model.max_sequence_length)
    prompts = [str(p) for p in cfg.augment.prompts]
    can_compile = device.type == "cuda" or args.compile_on_cpu
    batch = int(cfg.augment.generation.batch_size)
    seeds = list(range(1000, 1000 + max(count, batch) + batch))

    pipe = models.build_random_pipeline(cfg.model)  # with CLIP and T5: the plain call encodes prompts
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as folder:
        modules = random_lora(pipe.transformer, str(cfg.train.adalora.target_modules),
                              int(cfg.train.adalora.target_r), Path(folder))
        load_adapter(pipe, folder, fuse=False)  # as augment.Workers.pipe loads it
    report = {
        "what": "FLUX.1-dev-size generation, artmaster.generate vs a plain FluxPipeline call (benchmarks/generate.py)",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "profile": args.profile, "width": size, "height": size, "steps": steps,
        "guidance": guidance, "lora_modules": modules, "lora_rank": int(cfg.train.adalora.target_r),
        "artmaster_text_tokens": max_len, "plain_text_tokens": 512, "timed_images": count,
        "rows": [], "skipped": [], "errors": [],
    }

    def plain(indices):
        for i in indices:
            pipe(prompt=prompts[i % len(prompts)], height=size, width=size, num_inference_steps=steps,
                 guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seeds[i]))

    def one_per_call(indices):  # no shared embedding cache
        for i in indices:
            generate_images(pipe, [prompts[i % len(prompts)]], [seeds[i]], batch_size=1, height=size, width=size,
                            steps=steps, guidance=guidance, max_sequence_length=max_len)

    cache: dict = {}
    state = {"fused": False}

    def batched(indices):
        indices = list(indices)
        generate_images(pipe, [prompts[i % len(prompts)] for i in indices], [seeds[i] for i in indices],
                        batch_size=batch, height=size, width=size, steps=steps, guidance=guidance,
                        max_sequence_length=max_len, embedding_cache=cache)

    def fuse():
        if not state["fused"]:
            pipe.fuse_lora()
            state["fused"] = True

    # (name, function, untimed warm-up indices, compile?, setup before the row)
    def unfuse():
        if state["fused"]:
            pipe.unfuse_lora()
            state["fused"] = False

    # (name, function, untimed warm-up indices, compile mode or None, setup before the row). The LoRA
    # is fused in place (pipe.fuse_lora, what load_adapter(fuse=True) does before it drops the
    # LoRA layers) and unfused again for the rows after.
    plan = [
        ("plain", plain, range(1), None, None),
        ("one_per_call", one_per_call, range(1), None, None),
        ("batched", batched, range(batch), None, None),
        ("batched_fused", batched, range(batch), None, fuse),
        ("batched_fused_compiled", batched, range(batch), "default", fuse),
        ("one_per_call_compiled", one_per_call, range(2), "default", unfuse),
    ]
    # (Compiling the blocks with CUDA graphs, mode reduce-overhead, fails for inference: the blocks
    # share one graph and the next block's replay overwrites the output the residual still reads.)
    if args.rows:
        wanted = args.rows.split(",")
        plan = [entry for entry in plan if entry[0] in wanted]
    print(f"{report['device']}, torch {torch.__version__}; {modules} LoRA modules; {size}x{size}, {steps} steps")
    for name, run, warm, mode, setup in plan:
        compiled = mode is not None
        single = run is not batched
        timed = count_b1 if single else count
        elapsed = time.perf_counter() - began
        expected = 75.0 if compiled and device.type == "cuda" else 20.0
        if elapsed + expected > args.budget:
            report["skipped"].append(f"{name} (budget: {elapsed:.0f}s used of {args.budget:.0f}s)")
            print(f"skip {name}: budget")
            continue
        print(f"[{elapsed:5.0f}s] {name}", flush=True)
        try:
            if setup is not None:
                setup()
            if compiled and can_compile:
                models.compile_blocks(pipe.transformer, **({} if mode == "default" else {"mode": mode}))
            else:
                models.uncompile_blocks(pipe.transformer)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            started = time.perf_counter()
            run(warm)
            sync(device)
            warm_seconds = time.perf_counter() - started
            graphs = graph_count()
            started = time.perf_counter()
            run(range(batch, batch + timed))
            sync(device)
            seconds = time.perf_counter() - started
            graphs = graph_count() - graphs
        except Exception as error:
            import traceback

            traceback.print_exc()
            report["errors"].append(f"{name}: {type(error).__name__}: {error}"[:2000])
            gc.collect()
            continue
        row = {"name": name, "compiled": compiled and can_compile, "mode": mode, "images": timed,
               "batch_size": 1 if single else batch, "fused": state["fused"], "seconds": seconds,
               "images_per_second": timed / seconds, "seconds_per_image": seconds / timed,
               "warmup_seconds": warm_seconds, "warmup_images": len(warm), "graphs_compiled_while_timed": graphs,
               "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
        report["rows"].append(row)
        base = report["rows"][0] if report["rows"][0]["name"] == "plain" else None
        for r in report["rows"]:
            r["vs_plain"] = r["images_per_second"] / base["images_per_second"] if base else None
        report["seconds_total"] = time.perf_counter() - began
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"    {row['images_per_second']:.3f} images/s, warm-up {warm_seconds:.1f}s", flush=True)

    print()
    print(f"{'row':<24} {'comp':>4} {'images/s':>9} {'s/image':>8} {'vs plain':>8} {'peak GB':>7} {'warm s':>7}")
    for r in report["rows"]:
        ratio = f"{r['vs_plain']:.2f}x" if r.get("vs_plain") else "-"
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        print(f"{r['name']:<24} {'y' if r['compiled'] else 'n':>4} {r['images_per_second']:>9.3f} "
              f"{r['seconds_per_image']:>8.3f} {ratio:>8} {peak:>7} {r['warmup_seconds']:>7.1f}")
    for line in report["errors"]:
        print("ERROR", line[:300])
    report["seconds_total"] = time.perf_counter() - began
    with open(args.json, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {args.json} ({report['seconds_total']:.0f}s)")


if __name__ == "__main__":
    main()
