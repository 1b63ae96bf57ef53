"""Stage `augment`: one ArtAug round of critic-refined generations, kept only when closer to the painter.

For each planned sample (prompt i mod len(prompts), seed `augment.seed + i`):
1. generate the original with the current adapter (`augment.adapter` in round 0, the adapter
   retrained in round r-1 in round r > 0: `round_adapter`; folded into the weights with
   `model.fuse_lora`) through `generate_images`, `augment.generation.batch_size` originals per call
   with each prompt encoded once;
2. the critic (conf/critic) marks regions that drift from the painter, with local prompts;
3. the refiner (conf/refine) repaints them from the same seed;
4. the filter keeps the refined image only when its style_score (artmaster.metrics, reference
   model fitted on the training crops) beats the original's by `augment.filter.margin` and its nearest crop
   is not so close that it would be a near-copy.

Writes data/augment/round_<r>/: samples/<id>.json (provenance: prompt, seed, critic output, scores,
verdict), pairs/<id>-original.png and <id>-refined.png, comparisons/<id>.png (before/after with the
boxes drawn and labelled), accepted/<id>.png (the refined images the filter kept), samples.jsonl,
metrics.json and contact_sheet.png. A sample whose JSON exists with the same inputs fingerprint is
not redone, so a killed run resumes where it stopped. Under `accelerate launch` each process takes
a share of the samples (`artmaster.processes`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import textwrap
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from artmaster import replicates
from artmaster.augment_settings import AugmentSettings, FilterSettings, PictureSettings
from artmaster.config import hydra_entry, params_hash, round_entry, stage_dir
from artmaster.critic import Edit, build_critic
from artmaster.dataset import TRAIN, GenerationSettings, split_rows
from artmaster.files import image_grid, read_jsonl, save_image_atomic, write_atomic
from artmaster.generate import generate_images, load_adapter
from artmaster.metrics import StyleFeatureExtractor, StyleModel
from artmaster.models import gpu_memory_peak
from artmaster.processes import Processes
from artmaster.tracking import active, log_summary, stage_run

log = logging.getLogger(__name__)

SUBFOLDERS = ("samples", "pairs", "comparisons", "accepted")


@dataclass(frozen=True)
class Sample:
    sample_id: str
    prompt: str
    seed: int


def sample_plan(settings: AugmentSettings) -> list[Sample]:
    prompts = list(settings.prompts)
    if not prompts:
        raise ValueError("augment.prompts is empty: give at least one content prompt")
    if settings.count < 0:
        raise ValueError(f"augment.count must be >= 0, got {settings.count}")
    return [Sample(f"{i:04d}", prompts[i % len(prompts)], settings.seed + i) for i in range(settings.count)]


def generation_settings(cfg: DictConfig, gen: GenerationSettings) -> dict:
    """Keyword arguments of `generate_images` and the refiners for this stage."""
    width, height = gen.size
    return {
        "height": height, "width": width, "steps": gen.steps, "guidance": gen.guidance,
        "max_sequence_length": int(cfg.model.max_sequence_length),
    }


def files_digest(paths: list[Path], root: Path) -> str:
    """Content hash of files (names relative to `root`), to key outputs by their inputs."""
    digests = {}
    for path in sorted(paths):
        digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return params_hash(digests)


def inputs_fingerprint(cfg: DictConfig, adapter: Path, crops_file: Path, captions_file: Path) -> str:
    """What a finished sample depends on besides its prompt and seed (pictures excluded)."""
    augment = OmegaConf.to_container(cfg.augment, resolve=True)
    for key in ("picture", "round", "rounds", "plan", "count", "prompts", "seed"):
        augment.pop(key)
    return params_hash(
        {
            "augment": augment,
            "critic": OmegaConf.to_container(cfg.critic, resolve=True),
            "refine": OmegaConf.to_container(cfg.refine, resolve=True),
            "metrics": OmegaConf.to_container(cfg.style_metric, resolve=True),
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "adapter": files_digest([p for p in adapter.rglob("*") if p.is_file()], adapter),
            "crops_and_captions": files_digest([crops_file, captions_file], crops_file.parent.parent),
        }
    )


# --- pictures ----------------------------------------------------------------------------------


def draw_comparison(original: Image.Image, refined: Image.Image | None, record: dict, picture: PictureSettings) -> Image.Image:
    """Before | after, each `panel_height` px tall, boxes drawn and numbered on both, the local
    prompts, reasons, scores and the verdict written underneath."""
    font = ImageFont.load_default(size=picture.font_size)
    scale = picture.panel_height / original.height
    panel = (round(original.width * scale), picture.panel_height)
    gap, line = 6, picture.font_size + 4
    after = refined.resize(panel, Image.Resampling.NEAREST) if refined is not None else Image.new("RGB", panel, "#d0d0d0")
    panels = [original.resize(panel, Image.Resampling.NEAREST), after]
    width = 2 * panel[0] + gap
    chars = max(20, int(width / (0.6 * picture.font_size)))
    gain = record["style_gain"]
    titles = [
        f"before  style {record['style_before']:.3f}",
        "after  " + (f"style {record['style_after']:.3f} ({gain:+.3f})" if refined is not None else "not refined"),
    ]
    notes = []
    for number, edit in enumerate(record["edits"], start=1):
        notes += textwrap.wrap(f"{number}: {edit['local_prompt']}", chars)
        notes += textwrap.wrap(f"   {edit['reason']}", chars)
    notes += textwrap.wrap(("ACCEPTED: " if record["accepted"] else "rejected: ") + record["verdict"], chars)
    canvas = Image.new("RGB", (width, line + panel[1] + 4 + line * len(notes)), "white")
    draw = ImageDraw.Draw(canvas)
    colours = list(picture.colours)
    for index, image in enumerate(panels):
        left = index * (panel[0] + gap)
        draw.text((left + 2, 2), titles[index], fill="black", font=font)
        canvas.paste(image, (left, line))
        for number, edit in enumerate(record["edits"], start=1):
            colour = colours[(number - 1) % len(colours)]
            x1, y1, x2, y2 = (v * scale for v in edit["box"])
            box = (left + x1, line + y1, left + x2 - 1, line + y2 - 1)
            draw.rectangle(box, outline=colour, width=picture.line_width)
            tag = draw.textbbox((box[0] + 2, box[1] + 1), str(number), font=font)
            draw.rectangle(tag, fill=colour)
            draw.text((box[0] + 2, box[1] + 1), str(number), fill="white", font=font)
    for row, text in enumerate(notes):
        draw.text((2, line + panel[1] + 4 + row * line), text, fill="black", font=font)
    return canvas


# --- the stage ---------------------------------------------------------------------------------


class TrainingReference:
    """The style model of the training crops, fitted on first use; every replicate shares it."""

    def __init__(self, metrics: DictConfig, crop_dir: Path, crops: list[dict]):
        self.metrics = metrics
        self.paths = [crop_dir / row["path"] for row in crops]
        self.crop_dir = crop_dir

    @cached_property
    def fitted(self) -> tuple[StyleFeatureExtractor, StyleModel]:
        extractor = StyleFeatureExtractor.from_config(self.metrics)
        features, skipped = extractor.extract_files(self.paths, root=self.crop_dir)
        for error in skipped:
            log.error("augment: reference crop skipped: %s", error)
        return extractor, StyleModel.fit(features, self.metrics)


class Workers:
    """The pipeline with one adapter, the critic and the refiner, built on first use (a resumed
    run that finds every sample done loads none of them)."""

    def __init__(self, cfg: DictConfig, adapter: Path, training_reference: TrainingReference, captions: list[str]):
        self.cfg = cfg
        self.adapter = adapter
        self.training_reference = training_reference
        self.captions = captions
        self.prompt_embeddings: dict = {}  # `generate_images`' cache: the plan cycles through a few prompts

    @property
    def reference(self) -> tuple[StyleFeatureExtractor, StyleModel]:
        return self.training_reference.fitted

    @cached_property
    def pipe(self):
        from artmaster.models import load_pipeline

        pipe = load_pipeline(self.cfg.model)
        load_adapter(pipe, self.adapter, fuse=bool(self.cfg.model.fuse_lora))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def paint_originals(self, samples: list[Sample], generation: dict) -> list[Image.Image]:
        return generate_images(self.pipe, [s.prompt for s in samples], [s.seed for s in samples],
                               batch_size=len(samples), embedding_cache=self.prompt_embeddings, **generation)

    @cached_property
    def critic(self):
        extractor, model = self.reference
        return build_critic(self.cfg.critic, extractor=extractor, model=model, captions=self.captions)

    @cached_property
    def refiner(self):
        from artmaster.refine import build_refiner

        return build_refiner(self.pipe, self.cfg.refine)


def _finished(path: Path, sample: Sample, fingerprint: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        log.warning("augment: %s is not valid JSON; redoing that sample", path)
        return None
    same = (record.get("prompt"), record.get("seed"), record.get("fingerprint")) == (sample.prompt, sample.seed, fingerprint)
    return record if same else None


def filter_verdict(style_gain: float, nearest_distance: float, nearest_crop: str, settings: FilterSettings) -> tuple[bool, str]:
    """(accepted, why): a refined image is kept when it is no near-copy of a crop and its style
    score beats the original's by the margin."""
    margin, near = settings.margin, settings.near_copy_distance
    if nearest_distance < near:
        return False, (
            f"near-copy of crop {nearest_crop} (distance {nearest_distance:.3f} < {near} of the typical distance)"
        )
    if style_gain < margin:
        return False, f"style gain {style_gain:+.3f} is below the margin {margin}"
    return True, f"style gain {style_gain:+.3f} >= margin {margin}"


