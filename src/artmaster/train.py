"""Stage `train`: AdaLoRA fine-tuning of the FLUX transformer on the painter's captioned crops.

Reads data/crop (crops.jsonl + PNGs), data/caption/captions.jsonl and the model profile (the tiny
profile from data/base/pipeline). Writes data/train/, or <sweep job dir>/train inside a Hydra
multirun so sweep points never share outputs:

  cache/             VAE posterior and text embeddings per crop (safetensors, content-hash keyed)
  checkpoints/       step-XXXXXX full resumable checkpoints (last `checkpoint.keep`)
  adapter/           the peft AdaLoRA folder
  lora/              plain LoRA (diffusers + kohya safetensors) with its README.md model card
  ranks.json, ranks.png, samples/, metrics.json, headline.json, loss.csv, val_loss.csv

The loop itself is the training package's (`artmaster.training.loop.train`, which retrain runs
too), top to bottom: read crops and captions -> encode each once into the cache -> free the
encoders -> plan aspect-bucketed batches for every epoch -> wrap the transformer with AdaLoRA ->
AdamW + lr schedule -> resume from the last checkpoint -> loop over optimizer steps (forward and
backward per micro-batch, clip, step, schedule, rank allocation, EMA) with logging, validation,
samples and checkpoints every few steps -> export. `accelerate launch` runs the same loop as DDP.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from omegaconf import DictConfig

from artmaster import replicates
from artmaster.config import hydra_entry, stage_dir
from artmaster.tracking import stage_run
from artmaster.training.loop import make_accelerator, train


def output_dir(cfg: DictConfig) -> Path:
    """data/train, or the sweep job's own folder inside a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir) / "train"
    return stage_dir(cfg, "train")


def run(cfg: DictConfig) -> dict:
    """Fine-tune an AdaLoRA adapter on the captioned crops; export it as peft and plain LoRA.
    Each further replicate (`replicates.count`) trains the same recipe with its own seed."""
    accelerator = make_accelerator(cfg)
    is_main = accelerator.is_main_process
    with stage_run(cfg, "train", sections=("train", "model", "replicates"), label=recipe_label(cfg),
                   main=is_main) as tracker:
        metrics = {}
        for replicate, replicate_cfg in replicates.each(cfg):
            with tracker.child("train", replicate.label) if not replicate.is_product else nullcontext():
                result = train(replicate_cfg, accelerator, replicate.folder(output_dir(cfg)))
            if replicate.is_product:
                metrics = result
            elif is_main:
                metrics.setdefault("replicates", {})[replicate.label] = {
                    key: result[key] for key in ("loss", "val_loss", "active_rank") if key in result}
        return metrics


def recipe_label(cfg: DictConfig) -> str:
    """What tells training runs apart at a glance in MLflow: `r=8 lr=2e-4` (AdaLoRA target rank, lr)."""
    mantissa, exponent = f"{float(cfg.train.optim.lr):.2e}".split("e")
    lr = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"r={cfg.train.adalora.target_r} lr={lr}"


main = hydra_entry(run)

if __name__ == "__main__":
    main()
