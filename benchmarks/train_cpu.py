"""Demo training speed on this CPU: the train stage's own `training_step`, timed.

Composes the demo experiment (tiny profile, `train.*` as the stage runs it), builds the tiny
transformer (random weights: the cost does not depend on them), fills an encodings table with
random latents and text embeddings at the demo's bucket sizes (crop buckets x train.image_scale),
plans the batches exactly as the stage does, and times optimizer steps (forward, backward, clip,
AdamW, schedule, AdaLoRA allocation) at the start of the schedule, where the allocator does the most
work. Prints steps/s, samples/s, the demo's projected loop time and peak memory (RSS), and writes JSON.

    python benchmarks/train_cpu.py
    python benchmarks/train_cpu.py --steps 100 --json train_cpu.json train.batch_size=1
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from collections import defaultdict

import torch
from accelerate import Accelerator

from artmaster import dataset, runtime
from artmaster.config import compose
from artmaster.models import build_random_pipeline
from artmaster.training.batches import keyed_generator, make_batch, optimizer_steps, process_batches
from artmaster.training.state import build_training_state
from artmaster.training.step import training_step


def synthetic_encodings(cfg, crops_per_bucket: int) -> tuple[dict, dict]:
    """Random encodings shaped like the cache's, per enabled crop bucket at train.image_scale."""
    arch = cfg.model.architecture
    generator = torch.Generator().manual_seed(0)
    encodings, ids_by_size = {}, defaultdict(list)
    for name, bucket in cfg.crop.buckets.items():
        if not bucket.enabled:
            continue
        width, height = dataset.scaled_size(bucket.width, bucket.height, float(cfg.train.image_scale))
        latent_shape = (arch.vae.latent_channels, height // 8, width // 8)
        for index in range(crops_per_bucket):
            sample_id = f"{name}-{index}"
            encodings[sample_id] = {
                "latent_mean": torch.randn(latent_shape, generator=generator),
                "latent_std": torch.full(latent_shape, 0.05),
                "prompt_embeds": torch.randn(cfg.model.max_sequence_length, arch.transformer.joint_attention_dim,
                                             generator=generator),
                "pooled_prompt_embeds": torch.randn(arch.transformer.pooled_projection_dim, generator=generator),
            }
            ids_by_size[(width, height)].append(sample_id)
    return encodings, dict(ids_by_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--crops-per-bucket", type=int, default=32, help="synthetic crops per bucket (demo: ~32)")
    parser.add_argument("--json", default="train_cpu.json", help="where to write the result")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: experiment=demo)")
    args = parser.parse_args()

    cfg = compose(["experiment=demo", *args.overrides])
    runtime.apply(cfg.runtime)
    accelerator = Accelerator(cpu=True, mixed_precision=str(cfg.train.mixed_precision))
    pipe = build_random_pipeline(cfg.model, with_text_encoders=False)
    encodings, ids_by_size = synthetic_encodings(cfg, args.crops_per_bucket)
    accumulation = int(cfg.train.gradient_accumulation)
    plan = process_batches(ids_by_size, epochs=int(cfg.train.epochs), repeats=int(cfg.train.repeats),
                                 batch_size=int(cfg.train.batch_size), world_size=1, process_index=0,
                                 seed=int(cfg.seed))
    total_step = optimizer_steps(len(plan), accumulation)
    state = build_training_state(cfg, pipe.transformer, pipe.vae.config, total_step, accelerator)

    durations, samples = [], 0
    for step in range(1, args.warmup + args.steps + 1):
        ids = plan[(step - 1) * accumulation: step * accumulation]
        batches = [make_batch(encodings, micro) for micro in ids]
        generators = [keyed_generator(cfg.seed, "step", 0, step, i) for i in range(accumulation)]
        started = time.perf_counter()
        out = training_step(state, batches, step, generators)
        float(out["loss"])  # wait for the step (a no-op on CPU, kept for parity with GPU timing)
        if step > args.warmup:
            durations.append(time.perf_counter() - started)
            samples += sum(len(micro) for micro in ids)

    seconds = sum(durations)
    result = {
        "what": "train_cpu: artmaster.training.step.training_step, demo experiment, tiny profile",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "buckets": {f"{w}x{h}": len(v) for (w, h), v in ids_by_size.items()},
        "batch_size": int(cfg.train.batch_size),
        "gradient_accumulation": accumulation,
        "adapted_modules": sum(1 for n, _ in state.named_params if ".lora_E." in n),
        "timed_steps": len(durations),
        "steps_per_second": len(durations) / seconds,
        "samples_per_second": samples / seconds,
        "median_step_ms": 1000 * statistics.median(durations),
        "demo_total_step": total_step,
        "demo_loop_seconds_projected": total_step * seconds / len(durations),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(f"{'metric':<28} value")
    for key in ("steps_per_second", "samples_per_second", "median_step_ms", "demo_total_step",
                "demo_loop_seconds_projected", "peak_rss_mb", "threads", "adapted_modules"):
        value = result[key]
        print(f"{key:<28} {value:.2f}" if isinstance(value, float) else f"{key:<28} {value}")
    with open(args.json, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
