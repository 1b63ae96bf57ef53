"""FLUX.1-dev-size training speed: the `train` stage's own optimizer step against a
diffusers-example-style step, timed on one GPU in the same process.

Builds the full FLUX.1-dev transformer with random bf16 weights (`model=flux_dev_random`, no text
encoders: the stage caches encodings and frees them), feeds random tensors shaped like the cached
encodings (VAE posterior at 512x512 / 512x768, T5 embeddings at the recipe's 128 tokens and at 512)
and times, batch 1 unless noted, in the budget phase of a 6000-step AdaLoRA schedule (importance
update every step, a rank re-allocation every delta_t steps):

- reference: the step of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py at its
  defaults: peft LoRA r=12 (alpha 12, gaussian init) added with `transformer.add_adapter` on the
  example's 12 target-module suffixes (342 modules at FLUX.1-dev size), bf16 weights and bf16
  LoRA weights under accelerate's bf16 autocast, eager (no compile), torch AdamW (not fused),
  clip 1.0; the same flow-matching loss as ours. With `-ckpt`: the example's
  --gradient_checkpointing. `reference_418`: the same on our 418-module set (same modules as ours).
- adalora: `artmaster.training.step.training_step` as `experiment=artmaster_flux` composes it (the
  recipe: AdaLoRA init_r 12 -> target_r 8 on the 418-module set, bf16 weights, fp32 adapters,
  LoRA branch in bf16 with shared down-projections, regional compile with CUDA graphs, fused AdamW,
  `FastRankAllocator`, direct orthogonal gradient); `-ckpt` adds gradient checkpointing.
- lora: plain peft LoRA at r = init_r on the same modules with the recipe's levers and optimizer
  (no allocator, no orthogonal term): what AdaLoRA's overhead is measured against.
- lever rows, each the recipe with one lever changed (Row.overrides): adalora_no_cudagraphs,
  adalora_fp32_branch (peft's fp32 branch, no shared GEMM, no CUDA graphs: the recipe before
  issue 14), adalora_unshared (no shared down-projection), adalora_half_ckpt (checkpointing of half
  the blocks), adalora_b2 (batch 2: samples/s), base_floor (the frozen model alone, eager),
  adalora_fp8 (the frozen base GEMMs in FP8, `train.fp8_base`, at each shape; its effect on
  the loss curve: benchmarks/fp8_loss_curve.py).

Rows run in the order of `rows_for` (most telling first) while --budget seconds remain, in one
process: a row reuses the compiled blocks of an earlier row with the same levers and shape; --only
KEY,... picks rows by `Row.key` (e.g. adalora-512x512-t128-ckpt) and runs them in the order given.
Model FLOPs per step count the frozen model's forward and input-gradient backward (no recompute;
adaLN/norm and embedder linears act on one vector per sample, image-stream weights on image
tokens, text-stream weights on text tokens, single blocks on all tokens; attention 4 L^2 d per
layer forward, 3x that forward + backward); MFU divides them by the bf16 matmul rate measured in
the same run. Prints a table with each row's speed-up over the reference at its shape, writes JSON
after every row (a run cut short keeps what it measured).

    python benchmarks/train_step.py --json train_step.json                 # one GPU, FLUX.1-dev size
    python benchmarks/train_step.py --only reference-512x512-t128,adalora-512x512-t128 --profile-dir prof
    python benchmarks/train_step.py --profile tiny --device cpu --json /tmp/t.json   # seconds, on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from artmaster import float8, flux_math, lora_branch, models
from artmaster.adalora import adalora_schedule, target_modules_regex
from artmaster.config import compose
from artmaster.training.batches import keyed_generator, make_batch, on_device
from artmaster.training.state import build_training_state, compile_for_training, flow_settings
from artmaster.training.step import flow_matching_loss, training_step

GB = 1e9
PROFILES = {
    # sizes in pixels (width, height); text lengths in T5 tokens (the recipe's, then the T5 maximum)
    "flux": {"overrides": ["model=flux_dev_random"], "sizes": [(512, 512), (512, 768)], "text": [None, 512],
             "warmup": 3, "steps": 10},
    "tiny": {"overrides": ["model=tiny"], "sizes": [(128, 128), (128, 192)], "text": [None, 128],
             "warmup": 2, "steps": 4},
}
# diffusers' examples/dreambooth/train_dreambooth_lora_flux.py: default `--lora_layers` (suffixes)
EXAMPLE_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                   "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                   "ff_context.net.2"]


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # reference | adalora | lora | base
    size: tuple[int, int]
    text_tokens: int
    checkpointing: bool = False
    overrides: tuple[str, ...] = ()  # config keys set on top of the recipe, "key=value" (YAML values)
    example_targets: bool = True  # reference rows: the example's target modules (else our 418)
    batch: int = 1
    recipe: bool = False  # exactly the recipe's step: the only rows `recipe_minutes` uses
    profile: bool = False  # also profile two steps: GPU kernel time against the step's wall time

    @property
    def key(self) -> str:
        width, height = self.size
        return (f"{self.name}-{width}x{height}-t{self.text_tokens}{'-ckpt' if self.checkpointing else ''}"
                f"{f'-b{self.batch}' if self.batch > 1 else ''}")


def rows_for(sizes, text_lengths) -> list[Row]:
    """Every row, most telling first; select with --only KEY,KEY (Row.key)."""
    (square, portrait), (short, long) = sizes, text_lengths
    shapes = [(square, short), (portrait, short), (square, long)]
    no_graphs = ("train.cudagraphs=false",)
    return [
        *(Row("reference", "reference", size, text) for size, text in shapes),
        *(Row("adalora", "adalora", size, text, recipe=True, profile=(size, text) == (square, short))
          for size, text in shapes),
        *(Row("reference", "reference", size, text, checkpointing=True) for size, text in shapes),
        Row("lora", "lora", square, short, profile=True),  # AdaLoRA's extra kernel time against its extra host time
        Row("reference_418", "reference", square, short, example_targets=False),
        Row("reference_418", "reference", square, short, checkpointing=True, example_targets=False),
        Row("adalora_no_cudagraphs", "adalora", square, short, overrides=no_graphs),
        # with checkpointing the recipe compiles without CUDA graphs (compile_for_training)
        Row("adalora", "adalora", square, short, checkpointing=True, recipe=True),
        Row("adalora_fp32_branch", "adalora", square, short, overrides=(
            *no_graphs, "train.lora_branch.precision=float32", "train.lora_branch.shared_down=false")),
        Row("adalora", "adalora", portrait, short, checkpointing=True, recipe=True),
        Row("adalora", "adalora", square, long, checkpointing=True, recipe=True),
        Row("adalora_unshared", "adalora", square, short, overrides=("train.lora_branch.shared_down=false",)),
        Row("adalora_half_ckpt", "adalora", square, short, checkpointing=True,
            overrides=("train.gradient_checkpointing_fraction=0.5",)),
        Row("adalora_b2", "adalora", square, short, batch=2),
        Row("base_floor", "base", square, short),
        *(Row("adalora_fp8", "adalora", size, text, overrides=("train.fp8_base=true",),
              profile=(size, text) == (square, short)) for size, text in shapes),
    ]


# --- model FLOPs and the matmul rate -------------------------------------------------------------


def model_flops(arch, image_tokens: int, text_tokens: int, batch: int = 1) -> float:
    """Forward + input-gradient backward FLOPs of the frozen FluxTransformer2DModel (see module doc)."""
    d = arch.num_attention_heads * arch.attention_head_dim
    layers = arch.num_layers + arch.num_single_layers
    tokens = image_tokens + text_tokens
    # per block and token: attention projections 4d^2 + MLP 8d^2 (double, per stream) or
    # q,k,v 3d^2 + proj_mlp 4d^2 + proj_out 5d^2 (single): 12 d^2 multiply-adds either way
    linear = 2 * 12 * d * d * layers * tokens
    embed = 2 * d * (2 * arch.in_channels * image_tokens + arch.joint_attention_dim * text_tokens)
    attention = 4 * tokens * tokens * d * layers
    return batch * (2 * (linear + embed) + 3 * attention)


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float | None:
    """bf16 n^3 matrix product rate on random data (TFLOP/s); None on the CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    rate = repeats * 2 * n**3 / (time.perf_counter() - start) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return rate


