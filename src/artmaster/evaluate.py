"""Stage `evaluate`: do the adapters paint like the painter, more than tricks that need no training?

Every painted model of `evaluate.models` (the base model, the base model with the painter's style
words, the adapter and the augmented adapter, each of these two once per training replicate) paints
every content prompt of `evaluate.prompts` with every seed of `evaluate.seeds`; images pair up by
(prompt, seed). Every row of `evaluate.colour_matched` is another row's images through a colour
filter matched to the training crops (artmaster.metrics.transfer): the trick a sceptic tries first.
Two judges measure every image against the painter's HELD-OUT scans (data.holdout; no stage trains
on them):

- the style metric (artmaster.metrics: tone texture, colour structure and colour detail; also what
  ArtAug's critic and filter use): style_score per image, KID per model;
- an independent judge (artmaster.judge: a classifier trained from scratch, cross-fitted, on
  pixels): P(painter) per image, and its AUC between the painter's works and a model's images.

Comparisons (paired on prompts and seeds, over training replicates; intervals resample prompts and
replicates, p-values flip the sign of whole prompts, artmaster.metrics.stats.paired_effect): every
row against `compare_to`, the rows named in `pairs` (augmented vs adapter: ArtAug's verdict, by both
judges), and every adapter row against each colour-matched row: "style learned" is claimed only
where an adapter beats all of them significantly on the style metric. Also measured: prompt
adherence (CLIP, when local weights exist), diversity among a prompt's seeds, memorisation (nearest
training crop), and the training crops before and after the base VAE as reference points.

Writes data/evaluate/: results.json (the verdicts; committed, the README's results section is
generated from it), headline.json (a handful of numbers for `dvc metrics show`), and report/
(metrics.json with everything, scores.csv for the DVC plots, per_prompt.csv, summary.md, grid.png,
report.html and the images).
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from scipy.spatial.distance import pdist

from artmaster import replicates, runtime
from artmaster.adherence import NOT_AVAILABLE, AdherenceSettings, ClipScorer
from artmaster.config import Settings, hydra_entry, stage_dir
from artmaster.dataset import HELDOUT, TRAIN, GenerationSettings, scaled_size, split_rows
from artmaster.files import read_jsonl, staged_dir, write_atomic
from artmaster.generate import adapter_applied, generate_images
from artmaster.judge import JudgeSettings, cross_fitted_scores
from artmaster.metrics import ModelSettings, StyleFeatureExtractor, StyleModel
from artmaster.metrics.stats import Interval, clustered_auc, clustered_mean, paired_effect
from artmaster.metrics.transfer import METHODS, colour_matcher
from artmaster.models import gpu_memory_peak
from artmaster.processes import Processes
from artmaster.replicates import ReplicatesSettings
from artmaster.report import ReportSettings, draw_grid, markdown_summary, render_report
from artmaster.tracking import Tracker, log_summary, stage_run

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
Plan = list[tuple[int, str, int]]  # (prompt index, content prompt, seed), prompt-major


@dataclass(frozen=True)
class MemorisationSettings(Settings):
    near_copy_distance: float
    pixel_size: int
    pairs_shown: int


@dataclass(frozen=True)
class EvaluateSettings(Settings):
    """The `evaluate` section (its statistics are the style metric's ModelSettings). `models`,
    `colour_matched` and `pairs` are lists of entries as written, read and checked by `model_specs`."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    models: tuple
    pairs: tuple
    compare_to: str
    alpha: float
    vae_roundtrip: bool
    generation: GenerationSettings
    memorisation: MemorisationSettings
    report: ReportSettings
    adherence: AdherenceSettings
    judge: JudgeSettings
    colour_matched: tuple | None = ()

    @property
    def matched_names(self) -> list[str]:
        return [str(entry.name) for entry in self.colour_matched or ()]


@dataclass(frozen=True)
class ModelSpec:
    """A painted row: a LoRA folder (None: the base model) and the prompt around the content; a
    `replicated` adapter has one folder per training replicate (artmaster.replicates)."""

    name: str
    adapter: Path | None
    prefix: str
    suffix: str
    replicated: bool

    def prompt(self, content: str) -> str:
        return f"{self.prefix}{content}{self.suffix}"

    def adapters(self, cfg: DictConfig) -> list[Path | None]:
        if self.adapter is None or not self.replicated:
            return [self.adapter]
        return [replicate.adapter(self.adapter) for replicate in replicates.replicates(cfg)]


@dataclass(frozen=True)
class MatchedSpec:
    """A row no model paints: `source`'s images through the `method` colour filter matched to the
    training crops."""

    name: str
    source: str
    method: str


@dataclass
class Row:
    """One evaluated model: images[replicate][plan index] and what was measured on them (arrays
    shaped (replicates, images))."""

    name: str
    description: str
    adapter: bool
    images: list[list[Image.Image]]
    seconds: float = 0.0
    scores: np.ndarray | None = None
    judge: np.ndarray | None = None
    adherence: np.ndarray | None = None
    nearest_crop: list[list[str]] = field(default_factory=list)
    nearest_distance: np.ndarray | None = None
    pixel_correlation: np.ndarray | None = None
    kid: Interval | None = None
    diversity: dict[int, float] = field(default_factory=dict)

    @property
    def flat_images(self) -> list[Image.Image]:
        return [image for replicate in self.images for image in replicate]


# --- configuration --------------------------------------------------------------------------------


def model_specs(settings: EvaluateSettings) -> tuple[list[ModelSpec], list[MatchedSpec]]:
    """`evaluate.models` and `evaluate.colour_matched`, checked: unique file-safe names, the rows
    that `compare_to`, `pairs` and the colour filters name exist."""
    specs = []
    for entry in settings.models:
        adapter = entry.get("adapter")
        specs.append(ModelSpec(str(entry.name), Path(str(adapter)) if adapter else None, str(entry.get("prefix") or ""),
                               str(entry.get("suffix") or ""), bool(entry.get("replicated", False))))
    matched = [MatchedSpec(str(e.name), str(e.source), str(e.method)) for e in settings.colour_matched or ()]
    names = [spec.name for spec in specs] + [spec.name for spec in matched]
    for name in names:
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"evaluate.models: name {name!r} must use only letters, digits, '_' and '-'")
    if len(set(names)) != len(names):
        raise ValueError(f"evaluate.models: names must be unique, got {names}")
    painted = [spec.name for spec in specs]
    for spec in matched:
        if spec.source not in painted or spec.method not in METHODS:
            raise ValueError(f"evaluate.colour_matched[{spec.name}]: source {spec.source!r} must be one of "
                             f"evaluate.models {painted} and method {spec.method!r} one of {list(METHODS)}")
    if settings.compare_to not in names:
        raise ValueError(f"evaluate.compare_to={settings.compare_to!r} is not one of evaluate.models {names}")
    for pair in settings.pairs:
        if len(pair) != 2 or not {str(name) for name in pair} <= set(names):
            raise ValueError(f"evaluate.pairs: {list(pair)} must name two of evaluate.models {names}")
    return specs, matched


