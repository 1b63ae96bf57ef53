"""The training loop that train and retrain run (`train`): data -> plan -> model -> loop -> export,
top to bottom; `TrainSetup` says how a retrain run differs from the train stage's.
"""

from __future__ import annotations

import hashlib
import io
import statistics
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from artmaster.dataset import Example, load_examples
from artmaster.files import captioned, remove_folder, write_atomic
from artmaster.models import gpu_memory_peak
from artmaster.tracking import active
from artmaster.training.batches import (held_out_ids, keyed_generator, make_batch, on_device, optimizer_steps,
                                        process_batches)
from artmaster.training.checkpoints import (checkpoint_name, find_resume_checkpoint, list_checkpoints, load_checkpoint,
                                            rng_states, run_fingerprint, save_checkpoint)
from artmaster.training.encodings import build_cache, free_encoders, prune_cache
from artmaster.training.export import export_outputs
from artmaster.training.settings import SampleSettings, TrainSettings
from artmaster.training.state import AdapterEMA, TrainingState, build_training_state
from artmaster.training.step import NonFiniteWatch, active_rank, training_step
from artmaster.training.validation import ValidationSet, render_samples, sample_grid, validation_loss, validation_set


# MLflow names of the logged rows. MLflow's run page shows one chart section per prefix, sections
# in alphabetical order: `loss` (train and val only) comes first, then the loss's two terms, the
# optimizer, AdaLoRA's ranks and `result` (log_summary's headline). loss.csv keeps the plain names.
METRIC_NAMES = {"loss": "loss/train", "val_loss": "loss/val", "mse": "objective/mse",
                "orthogonal": "objective/orthogonal", "grad_norm": "optim/grad_norm", "lr": "optim/lr",
                "rank_budget": "rank/budget", "active_rank": "rank/active"}


def mlflow_metrics(row: dict) -> dict[str, float]:
    return {METRIC_NAMES.get(key, key): value for key, value in row.items() if key != "step"}


@dataclass(frozen=True)
class TrainSetup:
    """How a run of the loop differs from the train stage's (the defaults): `retrain` uses it to
    add the accepted ArtAug images, continue an adapter or train on a base with LoRAs fused in."""

    extra: tuple[Example, ...] = ()  # trained on besides the crops, never held out for validation
    extra_repeats: int = 1  # each extra example appears this many times for every time a crop does
    train_crops: bool = True  # False: the crops only give the validation set (the held ones are encoded)
    init_adapter: Path | None = None  # a peft AdaLoRA folder (train's adapter/) to continue from
    fuse: tuple[Path, ...] = ()  # plain diffusers LoRA folders fused into the base transformer first
    note: str = ""  # a paragraph for the model card: how this adapter was made

    def identity(self) -> dict:
        """What the checkpoints' fingerprint must add for this setup ({} for the train stage's)."""
        if self == TrainSetup():
            return {}
        def weights(folder: Path) -> dict[str, str]:  # by content, so a moved workspace still resumes
            return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
                    for path in sorted(Path(folder).rglob("*.safetensors"))}

        return {"extra_repeats": self.extra_repeats, "train_crops": self.train_crops,
                "init_adapter": weights(self.init_adapter) if self.init_adapter else None,
                "fuse": [weights(folder) for folder in self.fuse]}


def make_accelerator(cfg: DictConfig):
    """accelerate's Accelerator for `cfg.train` (CPU threads, mixed precision, CPU or GPU)."""
    from accelerate import Accelerator

    settings = cfg.train
    use_cpu = cfg.model.device == "cpu" or not torch.cuda.is_available()
    if not use_cpu:
        # cuDNN's SDPA backward failed for FLUX shapes (torch 2.11, CUDA 13: `mha_graph.execute`, then an
        # illegal memory access); with it off, the flash backend runs (docs/performance.md, "Levers")
        torch.backends.cuda.enable_cudnn_sdp(False)
    return Accelerator(mixed_precision=str(settings.mixed_precision), cpu=use_cpu)


@dataclass
class TrainingData:
    """What the loop trains on: the pipeline (encoders freed), the crops and the extra examples that
    could be encoded, their encodings on the device, and the sample prompts' encodings."""

    pipe: object
    examples: list[Example]
    extra: list[Example]
    encodings: dict[str, dict[str, torch.Tensor]]
    prompt_encodings: dict[str, dict[str, torch.Tensor]]
    max_sequence_length: int  # of the text encodings
    sample_files: dict[str, str]  # sample id -> cache file name (its content hash)