# --- one row -----------------------------------------------------------------------------------


def encodings_for(cfg, size: tuple[int, int], text_tokens: int, batch: int, device, dtype) -> dict:
    """Random tensors shaped like `batch` cached samples (`artmaster.training.encodings.build_cache`), on the device."""
    arch = cfg.model.architecture
    width, height = size
    generator = torch.Generator().manual_seed(0)
    latent_shape = (arch.vae.latent_channels, height // 8, width // 8)
    entries = {
        f"sample{i}": {
            "latent_mean": torch.randn(latent_shape, generator=generator),
            "latent_std": torch.full(latent_shape, 0.05),
            "prompt_embeds": torch.randn(text_tokens, arch.transformer.joint_attention_dim, generator=generator),
            "pooled_prompt_embeds": torch.randn(arch.transformer.pooled_projection_dim, generator=generator),
        }
        for i in range(batch)
    }
    return on_device(entries, device, dtype)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_accelerator(mixed_precision: str, device):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")


def _optimizer_and_schedule(settings, params, total_step: int, fused: bool):
    from diffusers.optimization import get_scheduler

    optim = settings.optim
    optimizer = torch.optim.AdamW(params, lr=float(optim.lr), betas=tuple(optim.betas),
                                  weight_decay=float(optim.weight_decay), eps=float(optim.eps), fused=fused)
    scheduler = get_scheduler(settings.lr_schedule.name, optimizer,
                              num_warmup_steps=round(float(settings.lr_schedule.warmup_fraction) * total_step),
                              num_training_steps=total_step)
    return optimizer, scheduler


def lora_state(cfg, transformer, vae_config, total_step: int, accelerator):
    """Plain LoRA at r = init_r on the same modules, with the recipe's levers (LoRA branch, compiled
    blocks, CUDA graphs), optimizer and schedule: the reference the AdaLoRA overhead is measured
    against (no allocator, no orthogonal term)."""
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model

    settings = cfg.train
    transformer.requires_grad_(False)
    if settings.gradient_checkpointing:
        models.enable_checkpointing(transformer, float(settings.gradient_checkpointing_fraction))
    set_seed(int(cfg.seed))
    ada = settings.adalora
    adapter = get_peft_model(transformer, LoraConfig(
        r=int(ada.init_r), lora_alpha=int(ada.lora_alpha), lora_dropout=float(ada.lora_dropout),
        target_modules=target_modules_regex(ada.target_modules), init_lora_weights="gaussian"))
    params = [param for param in adapter.parameters() if param.requires_grad]
    for param in params:
        param.data = param.data.float()
    on_cuda = all(p.is_cuda for p in params)
    lora_branch.configure(adapter, settings.lora_branch, on_cuda)
    compiled, cudagraphs = compile_for_training(cfg, transformer, on_cuda)
    optimizer, scheduler = _optimizer_and_schedule(settings, params, total_step, fused=on_cuda)
    model = accelerator.prepare(adapter)
    flow = flow_settings(cfg, transformer, vae_config, inputs_require_grad=compiled)
    max_norm = float(settings.optim.max_grad_norm) if settings.optim.max_grad_norm else float("inf")

    def step(index, batches, generators):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = flow_matching_loss(model, batches[0], flow, generators[0])
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach()}

    return adapter.unload, step, sum(p.numel() for p in params), compiled, cudagraphs