def process_sample(sample: Sample, original: Image.Image, workers: Workers, generation: dict,
                   settings: AugmentSettings, cfg: DictConfig, out: Path, fingerprint: str) -> dict:
    """Critique, refine and filter one sample's generated original; write its files, JSON last."""
    edits: list[Edit] = workers.critic.critique(original, sample.prompt)
    refined = workers.refiner.refine(original, sample.prompt, sample.seed, edits, **generation) if edits else None
    extractor, model = workers.reference
    images = [original] if refined is None else [original, refined]
    features = extractor.extract(images)
    scores = model.score(features)
    record = {
        "sample_id": sample.sample_id,
        "round": settings.round,
        "prompt": sample.prompt,
        "seed": sample.seed,
        "fingerprint": fingerprint,
        "critic": str(cfg.critic.name),
        "refiner": str(cfg.refine.name),
        "edits": [edit.as_dict() for edit in edits],
        "style_before": float(scores[0]),
        "style_after": float(scores[1]) if refined is not None else None,
        "style_gain": float(scores[1] - scores[0]) if refined is not None else None,
        "nearest_crop": None,
        "nearest_crop_distance": None,
        # artmaster.metrics has no prompt-adherence backend yet: recorded as not measured.
        "adherence": None,
        "accepted": False,
        "files": {"original": f"pairs/{sample.sample_id}-original.png"},
    }
    if refined is None:
        record["verdict"] = "the critic marked no region to repaint"
    else:
        index, distance = model.nearest_references(features.subset([1]))
        relative = float(distance[0] / model.typical_distance)
        record["nearest_crop"] = model.reference.names[int(index[0])]
        record["nearest_crop_distance"] = relative
        record["accepted"], record["verdict"] = filter_verdict(
            record["style_gain"], relative, record["nearest_crop"], settings.filter
        )
        record["files"]["refined"] = f"pairs/{sample.sample_id}-refined.png"
    record["files"]["comparison"] = f"comparisons/{sample.sample_id}.png"
    accepted_path = out / "accepted" / f"{sample.sample_id}.png"
    for previous in (accepted_path, out / "pairs" / f"{sample.sample_id}-refined.png"):
        previous.unlink(missing_ok=True)  # left by an earlier run with other inputs
    save_image_atomic(original, out / record["files"]["original"])
    if refined is not None:
        save_image_atomic(refined, out / record["files"]["refined"])
    if record["accepted"]:
        record["files"]["accepted"] = f"accepted/{sample.sample_id}.png"
        save_image_atomic(refined, accepted_path)
    save_image_atomic(draw_comparison(original, refined, record, settings.picture), out / record["files"]["comparison"])
    write_atomic(out / "samples" / f"{sample.sample_id}.json", json.dumps(record, indent=2, ensure_ascii=False))
    return record