@dataclass
class BatchPlan:
    """Which crops are held for validation and trained on, and this process's micro-batches."""

    held: set[str]
    trained: list[Example]
    ids_by_size: dict[tuple[int, int], list[str]]
    micro_batches: list[list[str]]
    accumulation: int
    total_step: int

    def at(self, step: int) -> list[list[str]]:
        """The micro-batches of optimizer step `step` (1, 2, ...)."""
        return self.micro_batches[(step - 1) * self.accumulation : step * self.accumulation]

    def identity(self) -> dict:
        """What a resumed run must share: the trained crops per bucket and the step count."""
        return {"buckets": {f"{w}x{h}": ids for (w, h), ids in sorted(self.ids_by_size.items())},
                "total_step": self.total_step}


def train(cfg: DictConfig, accelerator, out: Path, setup: TrainSetup | None = None) -> dict:
    """The training loop, writing everything into `out`; `setup` (retrain) changes its data,
    starting adapter and base model, the defaults are the train stage's."""
    setup = setup or TrainSetup()
    settings = TrainSettings.from_config(cfg.train)
    is_main = accelerator.is_main_process
    device = accelerator.device
    out.mkdir(parents=True, exist_ok=True)
    if is_main:
        _tag_run(cfg)

    # 1. data: crops + captions, encoded once (the main process writes the cache, others read it)
    data = encode_data(cfg, accelerator, setup, out)
    # 2. plan: hold out validation samples (crops only), bucket by size, batches for every epoch
    plan = batch_plan(cfg, accelerator, data, setup)
    # 3. model: AdaLoRA, optimizer, schedule, allocator; resume
    state = build_training_state(cfg, data.pipe.transformer, data.pipe.vae.config, plan.total_step, accelerator)
    if setup.init_adapter is not None:
        _continue_adapter(state, setup.init_adapter, settings, is_main)
    fingerprint = run_fingerprint(cfg, data.sample_files, accelerator.num_processes, setup.identity(), plan.identity())
    checkpoints = out / "checkpoints"
    start_step, history, last_checkpoint = resume(cfg, accelerator, state, checkpoints, fingerprint, plan.total_step)
    vset = validation_set(data.encodings, sorted(plan.held), list(cfg.train.validation.sigmas), cfg.seed,
                          state.flow, device)
    if is_main:
        _log_plan(data, plan, setup, start_step)

    # 4. loop over optimizer steps
    watch = NonFiniteWatch(device)
    window: list[dict[str, torch.Tensor]] = []
    evaluation_seconds, checkpoint_seconds, loop_start = 0.0, 0.0, time.perf_counter()
    samples_dir = out / "samples"
    if is_main and start_step == 0:
        evaluation_seconds += _evaluate(settings.samples, state, data, vset, 0, samples_dir, history)
    progress = tqdm(range(start_step + 1, plan.total_step + 1), desc="train", unit="step", disable=not is_main,
                    initial=start_step, total=plan.total_step)
    rate = SteadyRate()
    for step in progress:
        micro_batches = [make_batch(data.encodings, ids) for ids in plan.at(step)]
        generators = [keyed_generator(cfg.seed, "step", accelerator.process_index, step, i, device=device)
                      for i in range(plan.accumulation)]
        out_step = training_step(state, micro_batches, step, generators)
        watch.observe(step, out_step)
        window.append(out_step)
        last = step == plan.total_step
        if step % settings.log_every == 0 or last:
            watch.check(accelerator, last_checkpoint)
            row = _log_row(state, window, step)
            steps_per_second = rate.window(len(window))
            window = []
            history.append(row)
            if is_main:
                active().log_metrics(mlflow_metrics(row), step=step)
                progress.set_postfix(loss=f"{row['loss']:.4f}", rank=row["active_rank"],
                                     steps_per_s=f"{steps_per_second:.2f}")
        validate, sample = _due(step, settings.validation.every, last), _due(step, settings.samples.every, last)
        if is_main and (validate or sample):
            seconds = _evaluate(settings.samples, state, data, vset, step, samples_dir, history,
                                validate=validate, sample=sample)
            evaluation_seconds += seconds
            rate.exclude(seconds)
        if _due(step, settings.checkpoint.every, last):
            watch.check(accelerator, last_checkpoint)
            rng_by_rank = _gather(accelerator, rng_states())
            if is_main:
                started = time.perf_counter()
                last_checkpoint = save_checkpoint(checkpoints, state, step, step * plan.accumulation, fingerprint,
                                                  history, rng_by_rank, settings.checkpoint.keep)
                seconds = time.perf_counter() - started
                checkpoint_seconds += seconds
                rate.exclude(seconds)
    loop_seconds = time.perf_counter() - loop_start

    # 5. every rank must hold the same adapter (DDP + allocator masks agree); export
    checksums = _gather(accelerator, _adapter_checksum(state))
    if len(set(checksums)) != 1:
        raise RuntimeError(f"train: DDP ranks ended with different adapters: {checksums}")
    if not is_main:
        return {}
    metrics = _final_metrics(history, plan.total_step - start_step, loop_seconds - evaluation_seconds,
                             plan.total_step, len(data.examples))
    metrics.update(wall_seconds=loop_seconds, evaluation_seconds=evaluation_seconds,
                   checkpoint_seconds=checkpoint_seconds)
    if rate.steady is not None:
        metrics["steady_steps_per_second"] = rate.steady
    metrics.update(gpu_memory_peak())
    metrics["rank_checksums"] = checksums
    if setup != TrainSetup():
        metrics["extra_examples"] = len(data.extra)
        metrics["crops_trained"] = len(plan.trained)
    export_outputs(cfg, state, out, history, metrics, setup.note)
    if not settings.checkpoint.keep_after_success and checkpoints.exists():
        remove_folder(checkpoints)
    print(f"train: {plan.total_step} steps, final loss {metrics['loss']:.4f}, "
          f"val {metrics.get('val_loss', float('nan')):.4f}, "
          f"{metrics['active_rank']} ranks kept; outputs in {out}")
    return metrics