def check_adapters(cfg: DictConfig, specs: list[ModelSpec]) -> None:
    for spec in specs:
        for folder in spec.adapters(cfg):
            if folder is not None and not (folder.is_file() or any(folder.glob("*.safetensors"))):
                raise FileNotFoundError(
                    f"evaluate.models[{spec.name}].adapter {folder}: no LoRA folder with *.safetensors (run the "
                    "stage that writes it: train for data/train/lora, retrain for data/retrain/lora; "
                    "replicates.count must match theirs)")


def sample_plan(settings: EvaluateSettings) -> Plan:
    """(prompt index, content prompt, seed) for every prompt x seed, prompt-major."""
    prompts, seeds = list(settings.prompts), list(settings.seeds)
    if not prompts or not seeds:
        raise ValueError("evaluate.prompts and evaluate.seeds must both be non-empty")
    if len(prompts) * len(seeds) < 2:
        raise ValueError("evaluate needs at least 2 images per model (prompts x seeds) for KID and intervals")
    return [(index, prompt, seed) for index, prompt in enumerate(prompts) for seed in seeds]


def load_crops(crop_dir: Path, rows: list[dict], image_scale: float) -> tuple[list[str], list[Image.Image]]:
    """Crop images resized by `image_scale` (as train feeds them), with their crop ids."""
    names, images = [], []
    for row in rows:
        with Image.open(crop_dir / str(row["path"])) as opened:
            image = opened.convert("RGB")
        size = scaled_size(image.width, image.height, image_scale)
        names.append(str(row["crop_id"]))
        images.append(image.resize(size, Image.Resampling.LANCZOS) if image.size != size else image)
    return names, images