def reference_state(cfg, transformer, vae_config, total_step: int, accelerator, example_targets: bool):
    """diffusers' train_dreambooth_lora_flux.py step (module doc): `add_adapter` with the example's
    LoraConfig, LoRA weights in the model's dtype as the example leaves them under bf16, the forward
    under accelerate's bf16 autocast, eager, torch AdamW at its defaults (foreach), clip 1.0."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    torch.manual_seed(int(cfg.seed))
    targets = EXAMPLE_TARGETS if example_targets else target_modules_regex(cfg.train.adalora.target_modules)
    rank = int(cfg.train.adalora.init_r)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=targets))
    params = [param for param in transformer.parameters() if param.requires_grad]
    optimizer, scheduler = _optimizer_and_schedule(cfg.train, params, total_step, fused=False)
    flow = flow_settings(cfg, transformer, vae_config)

    def step(index, batches, generators):
        with accelerator.autocast():
            loss = flow_matching_loss(transformer, batches[0], flow, generators[0])
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach()}

    return transformer.unload_lora, step, sum(p.numel() for p in params)


def base_step(cfg, transformer, vae_config, accelerator):
    """The frozen transformer alone, eager: forward + backward to its input (no adapter, no optimizer)."""
    transformer.requires_grad_(False)
    flow = flow_settings(cfg, transformer, vae_config)

    def step(index, batches, generators):
        batch = batches[0]
        tokens = flux_math.pack_latents(batch.latent_mean).to(flow.model_dtype).requires_grad_(True)
        sigmas = torch.full((len(tokens),), 0.5, device=tokens.device)
        guidance = flux_math.guidance_vector(1.0, len(tokens), tokens.device)
        prediction = flux_math.predict_velocity(
            transformer, tokens, sigmas, prompt_embeds=batch.prompt_embeds,
            pooled_prompt_embeds=batch.pooled_prompt_embeds, image_ids=batch.image_ids,
            txt_ids=batch.txt_ids, guidance=guidance)
        loss = prediction.float().pow(2).mean()
        loss.backward()
        return {"loss": loss.detach()}

    return step


def dynamo_counts() -> dict:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def host_syncs(step_fn, args) -> int:
    """Synchronising CUDA calls in one step (torch's sync debug mode counts them as warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step_fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def profile_steps(step_fn, args, first: int, seconds: float, folder, key: str, steps: int = 2) -> dict:
    """GPU kernel time per step against the measured step time: a step whose kernels keep the GPU
    busy for much less than its wall time is bound by the host (Python, dispatch, launches)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for index in range(first, first + steps):
            step_fn(*args(index))
        torch.cuda.synchronize()
    averages = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_seconds = sum(e.device_time_total for e in kernels) / 1e6 / steps
    if folder:
        with open(f"{folder}/profile-{key}.txt", "w", encoding="utf-8") as handle:
            handle.write(averages.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))
            handle.write("\n")
            handle.write(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    return {"gpu_kernel_seconds_per_step": kernel_seconds, "gpu_busy_fraction": kernel_seconds / seconds,
            "kernels_per_step": len(kernels) / steps}


def recipe_config(profile: dict, device_name: str, overrides: list[str]):
    """`experiment=artmaster_flux` at the profile's size on the device: (cfg, torch device); fp32 on a CPU."""
    cfg = compose(["experiment=artmaster_flux", *profile["overrides"], f"model.device={device_name}", *overrides])
    device = torch.device(models.resolve_device(cfg.model))  # also keeps cuDNN SDPA off on CUDA
    if device.type == "cpu" and cfg.model.dtype != "float32":
        cfg.model.dtype = "float32"
    return cfg, device


def bare_transformer(cfg):
    """The transformer with random weights, without text encoders (the stage caches encodings and
    frees them), and the VAE's latent shift and scale the loss needs."""
    pipe = models.build_random_pipeline(cfg.model, with_text_encoders=False)
    vae = pipe.vae.config
    vae_config = SimpleNamespace(shift_factor=vae.shift_factor, scaling_factor=vae.scaling_factor)
    transformer = pipe.transformer
    del pipe
    gc.collect()
    return transformer, vae_config


def undo_levers(transformer) -> None:
    """Undo what building a training state did to the transformer's own modules (the FP8 base,
    the compiled blocks), so the next row or run starts from the bare transformer."""
    float8.use_original_base(transformer)
    models.uncompile_blocks(transformer)


def row_config(row: Row, base_cfg):
    """The recipe's config with the row's checkpointing and overrides."""
    import yaml

    cfg = OmegaConf.create(OmegaConf.to_container(base_cfg, resolve=True))
    cfg.train.gradient_checkpointing = row.checkpointing
    for override in row.overrides:
        key, value = override.split("=", 1)
        OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
    return cfg


def run_row(row: Row, ctx: SimpleNamespace, warmup: int, steps: int, count_syncs: bool) -> dict:
    cfg = row_config(row, ctx.cfg)
    device, transformer = ctx.device, ctx.transformer
    transformer.disable_gradient_checkpointing()
    models.uncompile_blocks(transformer)
    gc.collect()
    if device.type == "cuda":
        # free the last row's CUDA-graph pools; compiled code stays cached, so a row whose blocks,
        # levers and shape an earlier row compiled reuses it (its first step shows no compiling)
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    mixed = "bf16" if row.kind == "reference" and device.type == "cuda" else str(cfg.train.mixed_precision)
    accelerator = fresh_accelerator(mixed, device)
    unload, trainable, compiled, cudagraphs, state = None, 0, False, False, None
    if row.kind == "adalora":
        state = build_training_state(cfg, transformer, ctx.vae_config, ctx.total_step, accelerator,
                                     keep_original_base=True)
        unload, trainable = state.adapter.unload, sum(p.numel() for p in state.params)
        compiled, cudagraphs = state.compiled, state.cudagraphs

        def step_fn(index, batches, generators):
            return training_step(state, batches, index, generators)
    elif row.kind == "lora":
        unload, step_fn, trainable, compiled, cudagraphs = lora_state(
            cfg, transformer, ctx.vae_config, ctx.total_step, accelerator)
    elif row.kind == "reference":
        unload, step_fn, trainable = reference_state(cfg, transformer, ctx.vae_config, ctx.total_step, accelerator,
                                                     row.example_targets)
    else:
        step_fn = base_step(cfg, transformer, ctx.vae_config, accelerator)
    encodings = encodings_for(cfg, row.size, row.text_tokens, row.batch, device, transformer.dtype)
    batches = [make_batch(encodings, sorted(encodings))]
    first = ctx.tinit + 1  # the budget phase: importance update every step, masking every delta_t

    def args(index):
        return index, batches, [keyed_generator(cfg.seed, "step", 0, index, 0, device=device)]

    graphs_before = dynamo_counts()
    sync(device)
    started = time.perf_counter()
    step_fn(*args(first))
    sync(device)
    first_step = time.perf_counter() - started
    for index in range(first + 1, first + warmup):
        step_fn(*args(index))
    sync(device)
    started = time.perf_counter()
    for index in range(first + warmup, first + warmup + steps):
        out = step_fn(*args(index))
    sync(device)
    seconds = (time.perf_counter() - started) / steps
    loss = float(out["loss"])
    syncs = host_syncs(step_fn, args(first + warmup + steps)) if count_syncs and device.type == "cuda" else None
    profile = None
    if row.profile and device.type == "cuda":
        try:
            profile = profile_steps(step_fn, args, first + warmup + steps + 1, seconds, ctx.profile_dir, row.key)
        except Exception as error:  # the timing above stands without it
            profile = {"error": f"{type(error).__name__}: {error}"[:500]}
    graphs_after = dynamo_counts()
    width, height = row.size
    image_tokens = (width // 16) * (height // 16)
    flops = model_flops(cfg.model.architecture.transformer, image_tokens, row.text_tokens, row.batch)
    branch = cfg.train.get("lora_branch", {})
    result = {
        **asdict(row), "key": row.key, "size": f"{width}x{height}", "compiled": compiled, "cudagraphs": cudagraphs,
        "lora_branch": OmegaConf.to_container(branch) if row.kind in ("adalora", "lora") else None,
        "seconds_per_step": seconds, "steps_per_second": 1 / seconds, "samples_per_second": row.batch / seconds,
        "first_step_seconds": first_step, "timed_steps": steps,
        "peak_gb": torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None,
        "model_tflop_per_step": flops / 1e12,
        "mfu": flops / seconds / (ctx.matmul_tflops * 1e12) if ctx.matmul_tflops else None,
        "loss": loss, "finite": bool(torch.isfinite(torch.tensor(loss))), "trainable_params": trainable,
        "host_syncs_per_step": syncs, "profile": profile,
        "new_graphs": graphs_after.get("unique_graphs", 0) - graphs_before.get("unique_graphs", 0),
        "graph_breaks": graphs_after.get("graph_breaks", 0),
    }
    # back to the bare transformer for the next row
    if unload is not None:
        unload()
    undo_levers(transformer)
    accelerator.free_memory()
    del step_fn, state
    gc.collect()
    return result


# --- report ------------------------------------------------------------------------------------


def reference_for(rows: list[dict], row: dict) -> dict | None:
    """The diffusers-example-style row (the example's targets) at the row's shape and checkpointing."""
    for candidate in rows:
        if (candidate["name"] == "reference" and candidate["size"] == row["size"]
                and candidate["text_tokens"] == row["text_tokens"] and candidate["checkpointing"] == row["checkpointing"]):
            return candidate
    return None


def targets(rows: list[dict], recipe_steps: int, short: int, sizes) -> dict:
    """Issue 14's targets from the rows measured so far: per shape, the recipe's speed-up over the
    reference and its peak against the reference's (on the example's and on our modules); AdaLoRA
    over plain LoRA; the 6000-step projection from the recipe rows only."""
    out: dict = {"shapes": {}}
    for row in rows:
        if not row["recipe"]:
            continue
        reference = reference_for(rows, row)
        same_modules = next((r for r in rows if r["name"] == "reference_418" and r["size"] == row["size"]
                             and r["text_tokens"] == row["text_tokens"]
                             and r["checkpointing"] == row["checkpointing"]), None)
        entry = {"seconds_per_step": row["seconds_per_step"], "peak_gb": row["peak_gb"]}
        if reference:
            entry.update(reference_seconds=reference["seconds_per_step"], reference_peak_gb=reference["peak_gb"],
                         speedup=reference["seconds_per_step"] / row["seconds_per_step"])
        if same_modules:
            entry["reference_418_peak_gb"] = same_modules["peak_gb"]
        out["shapes"][row["key"]] = entry
    adalora = next((r for r in rows if r["recipe"] and r["size"] == "%dx%d" % sizes[0]
                    and r["text_tokens"] == short and not r["checkpointing"]), None)
    lora = next((r for r in rows if r["kind"] == "lora" and not r["checkpointing"]), None)
    if adalora and lora:
        out["adalora_over_lora"] = adalora["seconds_per_step"] / lora["seconds_per_step"]
    buckets = [next((r for r in rows if r["recipe"] and not r["checkpointing"] and r["text_tokens"] == short
                     and r["size"] == "%dx%d" % size), None) for size in sizes]
    if all(buckets):
        # half the steps in each bucket; compiling, validation, samples and checkpoints not included
        out["recipe_minutes_projected"] = recipe_steps * sum(r["seconds_per_step"] for r in buckets) / 2 / 60
    return out


def print_table(rows: list[dict]) -> None:
    header = (f"{'row':<22} {'size':<8} {'txt':>4} {'ckpt':>4} {'comp':>4} {'cg':>3} {'s/step':>7} {'samp/s':>7} "
              f"{'peak GB':>7} {'MFU':>6} {'vs ref':>6} {'1st s':>6}")  # vs ref: samples/s over the reference's
    print(header)
    print("-" * len(header))
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        reference = reference_for(rows, r)
        ratio = f"{r['samples_per_second'] / reference['samples_per_second']:.2f}x" if reference else "-"
        name = r["name"] + (f" b{r['batch']}" if r["batch"] > 1 else "")
        print(f"{name:<22} {r['size']:<8} {r['text_tokens']:>4} {'y' if r['checkpointing'] else 'n':>4} "
              f"{'y' if r['compiled'] else 'n':>4} {'y' if r['cudagraphs'] else 'n':>3} "
              f"{r['seconds_per_step']:>7.3f} {r['samples_per_second']:>7.2f} {peak:>7} {mfu:>6} {ratio:>6} "
              f"{r['first_step_seconds']:>6.1f}")


def write_report(report: dict, path: str, began: float) -> None:
    report["seconds"] = time.perf_counter() - began
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="flux")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default="train_step.json")
    parser.add_argument("--warmup", type=int, help="untimed steps per row (the first one compiles)")
    parser.add_argument("--steps", type=int, help="timed steps per row")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds: no row starts after this")
    parser.add_argument("--recipe-steps", type=int, default=6000, help="optimizer steps of the recipe")
    parser.add_argument("--only", help="comma-separated row keys to run, in this order (default: all), e.g. "
                        "reference-512x512-t128,adalora-512x512-t128")
    parser.add_argument("--profile-dir", help="write the profiled rows' top kernels here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_args()
    began = time.perf_counter()
    profile = PROFILES[args.profile]
    cfg, device = recipe_config(profile, args.device, args.overrides)
    torch._dynamo.config.recompile_limit = 64  # rows recompile the same blocks many times over
    short = int(cfg.model.max_sequence_length)
    text_lengths = [short if t is None else t for t in profile["text"]]
    warmup = args.warmup or profile["warmup"]
    steps = args.steps or profile["steps"]
    tinit, _ = adalora_schedule(cfg.train.adalora, args.recipe_steps)

    rate = matmul_tflops(device)
    transformer, vae_config = bare_transformer(cfg)
    params = sum(p.numel() for p in transformer.parameters())
    ctx = SimpleNamespace(cfg=cfg, device=device, transformer=transformer, vae_config=vae_config,
                          total_step=args.recipe_steps, tinit=tinit, matmul_tflops=rate, profile_dir=args.profile_dir)
    plan = rows_for(profile["sizes"], text_lengths)
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {row.key for row in plan}
        if unknown:
            raise SystemExit(f"--only: no row {sorted(unknown)}; rows: {[row.key for row in plan]}")
        by_key = {row.key: row for row in plan}
        plan = [by_key[key] for key in wanted]  # in the order given: what matters most first
    import diffusers
    import peft

    report = {
        "what": "artmaster.training.step.training_step against a diffusers-example-style step (benchmarks/train_step.py)",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
        "profile": args.profile, "transformer_params_billion": params / 1e9,
        "matmul_bf16_tflops": rate, "recipe_steps": args.recipe_steps, "recipe_text_tokens": short,
        "timed_steps": steps, "warmup_steps": warmup, "first_timed_step": tinit + 1,
        "recipe": {key: OmegaConf.to_container(cfg.train[key]) if OmegaConf.is_config(cfg.train[key])
                   else cfg.train[key] for key in ("adalora", "lora_branch", "cudagraphs", "mixed_precision")},
        "rows": [], "skipped": [], "errors": [],
    }
    print(f"{report['device']}, torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
          f"transformer {params / 1e9:.2f}B params" + (f", bf16 matmul {rate:.0f} TFLOP/s" if rate else ""))
    compile_seconds = None
    for row in plan:
        elapsed = time.perf_counter() - began
        compiles = row.kind in ("adalora", "lora") and device.type == "cuda"
        expected = (compile_seconds or 60.0) + 10 if compiles else 15.0
        if elapsed + expected > args.budget:
            report["skipped"].append(f"{row.key} (budget: {elapsed:.0f}s used of {args.budget:.0f}s)")
            print(f"skip {row.key}: budget")
            continue
        print(f"[{elapsed:5.0f}s] {row.key} {' '.join(row.overrides)}", flush=True)
        try:
            result = run_row(row, ctx, warmup, steps, count_syncs=row.recipe and not row.checkpointing)
        except Exception as error:  # keep going: one broken row must not lose the others
            import traceback

            traceback.print_exc()
            report["errors"].append(f"{row.key}: {type(error).__name__}: {error}"[:2000])
            undo_levers(transformer)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if result["compiled"]:
            compile_seconds = max(compile_seconds or 0.0, result["first_step_seconds"])
        report["rows"].append(result)
        report["targets"] = targets(report["rows"], args.recipe_steps, short, profile["sizes"])
        write_report(report, args.json, began)
        print(f"    {result['seconds_per_step']:.3f} s/step, peak {result['peak_gb']}, "
              f"first step {result['first_step_seconds']:.1f}s, loss {result['loss']:.4f}", flush=True)
    print()
    print_table(report["rows"])
    print(json.dumps(report.get("targets", {}), indent=2))
    for line in report["errors"]:
        print("ERROR", line[:300])
    write_report(report, args.json, began)
    print(f"wrote {args.json} ({report['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