def encode_data(cfg: DictConfig, accelerator, setup: TrainSetup, out: Path) -> TrainingData:
    """Load the pipeline (with `setup.fuse` LoRAs fused into the base), encode the crops, the extra
    examples and the sample prompts into out/cache (or read them there), then free the encoders."""
    from artmaster.adalora import fuse_lora_
    from artmaster.models import load_pipeline, truncation_reported

    settings, is_main = cfg.train, accelerator.is_main_process
    examples = load_examples(cfg)
    if not setup.train_crops:  # the crops only validate: encode the held ones
        held = held_out_ids([e.sample_id for e in examples], settings.validation, cfg.seed)
        examples = [e for e in examples if e.sample_id in held]
    pipe = load_pipeline(cfg.model)
    for folder in setup.fuse:
        modules = fuse_lora_(pipe.transformer, folder)
        if is_main:
            print(f"train: fused the LoRA in {folder} into the base ({modules} modules)")
    texts = [e.caption for e in examples + list(setup.extra)] + list(settings.samples.prompts)
    max_sequence_length = int(cfg.model.max_sequence_length)
    with accelerator.main_process_first(), truncation_reported(pipe, texts, max_sequence_length, "train",
                                                               report=is_main):
        encoded = build_cache(pipe, examples + list(setup.extra), list(settings.samples.prompts), out / "cache",
                              cfg.model, show_progress=is_main)
    if is_main:
        prune_cache(out / "cache", encoded.files)
    free_encoders(pipe)
    pipe.set_progress_bar_config(disable=True)
    extra_ids = {e.sample_id for e in setup.extra}
    return TrainingData(
        pipe=pipe,
        examples=[e for e in encoded.examples if e.sample_id not in extra_ids],
        extra=[e for e in encoded.examples if e.sample_id in extra_ids],
        encodings=on_device(encoded.samples, accelerator.device, pipe.transformer.dtype),
        prompt_encodings=encoded.prompts,
        max_sequence_length=max_sequence_length,
        sample_files=encoded.sample_files,
    )


