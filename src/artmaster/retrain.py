"""Stage `retrain`: the ArtAug learner. Train the adapter again on what an augment round kept.

Round r (`retrain.round`) reads data/augment/round_<r>/ (samples.jsonl: each accepted pair's
original and refined image, and its prompt, which becomes the caption) and starts from the folder
`augment.plan` names: data/train in round 0, data/retrain/round_<r-1> after that. Two modes
(`retrain.mode`), both running the training loop (`artmaster.training.loop.train`) with train's recipe as
changed by `retrain.recipe`:

- `continue`: continue the round's AdaLoRA adapter (its peft folder `adapter/`, every rank it kept
  back in place) on the crops plus the accepted refined images, each `retrain.refined_repeats`
  times as often as a crop. The loop writes straight into round_<r>/.
- `differential` (ArtAug's differential LoRA): fuse the round's LoRA into the base, fit adapter 1
  on the ORIGINAL images of the accepted pairs (round_<r>/originals/), fuse it too, fit adapter 2
  on their REFINED images (round_<r>/refined/) and keep adapter 2 alone: it learns only what the
  refinement changed. The round's result is the round's LoRA plus adapter 2, concatenated exactly
  into one plain LoRA (ranks add up), so it loads on the base model like train's.
- A round whose augment kept no image is skipped with a warning: its result is the round's adapter
  unchanged (copied), and its metrics say `skipped: 1`. Training on the crops alone would change
  the adapter without any ArtAug signal and blur the comparison evaluate makes.

Writes data/retrain/round_<r>/: lora/ (the adapter after this round, with its model card; what
augment round r+1 paints with), adapter/ (continue: the peft folder round r+1 continues), the loop
outputs (loss.csv, ranks, samples, cache, checkpoints; differential: in originals/ and refined/)
and metrics.json (the round's summary; also its "done" record, keyed by a fingerprint of every
input, so a finished round is not redone). After the last round (`retrain.publish`), publishes the
contract that evaluate reads: data/retrain/lora (same layout as data/train/lora), metrics.json
(final round + a per-round summary) and loss.csv.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from artmaster import replicates
from artmaster.augment_settings import AugmentSettings
from artmaster.config import Settings, hydra_entry, params_hash, round_entry, stage_dir
from artmaster.dataset import Example, scaled_size
from artmaster.files import inside, read_jsonl, staged_dir, write_atomic
from artmaster.replicates import Replicate
from artmaster.tracking import log_summary, stage_run
from artmaster.training.checkpoints import resume_identity
from artmaster.training.export import headline as train_headline
from artmaster.training.lora_card import base_model_name, lora_metrics, model_card, training_recipe
from artmaster.training.loop import TrainSetup, make_accelerator, train

log = logging.getLogger(__name__)

MODES = ("continue", "differential")
PUBLISH = ("auto", "false", "only")
# what each mode keeps in a round folder when the round is (re)done: the loop's resumable state
KEEP = {"continue": {"cache", "checkpoints", "samples"}, "differential": {"originals", "refined"}}


# --- config ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainSettings(Settings):
    """The `retrain` section's switches (its `recipe` goes into train's section: `recipe_config`)."""

    mode: str
    round: int
    publish: str
    refined_repeats: int

    @property
    def publish_mode(self) -> str:
        """auto | false | only (YAML reads an unquoted false as a boolean)."""
        return self.publish.lower()


def recipe_config(cfg: DictConfig) -> DictConfig:
    """The config the loop runs with: `train` replaced key by key by `retrain.recipe` (an unknown
    key is an error, not silently ignored)."""
    recipe = OmegaConf.to_container(cfg.retrain.recipe, resolve=True)
    return OmegaConf.merge(cfg, {"train": recipe})


def round_dir(cfg: DictConfig, r: int, replicate: Replicate) -> Path:
    return replicate.folder(stage_dir(cfg, "retrain") / f"round_{r}")


def augment_dir(cfg: DictConfig, r: int, replicate: Replicate) -> Path:
    return replicate.folder(stage_dir(cfg, "augment") / f"round_{r}")


def previous_dir(cfg: DictConfig, r: int, replicate: Replicate) -> Path:
    """The folder round r starts from: data/train, or data/retrain/round_<r-1> (`augment.plan`)."""
    return replicate.folder(Path(str(round_entry(cfg, r)["previous"])))


def _check(settings: RetrainSettings, rounds: int) -> None:
    if settings.mode not in MODES:
        raise ValueError(f"retrain.mode={settings.mode!r}: expected one of {', '.join(MODES)}")
    if settings.publish_mode not in PUBLISH:
        raise ValueError(f"retrain.publish={settings.publish!r}: expected one of {', '.join(PUBLISH)}")
    if settings.refined_repeats < 1:
        raise ValueError(f"retrain.refined_repeats={settings.refined_repeats} must be at least 1")
    if not 0 <= settings.round < rounds:
        raise ValueError(f"retrain.round={settings.round} must be in [0, augment.rounds={rounds})")


# --- inputs ---------------------------------------------------------------------------------------


def accepted_pairs(augment_dir: Path, r: int) -> list[dict]:
    """The samples augment round r kept (refined image closer to the painter), in sample order."""
    samples = augment_dir / "samples.jsonl"
    if not samples.is_file():
        raise FileNotFoundError(f"{samples}: augment round {r} has not run (run `artmaster augment augment.round={r}`)")
    pairs = [row for row in read_jsonl(samples) if row.get("accepted")]
    for row in pairs:
        for name in ("original", "accepted"):  # inside: no path out of the round's folder
            path = inside(augment_dir, str(row["files"].get(name, "")), where=f"{samples}: sample {row['sample_id']}")
            if not path.is_file():
                raise FileNotFoundError(f"{path}: augment round {r} sample {row['sample_id']} lacks its {name} image")
    return sorted(pairs, key=lambda row: row["sample_id"])


def pair_examples(pairs: list[dict], augment_dir: Path, r: int, kind: str) -> tuple[Example, ...]:
    """Training examples of the pairs' `kind` image ("original" | "refined"), captioned with the
    prompt they were generated from, at the size they were generated at."""
    file_key = {"original": "original", "refined": "accepted"}[kind]
    examples = []
    for row in pairs:
        path = (augment_dir / row["files"][file_key]).resolve()
        with Image.open(path) as image:
            size = scaled_size(*image.size, 1.0)  # must stay multiples of 16
        examples.append(Example(f"augment-r{r}-{row['sample_id']}-{kind}", path, str(row["prompt"]), size))
    return tuple(examples)


def _digest(paths: list[Path], root: Path | None = None) -> str:
    """Content hash of files, each named relative to `root` (default: its file name)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        name = str(path.relative_to(root)) if root else path.name
        digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _folder_files(folder: Path) -> list[Path]:
    """The weights and configs of an adapter folder (not its model card, which holds timings)."""
    if not folder.is_dir():
        return []
    return [path for path in folder.rglob("*") if path.is_file() and path.suffix in (".safetensors", ".json")]