# --- generation -----------------------------------------------------------------------------------


@torch.no_grad()
def vae_roundtrip(vae, images: list[Image.Image]) -> list[Image.Image]:
    """Each image encoded (posterior mean) and decoded by the pipeline's VAE: what the painter's own
    crops look like after the decoder every generation passes through."""
    out = []
    for image in images:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
        decoded = vae.decode(latents).sample[0].float().clamp(-1, 1)
        out.append(Image.fromarray(((decoded + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()))
    return out


def paint_rows(cfg: DictConfig, gen: GenerationSettings, specs: list[ModelSpec], plan: Plan, processes: Processes,
               roundtrip: list[Image.Image] = ()) -> tuple[list[Row], list[Image.Image]]:
    """Every painted row's images (each process paints its share of the plan; all images gathered),
    and the VAE roundtrip of `roundtrip`."""
    from artmaster.models import load_pipeline

    width, height = gen.size
    pipe = load_pipeline(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    decoded = vae_roundtrip(pipe.vae, list(roundtrip)) if roundtrip else []
    share = processes.share(plan, "evaluate")
    rows = []
    for spec in specs:
        started, images = time.perf_counter(), []
        for adapter in spec.adapters(cfg):
            # model.fuse_lora: folded into the weights, as augment and generate paint (one compiled graph)
            with adapter_applied(pipe, adapter, fold=bool(cfg.model.get("fuse_lora", False))):
                painted = generate_images(
                    pipe, [spec.prompt(content) for _, content, _ in share], [seed for _, _, seed in share],
                    height=height, width=width, steps=gen.steps, guidance=gen.guidance,
                    max_sequence_length=int(cfg.model.max_sequence_length), batch_size=gen.batch_size,
                )
            images.append(processes.gather(painted))
        rows.append(Row(spec.name, spec.prompt("<prompt>"), spec.adapter is not None, images,
                        time.perf_counter() - started))
        log.info("evaluate: %s painted %d x %d images in %.1f s", spec.name, len(images), len(share), rows[-1].seconds)
    return rows, decoded


def colour_matched_rows(matched: list[MatchedSpec], rows: list[Row], targets: list[Image.Image]) -> list[Row]:
    by_name = {row.name: row for row in rows}
    out = []
    for spec in matched:
        match = colour_matcher(spec.method, targets)
        source = by_name[spec.source]
        out.append(Row(spec.name, f"{spec.source}'s images, colours matched to the training crops ({spec.method})",
                       False, [[match(image) for image in replicate] for replicate in source.images]))
    return out


# --- measurements ---------------------------------------------------------------------------------


def thumbnail_vectors(images: list[Image.Image], size: int) -> np.ndarray:
    """Greyscale `size` x `size` thumbnails, each centred and scaled to unit length (for Pearson
    correlation as a dot product)."""
    vectors = []
    for image in images:
        grey = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BOX), dtype=np.float64).ravel()
        grey -= grey.mean()
        vectors.append(grey / max(float(np.linalg.norm(grey)), 1e-9))
    return np.stack(vectors)


def diversity(embedding: np.ndarray, prompt_index: np.ndarray) -> dict[int, float]:
    """Per prompt: the mean pairwise distance between its seeds' images (rows of `embedding`)."""
    return {int(i): float(pdist(embedding[prompt_index == i]).mean())
            for i in np.unique(prompt_index) if (prompt_index == i).sum() >= 2}


def measure(row: Row, extractor: StyleFeatureExtractor, style: StyleModel, memory: StyleModel,
            train_crops: tuple[list[str], list[Image.Image]], plan: Plan, settings: MemorisationSettings,
            clip: ClipScorer | None) -> None:
    """Style scores, KID, diversity, memorisation (and adherence) of one row, per replicate."""
    prompt_index = np.array([index for index, _, _ in plan])
    size = settings.pixel_size
    train_thumbs = thumbnail_vectors(train_crops[1], size)
    features = extractor.extract(row.flat_images, [f"{row.name}/{i}" for i in range(len(row.flat_images))])
    shape = (len(row.images), len(plan))
    row.scores = style.score(features).reshape(shape)
    row.kid = style.set_distance(features)
    embedding = (style.embed(features) / style.typical_distance).reshape(*shape, -1)
    spreads = [diversity(replicate, prompt_index) for replicate in embedding]
    row.diversity = {i: float(np.mean([s[i] for s in spreads])) for i in spreads[0]}
    index, distance = memory.nearest_references(features)
    row.nearest_crop = [[train_crops[0][i] for i in chunk] for chunk in index.reshape(shape)]
    row.nearest_distance = (distance / memory.typical_distance).reshape(shape)
    thumbs = thumbnail_vectors(row.flat_images, size)
    row.pixel_correlation = np.einsum("ij,ij->i", thumbs, train_thumbs[index]).reshape(shape)
    if clip is not None:
        contents = [content for _, content, _ in plan] * len(row.images)
        row.adherence = clip.score(row.flat_images, contents).reshape(shape)


def cube(values: np.ndarray, plan: Plan) -> np.ndarray:
    """(replicates, images) in plan order -> (replicates, prompts, seeds)."""
    prompts = len({index for index, _, _ in plan})
    return values.reshape(values.shape[0], prompts, -1)


def paired(a: np.ndarray, b: np.ndarray, plan: Plan, stats: ModelSettings, alpha: float) -> dict:
    """Paired effect of row arrays a - b (replicates, images); a row of one replicate (a model
    without an adapter) pairs with every replicate of the other."""
    a, b = cube(a, plan), cube(b, plan)
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"cannot pair {a.shape[0]} replicates with {b.shape[0]}")
    return paired_effect(a - b, stats.bootstrap, stats.confidence, stats.permutations, stats.seed).as_dict(alpha)


