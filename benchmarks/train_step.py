"""FLUX.1-dev-size training speed: the `train` stage's own optimizer step, timed on one GPU.

Builds the full FLUX.1-dev transformer with random bf16 weights (`model=flux_dev_random`, no text
encoders: the stage caches encodings and frees them), composes the reference recipe
(`experiment=artmaster_flux`: AdaLoRA init_r 12 -> target_r 8 on the 418-module attention + MLP
set, bf16, AdamW fused on CUDA, batch 1), feeds random tensors shaped like the cached encodings
(VAE posterior at 512x512 / 512x768, T5 embeddings at the recipe's length and at 512) and times
`artmaster.train.training_step` -- wrapping, optimizer and allocator by
`artmaster.train.build_training_state` -- in the budget phase of a 6000-step schedule (importance
update every step, a rank re-allocation every delta_t steps).

Rows (each on the same model, in this order; a row starts only while --budget seconds remain;
--only KEY,... picks rows by `Row.key`, e.g. adalora_bf16-512x512-t128-ckpt):
- base_floor: the frozen transformer alone, forward + input-gradient backward (what no adapter can beat)
- adalora_before: the step as train.py ran it before the speed levers: bf16 autocast with peft's
  fp32 input copies, orthogonal term through autograd, eager
- adalora_eager / lora_eager: autocast without the input copies, direct orthogonal gradient, eager
  (plain LoRA: peft LoraConfig at r = init_r on the same modules, same optimizer, no allocator)
- adalora / lora: + regional torch.compile (`model.compile`)
- *_bf16: bf16 weights without autocast (`train.mixed_precision: "no"`, the recipe): the LoRA
  branch runs in fp32 on peft's input copy
- adalora_bf16_cg: + CUDA graphs of the compiled blocks (`train.cudagraphs`)
- ... at 512x768, with gradient checkpointing, with 512 text tokens

Model FLOPs per step count the frozen model's forward and input-gradient backward (no recompute;
adaLN/norm and embedder linears act on one vector per sample, image-stream weights on image tokens,
text-stream weights on text tokens, single blocks on all tokens; attention 4 L^2 d per layer
forward, 3x that forward + backward); MFU divides them by the bf16 matmul rate measured in the same
run. Prints a table, writes JSON after every row (so a run cut short keeps what it measured).

    python benchmarks/train_step.py --json train_step.json                 # one GPU, FLUX.1-dev size
    python benchmarks/train_step.py --only adalora_bf16-512x512-t128,lora_bf16-512x512-t128 --profile-dir prof
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

from artmaster import models, train
from artmaster.adalora import adalora_schedule, set_input_casting, target_modules_regex
from artmaster.config import compose

GB = 1e9
PROFILES = {
    # sizes in pixels (width, height); text lengths in T5 tokens (the recipe's, then the T5 maximum)
    "flux": {"overrides": ["model=flux_dev_random"], "sizes": [(512, 512), (512, 768)], "text": [None, 512],
             "warmup": 3, "steps": 10},
    "tiny": {"overrides": ["model=tiny"], "sizes": [(128, 128), (128, 192)], "text": [None, 128],
             "warmup": 2, "steps": 4},
}


@dataclass(frozen=True)
class Row:
    name: str
    adapter: str  # adalora | lora | base
    size: tuple[int, int]
    text_tokens: int
    checkpointing: bool = False
    compile: bool = False
    before: bool = False  # train.py's step as it was before the speed levers
    autocast: bool = True  # train.mixed_precision bf16 (autocast) | "no" (bf16 weights, no autocast)
    mode: str | None = None  # torch.compile mode (None: the default)
    profile: bool = False  # also profile two steps: GPU kernel time against the step's wall time

    @property
    def key(self) -> str:
        width, height = self.size
        return f"{self.name}-{width}x{height}-t{self.text_tokens}{'-ckpt' if self.checkpointing else ''}"


def rows_for(sizes, text_lengths) -> list[Row]:
    """Every row, most telling first within each group; select with --only KEY,KEY (Row.key)."""
    (square, portrait), (short, long) = sizes, text_lengths
    eager = [
        Row("base_floor", "base", square, short),
        Row("adalora_before", "adalora", square, short, before=True),
        Row("adalora_eager", "adalora", square, short),
        Row("lora_eager", "lora", square, short),
        Row("adalora_eager", "adalora", portrait, short),
        Row("adalora_eager", "adalora", square, long),
        # bf16 weights without autocast: the LoRA branch runs in fp32 on peft's input copy
        Row("base_floor_bf16", "base", square, short, autocast=False),
        Row("adalora_eager_bf16", "adalora", square, short, autocast=False),
    ]
    compiled = [  # regional torch.compile (model.compile)
        Row("adalora", "adalora", square, short, compile=True),
        Row("lora", "lora", square, short, compile=True),
        Row("adalora", "adalora", square, short, checkpointing=True, compile=True),
        Row("adalora", "adalora", portrait, short, compile=True),
        Row("adalora", "adalora", portrait, short, checkpointing=True, compile=True),
        Row("adalora", "adalora", square, long, compile=True),
    ]
    compiled_bf16 = [  # the same without autocast
        Row("adalora_bf16", "adalora", square, short, compile=True, autocast=False, profile=True),
        Row("lora_bf16", "lora", square, short, compile=True, autocast=False),
        Row("adalora_bf16", "adalora", square, short, checkpointing=True, compile=True, autocast=False),
        # CUDA graphs of each compiled block (mode reduce-overhead): no per-kernel launch cost
        Row("adalora_bf16_cg", "adalora", square, short, compile=True, autocast=False, mode="reduce-overhead"),
        Row("adalora_bf16", "adalora", portrait, short, compile=True, autocast=False),
        Row("adalora_bf16", "adalora", portrait, short, checkpointing=True, compile=True, autocast=False),
        Row("adalora_bf16", "adalora", square, long, compile=True, autocast=False),
    ]
    return eager + compiled + compiled_bf16


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


def encodings_for(cfg, size: tuple[int, int], text_tokens: int, device, dtype) -> dict:
    """Random tensors shaped like one cached sample (train.build_cache), on the device."""
    arch = cfg.model.architecture
    width, height = size
    generator = torch.Generator().manual_seed(0)
    latent_shape = (arch.vae.latent_channels, height // 8, width // 8)
    entry = {
        "latent_mean": torch.randn(latent_shape, generator=generator),
        "latent_std": torch.full(latent_shape, 0.05),
        "prompt_embeds": torch.randn(text_tokens, arch.transformer.joint_attention_dim, generator=generator),
        "pooled_prompt_embeds": torch.randn(arch.transformer.pooled_projection_dim, generator=generator),
    }
    return train.on_device({"sample": entry}, device, dtype)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_accelerator(cfg, device):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(mixed_precision=str(cfg.train.mixed_precision), cpu=device.type == "cpu")


def lora_state(cfg, transformer, vae_config, total_step: int, accelerator):
    """Plain LoRA at r = init_r on the same modules, with the recipe's optimizer and schedule:
    the reference the AdaLoRA overhead is measured against (no allocator, no orthogonal term)."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig, get_peft_model

    settings = cfg.train
    transformer.requires_grad_(False)
    if settings.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    set_seed(int(cfg.seed))
    ada = settings.adalora
    adapter = get_peft_model(transformer, LoraConfig(
        r=int(ada.init_r), lora_alpha=int(ada.lora_alpha), lora_dropout=float(ada.lora_dropout),
        target_modules=target_modules_regex(ada.target_modules), init_lora_weights="gaussian"))
    params = [param for param in adapter.parameters() if param.requires_grad]
    for param in params:
        param.data = param.data.float()
    if accelerator.mixed_precision != "no":
        set_input_casting(adapter, False)
    optim = settings.optim
    optimizer = torch.optim.AdamW(params, lr=float(optim.lr), betas=tuple(optim.betas),
                                  weight_decay=float(optim.weight_decay), eps=float(optim.eps),
                                  fused=all(p.is_cuda for p in params))
    scheduler = get_scheduler(settings.lr_schedule.name, optimizer,
                              num_warmup_steps=round(float(settings.lr_schedule.warmup_fraction) * total_step),
                              num_training_steps=total_step)
    model = accelerator.prepare(adapter)
    flow = train.flow_settings(cfg, transformer, vae_config)
    max_norm = float(optim.max_grad_norm) if optim.max_grad_norm else float("inf")

    def step(index, batches, generators):
        loss = train.flow_matching_loss(model, batches[0], flow, generators[0])
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach()}

    return adapter, step, sum(p.numel() for p in params)