def start_folder(cfg: DictConfig, mode: str, r: int, replicate: Replicate) -> Path:
    """What the round starts from: the peft AdaLoRA folder (continue) or the plain LoRA (differential)."""
    return previous_dir(cfg, r, replicate) / ("adapter" if mode == "continue" else "lora")


def round_fingerprint(cfg: DictConfig, settings: RetrainSettings, r: int, pairs: list[dict],
                      replicate: Replicate) -> str:
    """Everything a finished round depends on: mode, recipe, model, seed, the adapter it starts
    from, the accepted images and their prompts, the crops and captions."""
    recipe = OmegaConf.to_container(recipe_config(cfg).train, resolve=True)
    images = [augment_dir(cfg, r, replicate) / row["files"][key] for row in pairs for key in ("original", "accepted")]
    start = start_folder(cfg, settings.mode, r, replicate)
    return params_hash({
        "mode": settings.mode,
        "refined_repeats": settings.refined_repeats,
        "train": resume_identity(recipe),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "seed": cfg.seed,
        "start": _digest(_folder_files(start), start),
        "pairs": [(row["sample_id"], row["prompt"]) for row in pairs],
        "images": _digest(images),
        "data": _digest([stage_dir(cfg, "crop") / "crops.jsonl", stage_dir(cfg, "caption") / "captions.jsonl"]),
    })