def clustered(values: np.ndarray, plan: Plan, stats: ModelSettings) -> dict:
    return clustered_mean(cube(values, plan), stats.bootstrap, stats.confidence, stats.seed).as_dict()


def comparisons(rows: list[Row], settings: EvaluateSettings, stats: ModelSettings, plan: Plan) -> dict[str, dict]:
    """Every row against `compare_to`, every `pairs` entry and every adapter row against each
    colour-matched row: style metric and judge effects (and adherence where measured)."""
    by_name = {row.name: row for row in rows}
    alpha = settings.alpha
    names = [(row.name, settings.compare_to) for row in rows if row.name != settings.compare_to]
    names += [(str(a), str(b)) for a, b in settings.pairs]
    names += [(row.name, name) for row in rows if row.adapter for name in settings.matched_names]
    found = {}
    for model, against in dict.fromkeys(names):
        a, b = by_name[model], by_name[against]
        entry = {"style": paired(a.scores, b.scores, plan, stats, alpha),
                 "judge": paired(a.judge, b.judge, plan, stats, alpha)}
        if a.adherence is not None and b.adherence is not None:
            entry["adherence"] = paired(a.adherence, b.adherence, plan, stats, alpha)
        found[f"{model}_vs_{against}"] = entry
    return found


def verdicts(rows: list[Row], found: dict[str, dict], settings: EvaluateSettings,
             vae_roundtrip: dict | None = None) -> dict:
    """Style learned (an adapter row beats every colour-matched row on the style metric,
    significantly) and ArtAug's verdict by both judges, as data and as sentences; with the VAE
    roundtrip of the training crops, whether it bounds what any generated row can score."""
    matched = settings.matched_names
    learned, sentences = {}, []
    for row in (r for r in rows if r.adapter):
        effects = [found[f"{row.name}_vs_{name}"]["style"] for name in matched]
        learned[row.name] = bool(effects) and all(e["significant"] and e["mean_difference"] > 0 for e in effects)
        if not effects:
            continue
        weakest = min(zip(matched, effects), key=lambda item: item[1]["mean_difference"])
        margin = weakest[1]
        sentences.append(
            f"{row.name}: style learned beyond a colour filter: **{'yes' if learned[row.name] else 'no'}**. Against "
            f"its strongest colour-filter baseline ({weakest[0]}) the style_score difference is "
            f"{margin['mean_difference']:+.3f} [{margin['ci_low']:+.3f}, {margin['ci_high']:+.3f}], "
            f"p = {margin['p_value']:.4f}, same sign in {margin['replicates_agreeing']} of {margin['replicates']} "
            "replicate(s)" + ("." if learned[row.name] else "; a lookup table on the base model's colours "
                              "does as well or better on this metric, so its gain is not shown to be style."))
    for a, b in settings.pairs:
        effects = found[f"{a}_vs_{b}"]
        said = []
        for judge, label in (("style", "the style metric (which ArtAug's critic and filter also use)"),
                             ("judge", "the independent judge")):
            e = effects[judge]
            direction = "closer to" if e["mean_difference"] > 0 else "further from"
            said.append(f"by {label}, {a} is {direction} the painter than {b}: {e['mean_difference']:+.4f} "
                        f"[{e['ci_low']:+.4f}, {e['ci_high']:+.4f}], p = {e['p_value']:.4f} "
                        f"({'significant' if e['significant'] else 'not significant'}; same sign in "
                        f"{e['replicates_agreeing']} of {e['replicates']} replicate(s))")
        sentences.append(f"{a} vs {b}: " + "; ".join(said) + ".")
    if vae_roundtrip is not None:
        sentences.append(vae_bound([row for row in rows if row.name not in matched], vae_roundtrip))
    return {"style_learned": learned, "sentences": sentences}