def batch_plan(cfg: DictConfig, accelerator, data: TrainingData, setup: TrainSetup) -> BatchPlan:
    """Hold out validation crops, bucket the trained crops and the extra examples by size, and cut
    every epoch into this process's micro-batches."""
    settings = TrainSettings.from_config(cfg.train)
    held = held_out_ids([e.sample_id for e in data.examples], cfg.train.validation, cfg.seed)
    trained = [e for e in data.examples
               if setup.train_crops and not (settings.validation.hold_out and e.sample_id in held)]
    if not trained and not data.extra:
        raise ValueError("train: every crop is held out for validation; lower train.validation.num_samples")
    ids_by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
    for example in trained:
        ids_by_size[example.size].append(example.sample_id)
    for example in data.extra:
        ids_by_size[example.size] += [example.sample_id] * int(setup.extra_repeats)
    accumulation = settings.gradient_accumulation
    micro_batches = process_batches(ids_by_size, epochs=settings.epochs, repeats=settings.repeats,
                                    batch_size=settings.batch_size, world_size=accelerator.num_processes,
                                    process_index=accelerator.process_index, seed=cfg.seed)
    return BatchPlan(held, trained, ids_by_size, micro_batches, accumulation,
                     optimizer_steps(len(micro_batches), accumulation))


def _continue_adapter(state: TrainingState, folder: Path, settings: TrainSettings, is_main: bool) -> None:
    """Start from a saved AdaLoRA adapter (retrain's continue mode) instead of a fresh one."""
    from artmaster.adalora import load_adalora_weights_

    ranks = load_adalora_weights_(state.adapter, folder)
    if state.ema is not None:  # the average starts from the adapter continued
        state.ema = AdapterEMA(state.named_params, settings.ema.decay)
    if is_main:
        # the model starts exactly at the saved adapter (masked triplets at zero); the schedule then
        # runs again, so its warm-up may revive them (up to init_r per module) before the budget
        # shrinks back to target_r: the new data can move ranks between modules
        print(f"train: continuing the adapter in {folder} ({sum(ranks.values())} ranks kept; "
              "masked ranks may come back during the warm-up, then the budget shrinks to target_r again)")


def resume(cfg: DictConfig, accelerator, state: TrainingState, checkpoints: Path, fingerprint: str,
           total_step: int) -> tuple[int, list[dict], Path | None]:
    """Load the checkpoint `train.resume` picks into `state`: (its step, its history, its folder), or
    (0, [], None) when it picks none; then checkpoints of another recipe or damaged ones are removed."""
    is_main = accelerator.is_main_process
    resume_from = find_resume_checkpoint(checkpoints, str(cfg.train.resume), fingerprint)
    start_step, history = 0, []
    if resume_from is not None:
        start_step, history = load_checkpoint(resume_from, state, accelerator.process_index)
        if is_main:
            print(f"train: resuming from {resume_from} (step {start_step} of {total_step})")
    accelerator.wait_for_everyone()  # every rank has chosen before stale checkpoints go
    if resume_from is None and is_main and checkpoints.exists():
        stale = list_checkpoints(checkpoints)
        if stale:
            print(f"train: not resuming: the {len(stale)} checkpoint(s) in {checkpoints} are of another recipe, "
                  "data, validation split or schedule, or damaged; removed, training from step 0")
        remove_folder(checkpoints)
    return start_step, history, resume_from