def remove_stale(out: Path, plan: list[Sample]) -> None:
    """Drop files of samples no longer planned (a smaller count than a previous run)."""
    wanted = {sample.sample_id for sample in plan}
    for folder in SUBFOLDERS:
        for path in (out / folder).glob("*"):
            if path.name.split("-")[0].split(".")[0] not in wanted:
                path.unlink()


def summarise(records: list[dict], settings: AugmentSettings) -> dict:
    refined = [r for r in records if r["style_gain"] is not None]
    accepted = [r for r in records if r["accepted"]]
    return {
        "round": settings.round,
        "samples": len(records),
        "refined": len(refined),
        "accepted": len(accepted),
        "near_copies": sum(r["verdict"].startswith("near-copy") for r in records),
        "acceptance_rate": len(accepted) / len(records) if records else 0.0,
        "mean_style_gain": float(np.mean([r["style_gain"] for r in refined])) if refined else None,
        "mean_style_gain_accepted": float(np.mean([r["style_gain"] for r in accepted])) if accepted else None,
    }


def round_adapter(cfg: DictConfig) -> Path:
    """The LoRA this round paints with: `augment.adapter` in round 0, the adapter retrained in
    round r-1 (data/retrain/round_<r-1>/lora) in round r > 0 (`augment.plan`)."""
    return Path(str(round_entry(cfg, cfg.augment.round)["adapter"]))