def vae_bound(painted_rows: list[Row], roundtrip: dict) -> str:
    """Every painted image is decoded by the VAE. Where the painter's own training crops, encoded
    and decoded (`roundtrip`: the style_score interval), score no clearly higher than the best
    painted row, the VAE, not the adapter, limits what this metric can see (colour-filter rows are
    changed after decoding, so they are not bound by it)."""
    painted = {row.name: float(row.scores.mean()) for row in painted_rows}
    best = max(painted, key=painted.get)
    said = (f"The painter's own training crops score {roundtrip['value']:.3f} [{roundtrip['ci_low']:.3f}, "
            f"{roundtrip['ci_high']:.3f}] after a VAE encode + decode; the best painted row, {best}, "
            f"{painted[best]:.3f}")
    if roundtrip["ci_low"] <= painted[best]:
        return (said + ": the decoder alone brings the painter's own crops down to the models' level on this "
                "metric, so no adapter can score far above the base here; the colour-filter rows are changed "
                "after decoding and are not bound by it.")
    return said + ": the VAE leaves room for an adapter to come closer to the painter."


def judge_rows(rows: list[Row], reference: tuple[list[str], list[Image.Image]], scans: list[str], plan: Plan,
               judge: JudgeSettings, stats: ModelSettings) -> tuple[np.ndarray, dict[str, dict]]:
    """P(painter) for every generated image (Row.judge) and the painter's own held-out crops; the
    judge's AUC per row (painter's crops vs the row's images; 0.5: it cannot tell them apart)."""
    generated = [image for row in rows for image in row.flat_images]
    prompts = [index for row in rows for _ in row.images for index, _, _ in plan]
    painter_scores, scores = cross_fitted_scores(reference[1], scans, generated, prompts, judge)
    start, auc = 0, {}
    for row in rows:
        count = len(row.flat_images)
        row.judge = scores[start : start + count].reshape(len(row.images), len(plan))
        start += count
        auc[row.name] = clustered_auc(painter_scores, np.array(scans), row.judge.ravel(),
                                      np.array([index for _ in row.images for index, _, _ in plan]),
                                      stats.bootstrap, stats.confidence, stats.seed).as_dict()
    return painter_scores, auc