def base_step(cfg, transformer, vae_config, accelerator):
    """The frozen transformer alone: forward + backward to its input (no adapter, no optimizer)."""
    transformer.requires_grad_(False)
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    flow = train.flow_settings(cfg, transformer, vae_config)

    def step(index, batches, generators):
        batch = batches[0]
        tokens = train.flux_math.pack_latents(batch.latent_mean).to(flow.model_dtype).requires_grad_(True)
        sigmas = torch.full((len(tokens),), 0.5, device=tokens.device)
        guidance = train.flux_math.guidance_vector(1.0, len(tokens), tokens.device)
        with accelerator.autocast():
            prediction = train.flux_math.predict_velocity(
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


def run_row(row: Row, ctx: SimpleNamespace, warmup: int, steps: int, count_syncs: bool) -> dict:
    cfg = OmegaConf.create(OmegaConf.to_container(ctx.cfg, resolve=True))
    cfg.train.gradient_checkpointing = row.checkpointing
    cfg.train.mixed_precision = "bf16" if row.autocast else "no"
    # CUDA graphs through the stage's own switch: build_training_state compiles the blocks with mode
    # reduce-overhead, training_step marks each new iteration
    cfg.train.cudagraphs = row.mode == "reduce-overhead" and row.adapter == "adalora" and ctx.device.type == "cuda"
    if row.before:
        cfg.train.adalora.orth_gradient = "autograd"
    device, transformer = ctx.device, ctx.transformer
    text_tokens = row.text_tokens
    transformer.disable_gradient_checkpointing()
    compiled = row.compile and (device.type == "cuda" or ctx.compile_on_cpu)
    if compiled and not cfg.train.cudagraphs:
        models.compile_blocks(transformer, **({"mode": row.mode} if row.mode else {}))
    elif not compiled:
        models.uncompile_blocks(transformer)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    accelerator = fresh_accelerator(cfg, device)
    adapter, trainable = None, 0
    if row.adapter == "adalora":
        state = train.build_training_state(cfg, transformer, ctx.vae_config, ctx.total_step, accelerator)
        if row.before:
            set_input_casting(state.adapter, True)
        adapter, trainable = state.adapter, sum(p.numel() for p in state.params)

        def step_fn(index, batches, generators):
            return train.training_step(state, batches, index, generators)
    elif row.adapter == "lora":
        adapter, step_fn, trainable = lora_state(cfg, transformer, ctx.vae_config, ctx.total_step, accelerator)
    else:
        step_fn = base_step(cfg, transformer, ctx.vae_config, accelerator)
    encodings = encodings_for(cfg, row.size, text_tokens, device, transformer.dtype)
    batches = [train.make_batch(encodings, ["sample"])]
    first = ctx.tinit + 1  # the budget phase: importance update every step, masking every delta_t

    def args(index):
        if row.mode == "reduce-overhead" and not cfg.train.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new training iteration for CUDA graph trees
        return index, batches, [train.seeded_generator(cfg.seed, "step", 0, index, 0, device=device)]

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
    flops = model_flops(cfg.model.architecture.transformer, image_tokens, text_tokens)
    result = {
        **asdict(row), "size": f"{width}x{height}", "compiled": compiled,
        "seconds_per_step": seconds, "steps_per_second": 1 / seconds, "samples_per_second": 1 / seconds,
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
    if adapter is not None:
        adapter.unload()
    accelerator.free_memory()
    del adapter, step_fn
    if row.adapter == "adalora":
        del state
    gc.collect()
    return result


# --- report ------------------------------------------------------------------------------------


def pick(rows, **match) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def targets(rows: list[dict], recipe_steps: int, short: int, sizes) -> dict:
    square, portrait = (f"{w}x{h}" for w, h in sizes)
    best = {}
    for size in (square, portrait):
        for ckpt in (False, True):
            candidates = [r for r in rows if r["adapter"] == "adalora" and not r["before"] and r["size"] == size
                          and r["text_tokens"] == short and r["checkpointing"] == ckpt]
            best[(size, ckpt)] = min(candidates, key=lambda r: r["seconds_per_step"]) if candidates else None
    head = best[(square, False)]
    out = {}
    if head:
        out["recipe_row"] = {k: head[k] for k in ("name", "size", "compiled", "seconds_per_step", "mfu", "peak_gb")}
        out["mfu_512"] = head["mfu"]
        out["steps_per_second_512"] = head["steps_per_second"]
        # AdaLoRA over plain LoRA, pair by pair: same size, text length, compile, mode and precision
        ratios = {}
        for lora in (r for r in rows if r["adapter"] == "lora" and not r["checkpointing"]):
            same = pick(rows, adapter="adalora", before=False, size=lora["size"], text_tokens=lora["text_tokens"],
                        checkpointing=False, compiled=lora["compiled"], autocast=lora["autocast"], mode=lora["mode"])
            if same:
                ratios[f"{same['name']} / {lora['name']}"] = same["seconds_per_step"] / lora["seconds_per_step"]
        out["adalora_over_lora"] = ratios
    no_ckpt = [best[(s, False)] for s in (square, portrait) if best[(s, False)]]
    ckpt = [best[(s, True)] for s in (square, portrait) if best[(s, True)]]
    if no_ckpt and no_ckpt[0]["peak_gb"] is not None:
        out["peak_gb_no_checkpointing"] = max(r["peak_gb"] for r in no_ckpt)
    if ckpt and ckpt[0]["peak_gb"] is not None:
        out["peak_gb_checkpointing"] = max(r["peak_gb"] for r in ckpt)
    if len(no_ckpt) == 2:
        # half the steps in each bucket; sample rendering and validation not included
        mean = sum(r["seconds_per_step"] for r in no_ckpt) / 2
        out["recipe_minutes"] = recipe_steps * mean / 60
        out["recipe_minutes_all_square"] = recipe_steps * no_ckpt[0]["seconds_per_step"] / 60
        out["recipe_minutes_all_portrait"] = recipe_steps * no_ckpt[1]["seconds_per_step"] / 60
    return out


def print_table(rows: list[dict]) -> None:
    header = (f"{'row':<18} {'size':<8} {'txt':>4} {'ckpt':>4} {'comp':>4} {'s/step':>7} {'steps/s':>7} "
              f"{'samp/s':>7} {'peak GB':>7} {'MFU':>6} {'1st s':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        print(f"{r['name']:<18} {r['size']:<8} {r['text_tokens']:>4} {'y' if r['checkpointing'] else 'n':>4} "
              f"{'y' if r['compiled'] else 'n':>4} {r['seconds_per_step']:>7.3f} {r['steps_per_second']:>7.2f} "
              f"{r['samples_per_second']:>7.2f} {peak:>7} {mfu:>6} {r['first_step_seconds']:>6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="flux")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default="train_step.json")
    parser.add_argument("--warmup", type=int, help="untimed steps per row (the first one compiles)")
    parser.add_argument("--steps", type=int, help="timed steps per row")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds: no row starts after this")
    parser.add_argument("--recipe-steps", type=int, default=6000, help="optimizer steps of the recipe")
    parser.add_argument("--only", help="comma-separated row keys to run (default: all), e.g. "
                        "adalora-512x512-t128,lora-512x512-t128")
    parser.add_argument("--profile-dir", help="write the profiled rows' top kernels here")
    parser.add_argument("--compile-on-cpu", action="store_true", help="compile rows compile on the CPU too")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_args()
    began = time.perf_counter()
    profile = PROFILES[args.profile]
    cfg = compose(["experiment=artmaster_flux", *profile["overrides"], f"model.device={args.device}",
                   "model.compile=false", *args.overrides])
    device = torch.device(models.resolve_device(cfg.model))  # also keeps cuDNN SDPA off on CUDA
    if device.type == "cpu" and cfg.model.dtype != "float32":
        cfg.model.dtype = "float32"
    short = int(cfg.model.max_sequence_length)
    text_lengths = [short if t is None else t for t in profile["text"]]
    warmup = args.warmup or profile["warmup"]
    steps = args.steps or profile["steps"]
    tinit, _ = adalora_schedule(cfg.train.adalora, args.recipe_steps)

    rate = matmul_tflops(device)
    pipe = models.build_random_pipeline(cfg.model, with_text_encoders=False)
    transformer = pipe.transformer
    vae_config = SimpleNamespace(shift_factor=pipe.vae.config.shift_factor, scaling_factor=pipe.vae.config.scaling_factor)
    del pipe
    gc.collect()
    params = sum(p.numel() for p in transformer.parameters())
    ctx = SimpleNamespace(cfg=cfg, device=device, transformer=transformer, vae_config=vae_config,
                          total_step=args.recipe_steps, tinit=tinit, matmul_tflops=rate,
                          compile_on_cpu=args.compile_on_cpu, profile_dir=args.profile_dir)
    plan = rows_for(profile["sizes"], text_lengths)
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {row.key for row in plan}
        if unknown:
            raise SystemExit(f"--only: no row {sorted(unknown)}; rows: {[row.key for row in plan]}")
        plan = [row for row in plan if row.key in wanted]
    report = {
        "what": "artmaster.train.training_step at FLUX.1-dev size (benchmarks/train_step.py)",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "profile": args.profile,
        "transformer_params_billion": params / 1e9,
        "matmul_bf16_tflops": rate, "recipe_steps": args.recipe_steps, "recipe_text_tokens": short,
        "timed_steps": steps, "warmup_steps": warmup, "first_timed_step": tinit + 1,
        "adalora": OmegaConf.to_container(cfg.train.adalora, resolve=True),
        "mixed_precision": str(cfg.train.mixed_precision), "rows": [], "skipped": [], "errors": [],
    }
    print(f"{report['device']}, torch {torch.__version__}, transformer {params / 1e9:.2f}B params, "
          f"bf16 matmul {rate:.0f} TFLOP/s" if rate else f"{report['device']}, torch {torch.__version__}")
    first_compile = None
    for index, row in enumerate(plan):
        elapsed = time.perf_counter() - began
        needs_compile = row.compile and not any(
            r["compiled"] and (r["adapter"], r["size"], r["text_tokens"], r["autocast"], r["mode"])
            == (row.adapter, f"{row.size[0]}x{row.size[1]}", row.text_tokens, row.autocast, row.mode)
            for r in report["rows"])
        expected = (first_compile or 60.0) if needs_compile and device.type == "cuda" else 15.0
        if elapsed + expected > args.budget:
            report["skipped"].append(f"{row} (budget: {elapsed:.0f}s used of {args.budget:.0f}s)")
            print(f"skip {row.name} {row.size} txt {row.text_tokens}: budget")
            continue
        print(f"[{elapsed:5.0f}s] {row.name} {row.size[0]}x{row.size[1]} txt {row.text_tokens} "
              f"ckpt {row.checkpointing} compile {row.compile}", flush=True)
        try:
            result = run_row(row, ctx, warmup, steps,
                             count_syncs=row.compile and row.adapter == "adalora" and not row.checkpointing)
        except Exception as error:  # keep going: one broken row must not lose the others
            import traceback

            traceback.print_exc()
            report["errors"].append(f"{row}: {type(error).__name__}: {error}"[:2000])
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if result["compiled"] and first_compile is None:
            first_compile = result["first_step_seconds"]
        report["rows"].append(result)
        report["targets"] = targets(report["rows"], args.recipe_steps, short, profile["sizes"])
        report["seconds"] = time.perf_counter() - began
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"    {result['seconds_per_step']:.3f} s/step, peak {result['peak_gb']}, "
              f"first step {result['first_step_seconds']:.1f}s, loss {result['loss']:.4f}", flush=True)
    print()
    print_table(report["rows"])
    print(json.dumps(report.get("targets", {}), indent=2))
    for line in report["errors"]:
        print("ERROR", line[:300])
    report["seconds"] = time.perf_counter() - began
    with open(args.json, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {args.json} ({report['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