def run(cfg: DictConfig) -> dict:
    """One ArtAug round: generate -> critique -> refine -> filter, resumable per sample; for each
    training replicate (`replicates.count`) with that replicate's adapter."""
    settings = AugmentSettings.from_config(cfg.augment)
    if not 0 <= settings.round < settings.rounds:
        raise ValueError(f"augment.round={settings.round} must be in [0, augment.rounds={settings.rounds})")
    if settings.generation.batch_size < 1:
        raise ValueError(f"augment.generation.batch_size must be >= 1, got {settings.generation.batch_size}")
    crop_dir = stage_dir(cfg, "crop")
    crops_file = crop_dir / "crops.jsonl"
    captions_file = stage_dir(cfg, "caption") / "captions.jsonl"
    # the reference model, the near-copy check and the critic see the training crops only: the
    # held-out scans (data.holdout) stay unseen for the evaluate stage
    crops = split_rows(read_jsonl(crops_file, within={"path": crop_dir}), TRAIN)  # no path out of data/crop
    train_ids = {str(row["crop_id"]) for row in crops}
    captions = [str(row["caption"]) for row in read_jsonl(captions_file)
                if row.get("caption") and str(row.get("crop_id")) in train_ids]
    round_out = stage_dir(cfg, "augment") / f"round_{settings.round}"
    training_reference = TrainingReference(cfg.style_metric, crop_dir, crops)
    processes = Processes(cfg.model)
    metrics = {}
    with stage_run(cfg, "augment", sections=("augment", "critic", "refine", "model", "style_metric", "replicates"),
                   label=f"round {settings.round}", main=processes.is_main) as tracker:
        for replicate, replicate_cfg in replicates.each(cfg):
            adapter = replicate.adapter(round_adapter(cfg))
            with tracker.child("augment", replicate.label) if not replicate.is_product else nullcontext():
                workers = Workers(replicate_cfg, adapter, training_reference, captions)
                fingerprint = inputs_fingerprint(replicate_cfg, adapter, crops_file, captions_file)
                result = augment_round(replicate_cfg, settings, workers, replicate.folder(round_out), fingerprint,
                                       processes)
            if replicate.is_product:
                metrics = result
            elif processes.is_main:
                metrics.setdefault("replicates", {})[replicate.label] = {
                    key: result[key] for key in ("accepted", "mean_style_gain")}
    return metrics


