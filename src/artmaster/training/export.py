"""What a finished run leaves: the peft adapter, the plain LoRA (diffusers and kohya files) with its
model card, the rank report and heatmap, loss curves and metrics, replacing the previous run's
together.
"""

from __future__ import annotations

import csv
import io
import json
from contextlib import nullcontext
from pathlib import Path

from omegaconf import DictConfig

from artmaster.files import replace_together
from artmaster.tracking import active, log_summary
from artmaster.training.state import TrainingState
from artmaster.training.lora_card import base_model_name, lora_metrics, model_card, training_recipe


# what `export_outputs` writes into the output folder, replaced together (metrics.json, the sign of a
# finished run, last)
EXPORTED = ("adapter", "lora", "ranks.json", "ranks.png", "loss.csv", "val_loss.csv", "headline.json", "metrics.json")


def export_outputs(cfg: DictConfig, state: TrainingState, out: Path, history: list[dict], metrics: dict,
                   note: str = "") -> None:
    """peft folder, plain LoRA + model card, rank report and heatmap, metrics.json, loss.csv: all
    written first and then replacing the previous run's together, so a failure (e.g. every module
    at rank 0) leaves the previous outputs whole."""
    from artmaster.adalora import export_lora, rank_heatmap, rank_report, save_lora

    ema = state.ema.applied() if state.ema is not None else nullcontext()
    with replace_together(out, EXPORTED) as staging:
        with ema:
            state.adapter.save_pretrained(str(staging / "adapter"))
            exported = export_lora(state.adapter)
        ranks = rank_report(exported)
        metrics.update(rank_total=sum(ranks.values()), rank_min=min(ranks.values()),
                       rank_max=max(ranks.values()), rank_modules=len(ranks))
        base_model = base_model_name(cfg.model)
        files = save_lora(exported, staging / "lora", base_model=base_model, trigger=str(cfg.train.trigger),
                          metadata={"recipe": training_recipe(cfg), "metrics": lora_metrics(metrics)},
                          dtype=str(cfg.train.export.dtype), kohya=bool(cfg.train.export.kohya))
        card = model_card(cfg, base_model, ranks, lora_metrics(metrics), {k: Path(v).name for k, v in files.items()},
                          note)
        (staging / "lora" / "README.md").write_text(card, encoding="utf-8")
        (staging / "ranks.json").write_text(json.dumps(ranks, indent=2), encoding="utf-8")
        rank_heatmap(ranks, staging / "ranks.png")
        buffer = io.StringIO()
        columns = ["step", "loss", "mse", "orthogonal", "grad_norm", "lr", "rank_budget", "active_rank"]
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(row for row in history if "loss" in row)
        (staging / "loss.csv").write_text(buffer.getvalue(), encoding="utf-8")
        validation = "".join(f"{row['step']},{row['val_loss']}\n" for row in history if "val_loss" in row)
        # plotted with loss.csv by dvc.yaml
        (staging / "val_loss.csv").write_text("step,val_loss\n" + validation, encoding="utf-8")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        log_summary(headline(metrics), details=metrics, folder=staging,  # headline.json
                    note=f"{metrics['steps']} optimizer steps on {metrics['examples']} crops; adapter in "
                         f"`{out / 'lora'}`.")
    tracker = active()
    for name in ("adapter", "lora"):
        tracker.log_artifacts(out / name, artifact_path=name)
    for name in ("ranks.json", "ranks.png", "metrics.json", "loss.csv", "val_loss.csv"):
        tracker.log_artifact(out / name)


def headline(metrics: dict) -> dict:
    """The numbers `dvc metrics show` and the MLflow runs table show for a training run."""
    names = {"loss": "loss", "val_loss": "val_loss", "ranks": "rank_total"}
    return {name: metrics[key] for name, key in names.items() if key in metrics}