class SteadyRate:
    """Optimizer steps per second between logged rows (each row's host sync makes a window's time
    exact), validation and samples excluded. `steps_per_second` in metrics.json divides all steps by
    all training time, compiling and CUDA-graph recording included; the median over windows,
    `steady`, is the rate once those are done."""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self._mark = time.perf_counter()
        self._excluded = 0.0

    def exclude(self, seconds: float) -> None:
        self._excluded += seconds

    def window(self, steps: int) -> float:
        now = time.perf_counter()
        busy = now - self._mark - self._excluded
        self._mark, self._excluded = now, 0.0
        if busy > 0:
            self.rates.append(steps / busy)
        return self.rates[-1] if self.rates else 0.0

    @property
    def steady(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None


def _due(step: int, every, last: bool) -> bool:
    """Periodic work every `every` steps and at the end; `every` 0/null means only at the end."""
    return last or bool(every) and step % every == 0


def _gather(accelerator, value) -> list:
    from accelerate.utils import gather_object

    return gather_object([value]) if accelerator.num_processes > 1 else [value]


def _adapter_checksum(state: TrainingState) -> str:
    digest = hashlib.sha256()
    for name, param in state.named_params:
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _log_row(state: TrainingState, window: list[dict[str, torch.Tensor]], step: int) -> dict:
    """Means over the logging window: the one host sync of the loop."""
    keys = ("loss", "mse", "orthogonal", "grad_norm")
    stacked = torch.stack([torch.stack([out[k].float() for out in window]).mean() for k in keys]
                          + [active_rank(state.adapter).float()])
    values = stacked.tolist()
    row = {"step": step, **dict(zip(keys, values[:-1]))}
    row["lr"] = state.scheduler.get_last_lr()[0]
    row["rank_budget"] = window[-1]["rank_budget"]
    row["active_rank"] = int(values[-1])
    return row


def _evaluate(samples: SampleSettings, state: TrainingState, data: TrainingData, vset: ValidationSet, step: int,
              samples_dir: Path, history: list[dict], validate: bool = True, sample: bool = True) -> float:
    """Validation loss and sample images at `step` (main process only); returns seconds spent."""
    tracker = active()
    started = time.perf_counter()
    ema = state.ema.applied() if state.ema is not None else nullcontext()
    from artmaster.models import eager_blocks

    # CUDA-graph blocks cannot run inference block after block: evaluate with eager blocks
    eager = eager_blocks(data.pipe.transformer) if state.cudagraphs else nullcontext()
    with ema, eager, state.accelerator.autocast():
        if validate and vset.batches:
            value = float(validation_loss(state.adapter, vset, state.flow))
            tracker.log_metric(METRIC_NAMES["val_loss"], value, step=step)
            history.append({"step": step, "val_loss": value})
        if sample and samples.enabled and samples.prompts:
            images = render_samples(data.pipe, data.prompt_encodings, samples, data.max_sequence_length,
                                    state.accelerator.device)
            for prompt, seed, image in images:  # one slider per prompt and seed, the step on the slider
                tracker.log_image(captioned(image, f"seed {seed}: {prompt}"),
                                  key=f"prompt {samples.prompts.index(prompt)} seed {seed}", step=step)
            samples_dir.mkdir(parents=True, exist_ok=True)
            grid_path = samples_dir / f"{checkpoint_name(step)}.png"
            buffer = io.BytesIO()
            sample_grid(images, step).save(buffer, format="PNG")
            write_atomic(grid_path, buffer.getvalue())
            tracker.log_artifact(grid_path, artifact_path="samples")
    return time.perf_counter() - started


def _final_metrics(history: list[dict], steps_run: int, train_seconds: float, total_step: int, examples: int) -> dict:
    rows = [row for row in history if "loss" in row]
    validations = [row["val_loss"] for row in history if "val_loss" in row]
    metrics = {
        "loss": rows[-1]["loss"],
        "mse": rows[-1]["mse"],
        "orthogonal": rows[-1]["orthogonal"],
        "orthogonal_first": rows[0]["orthogonal"],
        "grad_norm": rows[-1]["grad_norm"],
        "active_rank": rows[-1]["active_rank"],
        "steps": total_step,
        "examples": examples,
        "steps_per_second": steps_run / train_seconds if steps_run and train_seconds > 0 else None,
    }
    if validations:
        metrics["val_loss"] = validations[-1]
        metrics["val_loss_first"] = validations[0]
    return {k: v for k, v in metrics.items() if v is not None}


def _tag_run(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    tags = {"train.seed": str(cfg.seed)}
    if HydraConfig.initialized():
        tags["hydra_job_overrides"] = " ".join(HydraConfig.get().overrides.task)[:5000]
    active().set_tags(tags)
    active().log_param("seed", cfg.seed)


def _log_plan(data: TrainingData, plan: BatchPlan, setup: TrainSetup, start_step: int) -> None:
    buckets = ", ".join(f"{w}x{h}: {len(ids)}" for (w, h), ids in sorted(plan.ids_by_size.items()))
    print(f"train: {len(data.examples)} crops ({len(plan.held)} held for validation), buckets {buckets}; "
          f"{plan.total_step} optimizer steps")
    active().log_params({"plan.optimizer_steps": plan.total_step, "plan.crops": len(data.examples),
                         "plan.held_out": len(plan.held), "plan.resumed_from_step": start_step,
                         "plan.buckets": buckets})
    if setup != TrainSetup():
        print(f"train: + {len(data.extra)} extra images x {setup.extra_repeats}; crops trained on: "
              f"{setup.train_crops}; LoRAs fused into the base: {len(setup.fuse)}")