# --- the stage ------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict:
    """Paint the prompt x seed set with every model (and replicate), add the colour-filter
    baselines, and judge them all against the held-out scans; write the verdicts and the report."""
    settings = EvaluateSettings.from_config(cfg.evaluate)
    specs, matched = model_specs(settings)
    check_adapters(cfg, specs)
    plan = sample_plan(settings)
    crop_dir = stage_dir(cfg, "crop")
    crops = read_jsonl(crop_dir / "crops.jsonl", within={"path": crop_dir})  # no path out of data/crop
    heldout_rows, train_rows = split_rows(crops, HELDOUT), split_rows(crops, TRAIN)
    if len(heldout_rows) < 2:
        raise ValueError(
            f"evaluate: {crop_dir / 'crops.jsonl'} has {len(heldout_rows)} held-out crop(s); the style reference "
            "needs at least 2: set data.holdout.scans >= 2 and re-run the crop stage")
    if len({str(r["scan_id"]) for r in heldout_rows}) < 2:
        raise ValueError(f"evaluate: the held-out crops in {crop_dir / 'crops.jsonl'} come from one scan; the "
                         "judge and the intervals need at least 2: set data.holdout.scans >= 2")
    if len(train_rows) < 2:
        raise ValueError(f"evaluate: {crop_dir / 'crops.jsonl'} has fewer than 2 training crops")
    image_scale = settings.generation.image_scale
    out_dir = stage_dir(cfg, "evaluate")
    started = time.perf_counter()

    processes = Processes(cfg.model)
    with stage_run(cfg, "evaluate", sections=("evaluate", "style_metric", "model", "replicates"),
                   main=processes.is_main) as tracker:
        # only the main process measures: the others need no crops, and no VAE roundtrip of them
        train_crops = load_crops(crop_dir, train_rows if processes.is_main else [], image_scale)
        rows, roundtrip = paint_rows(cfg, settings.generation, specs, plan, processes,
                                     train_crops[1] if settings.vae_roundtrip else [])
        if not processes.is_main:
            return {}
        generation_seconds = time.perf_counter() - started
        rows += colour_matched_rows(matched, rows, train_crops[1])
        reference = load_crops(crop_dir, heldout_rows, image_scale)
        metrics = measure_all(cfg, settings, rows, plan, reference, [str(r["scan_id"]) for r in heldout_rows],
                              train_crops, roundtrip)
        metrics["seconds"] = {"generation": round(generation_seconds, 1)}
        metrics.update(gpu_memory_peak())
        with staged_dir(out_dir / "report") as staging:
            write_report(staging, settings, metrics, rows, plan, reference, train_crops, roundtrip)
            metrics["seconds"]["total"] = round(time.perf_counter() - started, 1)
            write_atomic(staging / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False))
        results = results_of(metrics)
        write_atomic(out_dir / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        log_summary(headline(metrics), folder=out_dir, note=markdown_summary(metrics))
        log_outputs(tracker, out_dir)
    print(markdown_summary(metrics), end="")
    print(f"evaluate: {len(rows)} models x {len(plan)} images in {metrics['seconds']['total']:.0f} s -> {out_dir}")
    return metrics


def measure_all(cfg: DictConfig, settings: EvaluateSettings, rows: list[Row], plan: Plan,
                reference: tuple[list[str], list[Image.Image]], scans: list[str],
                train_crops: tuple[list[str], list[Image.Image]], roundtrip: list[Image.Image]) -> dict:
    """Both judges on every row, the comparisons and verdicts: the evaluation as data."""
    metrics_cfg = cfg.style_metric
    extractor = StyleFeatureExtractor.from_config(metrics_cfg)
    style = StyleModel.fit(extractor.extract(reference[1], reference[0]), metrics_cfg)
    train_features = extractor.extract(train_crops[1], train_crops[0])
    memory = StyleModel.fit(train_features, metrics_cfg)
    stats = style.settings
    clip, adherence_backend = ClipScorer.load(settings.adherence)
    for row in rows:
        measure(row, extractor, style, memory, train_crops, plan, settings.memorisation, clip)
    painter_judge, judge_auc = judge_rows(rows, reference, scans, plan, settings.judge, stats)
    found = comparisons(rows, settings, stats, plan)
    near = settings.memorisation.near_copy_distance
    models = {}
    for row in rows:
        models[row.name] = {
            "description": row.description,
            "replicates": len(row.images),
            "images": int(row.scores.size),
            "style_score": clustered(row.scores, plan, stats),
            "kid": row.kid.as_dict(),
            "judge_p_painter": clustered(row.judge, plan, stats),
            "judge_auc": judge_auc[row.name],
            "adherence": NOT_AVAILABLE if row.adherence is None else clustered(row.adherence, plan, stats),
            "diversity": float(np.mean(list(row.diversity.values()))) if row.diversity else None,
            "memorisation": {"min_distance": float(row.nearest_distance.min()),
                             "mean_distance": float(row.nearest_distance.mean()),
                             "near_copies": int((row.nearest_distance < near).sum()),
                             "max_pixel_correlation": float(row.pixel_correlation.max())},
            "seconds_generation": round(row.seconds, 2),
        }
    references = {"training_crops": style.score(train_features)}
    if roundtrip:
        references["training_crops_through_the_vae"] = style.score(extractor.extract(roundtrip))
    reference_scores = {name: {"count": len(values),
                               "style_score": clustered_mean(values[None, :, None], stats.bootstrap,
                                                             stats.confidence, stats.seed).as_dict()}
                        for name, values in references.items()}
    roundtrip_score = reference_scores.get("training_crops_through_the_vae", {}).get("style_score")
    gen = settings.generation
    return {
        "compare_to": settings.compare_to,
        "pairs": [[str(a), str(b)] for a, b in settings.pairs],
        "colour_matched": settings.matched_names,
        "alpha": settings.alpha,
        "plan": {"prompts": list(settings.prompts), "seeds": list(settings.seeds),
                 "replicates": ReplicatesSettings.from_config(cfg.replicates).count},
        "generation": {"size": "x".join(map(str, gen.size)), "steps": gen.steps, "guidance": gen.guidance},
        "reference": {"heldout_scans": sorted(set(scans)), "heldout_crops": len(scans),
                      "train_crops": len(train_crops[0]), "typical_distance": style.typical_distance,
                      "judge_p_painter_heldout": float(painter_judge.mean())},
        "references": reference_scores,
        "adherence_backend": adherence_backend,
        "memorisation_threshold": near,
        "models": models,
        "comparisons": found,
        "verdicts": verdicts(rows, found, settings, roundtrip_score),
        "runtime": runtime.describe(),
        "per_image": per_image_rows(rows, plan, settings.compare_to),
        "diversity_per_prompt": {row.name: row.diversity for row in rows},
    }


def per_image_rows(rows: list[Row], plan: Plan, baseline: str) -> list[dict]:
    """One row per model, replicate and image (scores.csv; the DVC plots read model, prompt,
    style_score and vs_baseline)."""
    base = next(row for row in rows if row.name == baseline)
    table = []
    for row in rows:
        for r, replicate in enumerate(row.images):
            base_scores = base.scores[r if len(base.images) > 1 else 0]
            for i, (p_index, content, seed) in enumerate(plan):
                table.append({
                    "model": row.name, "replicate": r, "sample": i, "prompt_index": p_index, "prompt": content,
                    "seed": seed, "style_score": round(float(row.scores[r, i]), 6),
                    "vs_baseline": round(float(row.scores[r, i] - base_scores[i]), 6),
                    "judge_p_painter": round(float(row.judge[r, i]), 6),
                    "adherence": "" if row.adherence is None else round(float(row.adherence[r, i]), 4),
                    "nearest_train_crop": row.nearest_crop[r][i],
                    "nearest_train_distance": round(float(row.nearest_distance[r, i]), 6),
                    "pixel_correlation": round(float(row.pixel_correlation[r, i]), 6),
                    "image": image_path(row.name, r, p_index, seed),
                })
    return table


def image_path(model: str, replicate: int, prompt_index: int, seed: int) -> str:
    return f"images/{model}/r{replicate}_p{prompt_index:02d}_s{seed}.png"


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_report(folder: Path, settings: EvaluateSettings, metrics: dict, rows: list[Row], plan: Plan,
                 reference: tuple[list[str], list[Image.Image]], train_crops: tuple[list[str], list[Image.Image]],
                 roundtrip: list[Image.Image]) -> None:
    table = metrics.pop("per_image")
    for row in rows:
        (folder / "images" / row.name).mkdir(parents=True)
        for r, replicate in enumerate(row.images):
            for image, (p_index, _, seed) in zip(replicate, plan):
                image.save(folder / image_path(row.name, r, p_index, seed))
    write_csv(folder / "scores.csv", table, list(table[0]))
    prompts = metrics["plan"]["prompts"]
    per_prompt = [{"prompt_index": i, "prompt": p,
                   **{row.name: round(float(cube(row.scores, plan)[:, i].mean()), 6) for row in rows},
                   **{f"{row.name}_diversity": row.diversity.get(i) for row in rows}} for i, p in enumerate(prompts)]
    write_csv(folder / "per_prompt.csv", per_prompt, list(per_prompt[0]))
    draw_grid(rows, plan, prompts, settings.report.cell, settings.report.grid_seeds).save(folder / "grid.png")
    (folder / "summary.md").write_text(markdown_summary(metrics), encoding="utf-8")
    (folder / "report.html").write_text(render_report(metrics, rows, plan, reference, train_crops, roundtrip,
                                                      settings.report, settings.memorisation.pairs_shown),
                                        encoding="utf-8")


def results_of(metrics: dict) -> dict:
    """What results.json commits: per row the style_score and judge AUC intervals, the references,
    every comparison (both judges) and the verdicts; rounded, so a diff reads as a change."""
    def triple(entry: dict) -> list[float]:
        return [round(entry["value"], 4), round(entry["ci_low"], 4), round(entry["ci_high"], 4)]

    def effect(entry: dict) -> dict:
        keys = ("mean_difference", "ci_low", "ci_high", "p_value")
        return {**{k: round(entry[k], 4) for k in keys}, "significant": entry["significant"],
                "replicates_agreeing": entry["replicates_agreeing"], "replicates": entry["replicates"]}

    return {
        "alpha": metrics["alpha"], "replicates": metrics["plan"]["replicates"],
        "prompts": len(metrics["plan"]["prompts"]), "seeds": len(metrics["plan"]["seeds"]),
        "reference": {"heldout_scans": len(metrics["reference"]["heldout_scans"]),
                      "heldout_crops": metrics["reference"]["heldout_crops"]},
        "models": {name: {"style_score": triple(m["style_score"]), "judge_auc": triple(m["judge_auc"])}
                   for name, m in metrics["models"].items()},
        "references": {name: {"style_score": triple(r["style_score"])} for name, r in metrics["references"].items()},
        "comparisons": {name: {judge: effect(e) for judge, e in c.items() if judge in ("style", "judge")}
                        for name, c in metrics["comparisons"].items()},
        "verdicts": metrics["verdicts"],
        "runtime": metrics["runtime"],
    }


def headline(metrics: dict) -> dict:
    """The few numbers `dvc metrics show` and the MLflow runs table show for an evaluation
    (data/evaluate/headline.json): each adapter row's style_score gain over `compare_to` and its
    smallest margin over a colour-filter baseline, and each `pairs` difference by both judges."""
    numbers = {}
    found = metrics["comparisons"]
    for name in metrics["verdicts"]["style_learned"]:
        numbers[f"{name}_gain"] = found[f"{name}_vs_{metrics['compare_to']}"]["style"]["mean_difference"]
        margins = [found[f"{name}_vs_{other}"]["style"]["mean_difference"] for other in metrics["colour_matched"]]
        if margins:
            numbers[f"{name}_over_colour_filter"] = min(margins)
    for model, against in metrics["pairs"]:
        numbers[f"{model}_vs_{against}"] = found[f"{model}_vs_{against}"]["style"]["mean_difference"]
        numbers[f"{model}_vs_{against}_judge"] = found[f"{model}_vs_{against}"]["judge"]["mean_difference"]
    return numbers


def log_outputs(tracker: Tracker, out_dir: Path) -> None:
    report = out_dir / "report"
    for name in ("metrics.json", "report.html", "scores.csv", "per_prompt.csv", "summary.md"):
        tracker.log_artifact(report / name, artifact_path="evaluate")
    tracker.log_artifact(out_dir / "results.json", artifact_path="evaluate")
    tracker.log_picture(report / "grid.png", "evaluate")


main = hydra_entry(run)


if __name__ == "__main__":
    main()