def _finished(path: Path, fingerprint: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return summary if summary.get("fingerprint") == fingerprint else None


def linear_out_features(model_cfg: DictConfig) -> dict[str, int]:
    """out_features of every Linear of the transformer (kohya export of fused layers needs them),
    from its config alone: the model is built on the meta device, no weights are read."""
    from diffusers import FluxTransformer2DModel

    from artmaster.models import pipeline_source

    if model_cfg.profile == "flux_dev_random":
        config = OmegaConf.to_container(model_cfg.architecture.transformer, resolve=True)
    else:
        config = FluxTransformer2DModel.load_config(pipeline_source(model_cfg), subfolder="transformer",
                                                    revision=model_cfg.revision,
                                                    local_files_only=bool(model_cfg.local_files_only))
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    return {name: module.out_features for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


# --- one round ------------------------------------------------------------------------------------


def _prepare(out: Path, keep: set[str]) -> None:
    """Clear a round folder that is about to be (re)done, keeping only `keep` (the loop state the
    mode resumes from); the summary goes first, so a killed round never reads as finished."""
    (out / "metrics.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for path in out.iterdir():
        if path.name not in keep:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _copy_folder(source: Path, target: Path) -> None:
    with staged_dir(target) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)


def _phase(cfg: DictConfig, mode: str, accelerator, out: Path, setup: TrainSetup, r: int, phase: str) -> dict:
    """One run of train's loop, in its own nested MLflow run (tagged with round, mode, phase)."""
    with stage_run(cfg, "retrain", sections=("retrain", "train", "model"), label=f"round {r} {phase}",
                   main=accelerator.is_main_process) as tracker:
        tracker.set_tags({"artmaster.round": str(r), "artmaster.retrain_mode": mode,
                          "artmaster.retrain_phase": phase})
        tracker.log_params({"retrain.phase": phase, "round": r})
        return train(cfg, accelerator, out, setup)


def _note(mode: str, r: int, start: Path, pairs: int, crops: bool) -> str:
    what = f"{pairs} accepted refined image(s) of ArtAug round {r}" + (" plus the crops" if crops else "")
    if mode == "continue":
        return (f"**Retrained** by ArtMaster's `retrain` stage (round {r}, mode `continue`): the AdaLoRA adapter "
                f"in `{start}` trained further on {what}.")
    return (f"**Retrained** by ArtMaster's `retrain` stage (round {r}, mode `differential`, ArtAug's differential "
            f"LoRA): the LoRA in `{start}` plus a second adapter fitted on {what}, on top of that LoRA and a first "
            "adapter fitted on the pairs' original images (both fused into the base); the first adapter is "
            "dropped, so the added ranks hold only what the refinement changed. Both parts are concatenated "
            "exactly into this one LoRA.")


def retrain_round(cfg: DictConfig, settings: RetrainSettings, accelerator, r: int, replicate: Replicate) -> dict:
    """Round r of one replicate (`cfg` is its config): skip when done with the same inputs, else
    (re)do it; returns its summary."""
    mode = settings.mode
    is_main = accelerator.is_main_process
    pairs_dir = augment_dir(cfg, r, replicate)
    out = round_dir(cfg, r, replicate)
    start = start_folder(cfg, mode, r, replicate)
    if not start.is_dir():
        hint = "`artmaster train`" if r == 0 else f"`artmaster retrain retrain.round={r - 1}`"
        raise FileNotFoundError(f"{start}: retrain round {r} ({mode}) starts from this folder; run {hint} first")
    pairs = accepted_pairs(pairs_dir, r)
    fingerprint = round_fingerprint(cfg, settings, r, pairs, replicate)
    done = _finished(out / "metrics.json", fingerprint)
    if done is not None and (out / "lora").is_dir():
        log.info("retrain round %d: already done with the same inputs; kept %s", r, out)
        return done
    accelerator.wait_for_everyone()
    if is_main:
        _prepare(out, KEEP[mode] if pairs else set())
    accelerator.wait_for_everyone()
    recipe = recipe_config(cfg)
    repeats = settings.refined_repeats
    summary = {"round": r, "mode": mode, "accepted_used": len(pairs), "refined_repeats": repeats,
               "start": str(start), "skipped": 0}
    previous = previous_dir(cfg, r, replicate)
    if not pairs:
        log.warning("retrain round %d: augment kept no refined image in %s; the round is skipped and its adapter "
                    "is %s unchanged", r, pairs_dir, previous)
        if is_main:
            _copy_folder(previous / "lora", out / "lora")
            if mode == "continue":
                _copy_folder(previous / "adapter", out / "adapter")
        summary.update(skipped=1, kept_run=None)
    elif mode == "continue":
        setup = TrainSetup(extra=pair_examples(pairs, pairs_dir, r, "refined"), extra_repeats=repeats,
                           init_adapter=start, note=_note(mode, r, start, len(pairs), crops=True))
        metrics = _phase(recipe, mode, accelerator, out, setup, r, "continue")
        summary.update(_loop_summary(metrics), kept_run=".")
    else:
        originals = TrainSetup(extra=pair_examples(pairs, pairs_dir, r, "original"), extra_repeats=repeats,
                               train_crops=False, fuse=(start,),
                               note=f"Differential round {r}, adapter 1: fitted on the original images (dropped).")
        first = _phase(recipe, mode, accelerator, out / "originals", originals, r, "originals")
        refined = TrainSetup(extra=pair_examples(pairs, pairs_dir, r, "refined"), extra_repeats=repeats,
                             train_crops=False, fuse=(start, out / "originals" / "lora"),
                             note=f"Differential round {r}, adapter 2 (kept): fitted on the refined images on top "
                                  f"of `{start}` and adapter 1, both fused into the base; use it together with "
                                  f"`{start}` (`{out / 'lora'}` holds both).")
        metrics = _phase(recipe, mode, accelerator, out / "refined", refined, r, "refined")
        summary.update(_loop_summary(metrics), kept_run="refined", originals_loss=first.get("loss"))
        if is_main:
            _write_sum(recipe, start, out / "refined" / "lora", out / "lora", summary,
                       _note(mode, r, start, len(pairs), crops=False))
    if not is_main:
        return summary
    summary["fingerprint"] = fingerprint
    write_atomic(out / "metrics.json", json.dumps(summary, indent=2))
    return summary


def headline(metrics: dict) -> dict:
    """A retrain round's (or the published result's) headline: the training loop's, plus how many
    refined images it learned from."""
    images = metrics.get("accepted_used_total", metrics.get("accepted_used"))
    return {**train_headline(metrics), **({"refined_images": images} if images is not None else {})}


def _loop_summary(metrics: dict) -> dict:
    keys = ("loss", "mse", "val_loss", "val_loss_first", "active_rank", "steps", "examples", "extra_examples",
            "crops_trained", "rank_total", "steps_per_second", "steady_steps_per_second", "evaluation_seconds",
            "checkpoint_seconds", "peak_gpu_memory_gb")
    return {key: metrics[key] for key in keys if key in metrics}


def _write_sum(cfg: DictConfig, first: Path, second: Path, target: Path, summary: dict, note: str) -> None:
    """target = the plain LoRA `first` + `second` (concatenated, exact), with its model card."""
    from artmaster.adalora import concat_loras, read_lora, save_lora

    out_features = linear_out_features(cfg.model)
    total = concat_loras([read_lora(first), read_lora(second)], out_features)
    ranks = dict(total.ranks)
    metrics = lora_metrics(summary)
    metrics.update(rank_total=sum(ranks.values()), rank_modules=len(ranks))
    base_model = base_model_name(cfg.model)
    with staged_dir(target) as staging:
        files = save_lora(total, staging, base_model=base_model, trigger=str(cfg.train.trigger),
                          metadata={"recipe": training_recipe(cfg), "metrics": metrics,
                                    "parts": [str(first), str(second)]},
                          dtype=str(cfg.train.export.dtype), kohya=bool(cfg.train.export.kohya))
        card = model_card(cfg, base_model, ranks, metrics, {k: Path(v).name for k, v in files.items()}, note)
        (staging / "README.md").write_text(card, encoding="utf-8")
    summary["rank_total"] = sum(ranks.values())


# --- publishing the final round -------------------------------------------------------------------


def publish(cfg: DictConfig, settings: RetrainSettings, rounds: int) -> dict:
    """data/retrain/lora, metrics.json and loss.csv from the last round (and the same for every
    further replicate under data/retrain/replicates/), once every round is done with its current
    inputs."""
    metrics = {}
    for replicate, replicate_cfg in replicates.each(cfg):
        published = publish_replicate(replicate_cfg, settings, rounds, replicate)
        if replicate.is_product:
            metrics = published
        else:
            metrics.setdefault("replicates", {})[replicate.label] = {
                key: published[key] for key in ("accepted_used_total", "loss") if key in published}
    return metrics


def publish_replicate(cfg: DictConfig, settings: RetrainSettings, rounds: int, replicate: Replicate) -> dict:
    per_round = {}
    for r in range(rounds):
        path = round_dir(cfg, r, replicate) / "metrics.json"
        stale_graph = ("; under DVC, params.yaml was stale when dvc read dvc.yaml (augment.rounds changed): "
                       "run `dvc repro` again")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: retrain round {r} of {rounds} has no result (run `artmaster retrain "
                                    f"retrain.round={r}`{stale_graph})")
        summary = json.loads(path.read_text(encoding="utf-8"))
        pairs = accepted_pairs(augment_dir(cfg, r, replicate), r)
        if summary.get("fingerprint") != round_fingerprint(cfg, settings, r, pairs, replicate):
            raise ValueError(f"{path}: retrain round {r} was made from other inputs than the current ones (config, "
                             f"adapter or augment round {r}); re-run `artmaster retrain retrain.round={r}`")
        per_round[f"round_{r}"] = summary
    final = round_dir(cfg, rounds - 1, replicate)
    target = replicate.folder(stage_dir(cfg, "retrain"))
    _copy_folder(final / "lora", target / "lora")
    last = per_round[f"round_{rounds - 1}"]
    metrics = {k: v for k, v in last.items() if isinstance(v, (int, float))}
    metrics.update(rounds=rounds, mode=settings.mode,
                   accepted_used_total=sum(s["accepted_used"] for s in per_round.values()),
                   per_round={name: {k: s[k] for k in ("accepted_used", "skipped", "loss", "val_loss", "rank_total")
                                     if k in s}
                              for name, s in per_round.items()})
    kept = last.get("kept_run")
    loss = final / kept / "loss.csv" if kept else None
    write_atomic(target / "loss.csv", loss.read_text(encoding="utf-8") if loss and loss.is_file() else "step,loss\n")
    write_atomic(target / "metrics.json", json.dumps(metrics, indent=2))
    print(f"retrain: published round {rounds - 1} of {rounds} ({settings.mode}, {replicate.label}) as "
          f"{target / 'lora'}; accepted images used: {metrics['accepted_used_total']}"
          + (f", final loss {metrics['loss']:.4f}" if "loss" in metrics else " (round skipped)"))
    return metrics


# --- the stage ------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict:
    """Retrain ArtAug round `retrain.round` (`retrain.mode`), then publish data/retrain/lora when it
    is the last round (`retrain.publish=auto`); `retrain.publish=only` publishes without training."""
    settings = RetrainSettings.from_config(cfg.retrain)
    rounds = AugmentSettings.from_config(cfg.augment).rounds
    _check(settings, rounds)
    r = settings.round
    if settings.publish_mode == "only":
        with stage_run(cfg, "retrain", sections=("retrain", "augment"), label=f"publish round {rounds - 1}") as tracker:
            metrics = publish(cfg, settings, rounds)
            tracker.set_tags({"artmaster.retrain_phase": "publish", "artmaster.retrain_mode": settings.mode,
                              "artmaster.round": str(rounds - 1)})
            log_summary(headline(metrics), details=metrics, folder=stage_dir(cfg, "retrain"),
                        note=f"Published round {rounds - 1} of {rounds} ({settings.mode}) as "
                             f"`{stage_dir(cfg, 'retrain') / 'lora'}`, the augmented adapter evaluate reads.")
            tracker.log_artifacts(stage_dir(cfg, "retrain") / "lora", artifact_path="lora")
        return metrics
    accelerator = make_accelerator(recipe_config(cfg))
    is_main = accelerator.is_main_process
    with stage_run(recipe_config(cfg), "retrain", sections=("retrain", "train", "model"), label=f"round {r}",
                   main=is_main) as tracker:
        tracker.set_tags({"artmaster.round": str(r), "artmaster.retrain_mode": settings.mode,
                          "artmaster.retrain_phase": "round"})
        summary = {}
        for replicate, replicate_cfg in replicates.each(cfg):
            with tracker.child("retrain", replicate.label) if not replicate.is_product else nullcontext(tracker) as replicate_run:
                result = retrain_round(replicate_cfg, settings, accelerator, r, replicate)
                if is_main:
                    folder = round_dir(cfg, r, replicate)
                    log_summary(headline(result), details=result, folder=folder,
                                note=f"ArtAug round {r} ({settings.mode}, {replicate.label}): {result['accepted_used']} "
                                     "accepted refined image(s) from augment; the nested run holds the training loop.")
                    replicate_run.log_artifacts(folder / "lora", artifact_path="lora")
                    replicate_run.log_artifact(folder / "metrics.json")
            if replicate.is_product:
                summary = result
            else:
                summary.setdefault("replicates", {})[replicate.label] = {
                    key: result[key] for key in ("accepted_used", "loss", "skipped") if key in result}
        if is_main and settings.publish_mode == "auto" and r == rounds - 1:
            summary = {**summary, "published": publish(cfg, settings, rounds)}
    return summary


main = hydra_entry(run)

if __name__ == "__main__":
    main()