def augment_round(cfg: DictConfig, settings: AugmentSettings, workers: Workers, out: Path, fingerprint: str,
                  processes: Processes) -> dict:
    """The round for one adapter (`workers.adapter`), written into `out`; logged to the open run."""
    adapter = workers.adapter
    if not adapter.is_dir() or not any(adapter.glob("*.safetensors")):
        previous = ("`artmaster train` first, or point augment.adapter at a diffusers LoRA folder"
                    if settings.round == 0 else f"`artmaster retrain retrain.round={settings.round - 1}` first")
        raise FileNotFoundError(f"augment.adapter {adapter}: no LoRA folder with *.safetensors (run {previous})")
    plan = sample_plan(settings)
    generation = generation_settings(cfg, settings.generation)
    batch_size = settings.generation.batch_size
    if processes.is_main:
        for folder in SUBFOLDERS:
            (out / folder).mkdir(parents=True, exist_ok=True)
        remove_stale(out, plan)
    processes.wait()  # no process writes a sample before the stale ones are gone

    share = processes.share(plan, "augment")
    mine, resumed = [], 0
    with tqdm(total=len(share), desc=f"augment round {settings.round}", unit="sample",
              disable=not processes.is_main) as progress:
        for start in range(0, len(share), batch_size):
            batch = share[start : start + batch_size]
            done = {s.sample_id: _finished(out / "samples" / f"{s.sample_id}.json", s, fingerprint) for s in batch}
            todo = [sample for sample in batch if done[sample.sample_id] is None]
            resumed += len(batch) - len(todo)
            for sample, original in zip(todo, workers.paint_originals(todo, generation) if todo else []):
                done[sample.sample_id] = process_sample(sample, original, workers, generation, settings, cfg, out,
                                                           fingerprint)
            mine.extend(done[sample.sample_id] for sample in batch)
            progress.update(len(batch))
    records = processes.gather(mine)
    resumed = sum(processes.gather([resumed]))
    if not processes.is_main:
        return {}
    if resumed:
        log.info("augment: %d of %d samples were already done and kept", resumed, len(plan))
    tracker = active()
    write_atomic(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    metrics = {**summarise(records, settings), "critic": str(cfg.critic.name), "refiner": str(cfg.refine.name),
               **gpu_memory_peak()}
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    if records:
        pictures = []
        for record in records:
            with Image.open(out / record["files"]["comparison"]) as opened:
                pictures.append(opened.convert("RGB"))
        sheet = image_grid(pictures, settings.picture.contact_columns, [r["sample_id"] for r in records])
        save_image_atomic(sheet, out / "contact_sheet.png")
        tracker.log_picture(out / "contact_sheet.png", "augment")
        tracker.log_artifacts(out / "comparisons", artifact_path="augment/pairs")
    log_summary({key: metrics[key] for key in ("accepted", "samples", "mean_style_gain") if metrics[key] is not None},
                details=metrics, note=f"Critic `{cfg.critic.name}`, refiner `{cfg.refine.name}`; samples in `{out}`.")
    tracker.log_artifact(out / "samples.jsonl", artifact_path="augment")
    tracker.log_artifact(out / "metrics.json", artifact_path="augment")
    log.info("augment round %s (%s): %d/%d accepted, mean style gain %s -> %s",
             settings.round, adapter, metrics["accepted"], metrics["samples"], metrics["mean_style_gain"], out)
    return metrics


main = hydra_entry(run)


if __name__ == "__main__":
    main()
