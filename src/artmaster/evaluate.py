"""Stage `evaluate`: does the adapter paint like the painter, more than the base model does?

Every model of `evaluate.models` (the base model, the base model with the painter's style words in
the prompt, the adapter, the augmented adapter: a LoRA folder or none, plus a prompt prefix and
suffix) paints every content prompt of `evaluate.prompts` with every seed of `evaluate.seeds`.
Each image's starting noise depends only on its seed, so the models' images pair up by (prompt,
seed). The images are measured with the style metric of `evaluate.metrics` (artmaster.metrics):

- style fidelity against the painter's HELD-OUT scans (data.holdout; the crop stage marks their
  crops `split: heldout`, and no stage trains on them): mean style_score with a bootstrap
  interval, and KID (unbiased MMD^2) with a bootstrap interval. The references are those crops,
  resized by the training scale (generation.image_scale): the model learned the crops at that
  resolution, and comparing its images with full-resolution crops would mostly measure missing
  fine detail, the same for every model;
- a paired comparison with `compare_to` (the base model) on the same prompts and seeds: mean
  difference of style_score with a bootstrap interval and a paired permutation test (p-value);
- prompt adherence: CLIP score of each image against its content prompt, when a CLIP model is in
  `evaluate.adherence.clip_path`; "not available" otherwise;
- diversity: per prompt, the mean pairwise distance between its seeds' images in the style
  model's space (relative to the references' typical distance), averaged over prompts;
- memorisation: each image's nearest TRAINING crop (style-model space fitted on the training
  crops; distance relative to their own typical nearest-neighbour distance) and the pixel
  correlation of that pair; the most similar pairs are pictured.

Writes data/evaluate/: metrics.json (DVC metrics), scores.csv (one row per image and model; the
DVC plots of mean style_score and paired difference per prompt and model, template
.dvc/plots/style_by_model.json), per_prompt.csv, summary.md (the table), images/<model>/
p<prompt>_s<seed>.png, grid.png (prompts x models) and report.html (self-contained, images
inlined), all logged to MLflow.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import re
import textwrap
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw, ImageFont
from scipy.spatial.distance import pdist

from artmaster.config import hydra_entry, stage_dir
from artmaster.crop import HELDOUT, TRAIN, split_rows
from artmaster.files import read_jsonl, staged_dir
from artmaster.generate import adapter_applied, generate_images
from artmaster.metrics import FeatureSet, StyleFeatureExtractor, StyleModel, bootstrap_mean, paired_permutation_test
from artmaster.processes import Processes
from artmaster.tracking import log_picture, log_summary, stage_run
from artmaster.train import scaled_size

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
NOT_AVAILABLE = "not available"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    adapter: Path | None
    prefix: str
    suffix: str

    def prompt(self, content: str) -> str:
        return f"{self.prefix}{content}{self.suffix}"


@dataclass
class Generated:
    """One model's images, in plan order (prompt-major, then seed), and what was measured on them."""

    spec: ModelSpec
    images: list[Image.Image]
    seconds: float
    features: FeatureSet | None = None
    scores: np.ndarray | None = None
    adherence: np.ndarray | None = None
    nearest_crop: list[str] = field(default_factory=list)
    nearest_distance: np.ndarray | None = None
    pixel_correlation: np.ndarray | None = None


def model_specs(settings: DictConfig) -> list[ModelSpec]:
    """`evaluate.models`, checked: unique file-safe names, `compare_to` and `pairs` among them."""
    specs = []
    for entry in settings.models:
        name = str(entry.name)
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"evaluate.models: name {name!r} must use only letters, digits, '_' and '-'")
        adapter = entry.get("adapter")
        specs.append(ModelSpec(name, Path(str(adapter)) if adapter else None,
                               str(entry.get("prefix") or ""), str(entry.get("suffix") or "")))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluate.models: names must be unique, got {names}")
    if str(settings.compare_to) not in names:
        raise ValueError(f"evaluate.compare_to={settings.compare_to!r} is not one of evaluate.models {names}")
    for spec in specs:
        if spec.adapter is not None and not (spec.adapter.is_file() or any(spec.adapter.glob("*.safetensors"))):
            raise FileNotFoundError(
                f"evaluate.models[{spec.name}].adapter {spec.adapter}: no LoRA folder with *.safetensors "
                "(run the stage that writes it: train for data/train/lora, retrain for data/retrain/lora)"
            )
    for pair in settings.pairs:
        if len(pair) != 2 or not {str(name) for name in pair} <= set(names):
            raise ValueError(f"evaluate.pairs: {list(pair)} must name two of evaluate.models {names}")
    return specs


def sample_plan(settings: DictConfig) -> list[tuple[int, str, int]]:
    """(prompt index, content prompt, seed) for every prompt x seed, prompt-major."""
    prompts, seeds = [str(p) for p in settings.prompts], [int(s) for s in settings.seeds]
    if not prompts or not seeds:
        raise ValueError("evaluate.prompts and evaluate.seeds must both be non-empty")
    if len(prompts) * len(seeds) < 2:
        raise ValueError("evaluate needs at least 2 images per model (prompts x seeds) for KID and intervals")
    return [(index, prompt, seed) for index, prompt in enumerate(prompts) for seed in seeds]


def generation_size(settings: DictConfig) -> tuple[int, int]:
    gen = settings.generation
    return scaled_size(int(gen.width), int(gen.height), float(gen.image_scale))


# --- references: the held-out and the training crops, at the training scale -------------------


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


# --- measurements --------------------------------------------------------------------------------


def interval(values: np.ndarray, model: StyleModel) -> dict:
    s = model.settings
    return bootstrap_mean(np.asarray(values, dtype=np.float64), s.bootstrap, s.confidence, s.seed).as_dict()


def paired(values: np.ndarray, baseline: np.ndarray, model: StyleModel, alpha: float) -> dict:
    """Mean paired difference (values - baseline) with a bootstrap interval and a paired
    permutation test; `significant` when p < alpha."""
    s = model.settings
    test = paired_permutation_test(values, baseline, s.permutations, s.seed)
    difference = interval(np.asarray(values) - np.asarray(baseline), model)
    return {
        "mean_difference": test.mean_difference,
        "ci_low": difference["ci_low"],
        "ci_high": difference["ci_high"],
        "confidence": difference["confidence"],
        "p_value": test.p_value,
        "permutations": test.permutations,
        "exact": test.exact,
        "significant": bool(test.p_value < alpha),
        "pairs": int(len(values)),
    }


def diversity(model: StyleModel, features: FeatureSet, prompt_index: np.ndarray) -> tuple[float | None, dict]:
    """Mean pairwise distance between the images of each prompt (its seeds), in the style model's
    space relative to the references' typical distance: (mean over prompts, per prompt index)."""
    embedding = model.embed(features) / model.typical_distance
    per_prompt = {}
    for index in np.unique(prompt_index):
        rows = embedding[prompt_index == index]
        if len(rows) >= 2:
            per_prompt[int(index)] = float(pdist(rows).mean())
    value = float(np.mean(list(per_prompt.values()))) if per_prompt else None
    return value, per_prompt


def thumbnail_vectors(images: list[Image.Image], size: int) -> np.ndarray:
    """Greyscale `size` x `size` thumbnails, each centred and scaled to unit length (for Pearson
    correlation as a dot product)."""
    rows = []
    for image in images:
        grey = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BOX), dtype=np.float64).ravel()
        grey -= grey.mean()
        rows.append(grey / max(float(np.linalg.norm(grey)), 1e-9))
    return np.stack(rows)


class ClipScorer:
    """CLIP score = 100 x max(cosine(image, text), 0) with a local transformers CLIPModel."""

    def __init__(self, folder: Path, batch_size: int):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).eval()
        self.processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        self.batch_size = batch_size

    @classmethod
    def load(cls, settings: DictConfig) -> tuple[ClipScorer | None, str]:
        """(scorer, status): status is "clip (<folder>)" or "not available: <why>"."""
        path = settings.clip_path
        if not path:
            return None, f"{NOT_AVAILABLE}: evaluate.adherence.clip_path is not set"
        folder = Path(str(path))
        if not folder.is_dir() or not any(folder.glob("*.safetensors")):
            return None, f"{NOT_AVAILABLE}: no CLIP weights (*.safetensors) in {folder}"
        try:
            return cls(folder, int(settings.batch_size)), f"clip ({folder})"
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            log.warning("evaluate: CLIP model in %s could not be loaded: %s", folder, error)
            return None, f"{NOT_AVAILABLE}: could not load {folder} ({error})"

    @torch.no_grad()
    def score(self, images: list[Image.Image], texts: list[str]) -> np.ndarray:
        values = []
        for start in range(0, len(images), self.batch_size):
            inputs = self.processor(text=texts[start : start + self.batch_size],
                                    images=images[start : start + self.batch_size],
                                    return_tensors="pt", padding=True, truncation=True)
            image = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            text = self.model.get_text_features(input_ids=inputs["input_ids"],
                                                attention_mask=inputs.get("attention_mask"))
            image, text = (_embedding(t) for t in (image, text))
            cosine = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=1)
            values.append((100.0 * cosine.clamp(min=0)).numpy())
        return np.concatenate(values).astype(np.float64)


def _embedding(output) -> torch.Tensor:
    """transformers returns a tensor, or (newer versions) an output object holding the pooled one."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise TypeError(f"unexpected CLIP output {type(output).__name__}")


# --- generation ---------------------------------------------------------------------------------


@torch.no_grad()
def vae_roundtrip(vae, images: list[Image.Image]) -> list[Image.Image]:
    """Each image encoded (posterior mean) and decoded by the pipeline's VAE: every generation
    passes through that decoder, so the roundtrip of the training crops bounds the style a
    generator can reach with it."""
    out = []
    for image in images:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
        decoded = vae.decode(latents).sample[0].float().clamp(-1, 1)
        out.append(Image.fromarray(((decoded + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()))
    return out


def generate_all(cfg: DictConfig, specs: list[ModelSpec], plan: list[tuple[int, str, int]], processes: Processes,
                 roundtrip: list[Image.Image] = ()) -> tuple[list[Generated], list[Image.Image]]:
    """Every model's images, one pipeline per process (each paints its `share` of the plan; all
    images gathered on every process): adapters are loaded for their model and unloaded after;
    and the VAE roundtrip of `roundtrip` (see `vae_roundtrip`)."""
    from artmaster.models import load_pipeline

    settings = cfg.evaluate
    width, height = generation_size(settings)
    gen = settings.generation
    pipe = load_pipeline(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    decoded = vae_roundtrip(pipe.vae, list(roundtrip)) if roundtrip else []
    share = processes.share(plan, "evaluate")
    results = []
    for spec in specs:
        started = time.perf_counter()
        # model.fuse_lora: folded into the weights, as augment and generate paint (one compiled graph)
        with adapter_applied(pipe, spec.adapter, fold=bool(cfg.model.get("fuse_lora", False))):
            images = generate_images(
                pipe, [spec.prompt(content) for _, content, _ in share], [seed for _, _, seed in share],
                height=height, width=width, steps=int(gen.steps), guidance=float(gen.guidance),
                max_sequence_length=int(cfg.model.max_sequence_length), batch_size=int(gen.batch_size),
            )
        results.append(Generated(spec, processes.gather(images), time.perf_counter() - started))
        log.info("evaluate: %s painted %d images in %.1f s", spec.name, len(images), results[-1].seconds)
    return results, decoded


# --- pictures and report ------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def cell_image(image: Image.Image, size: int) -> Image.Image:
    """Fit into size x size (nearest-neighbour, so small generations stay crisp)."""
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.NEAREST)


def draw_grid(results: list[Generated], plan: list[tuple[int, str, int]], prompts: list[str], seeds: list[int],
              cell: int, grid_seeds: int) -> Image.Image:
    """Rows = prompts (text on the left), columns = models; each cell shows the first
    `grid_seeds` seeds side by side."""
    shown = seeds[: max(1, grid_seeds)]
    font = ImageFont.load_default(size=12)
    gap, label_w, header_h = 4, 170, 20
    column_w = len(shown) * cell + (len(shown) - 1) * 2
    width = label_w + len(results) * (column_w + gap)
    height = header_h + len(prompts) * (cell + gap)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    position = {(index, seed): i for i, (index, _, seed) in enumerate(plan)}
    for column, result in enumerate(results):
        left = label_w + column * (column_w + gap)
        draw.text((left + 2, 4), result.spec.name, fill="black", font=font)
        for row, prompt in enumerate(prompts):
            top = header_h + row * (cell + gap)
            for k, seed in enumerate(shown):
                grid.paste(cell_image(result.images[position[(row, seed)]], cell), (left + k * (cell + 2), top))
    for row, prompt in enumerate(prompts):
        top = header_h + row * (cell + gap)
        for line, text in enumerate(textwrap.wrap(prompt, 26)[:6]):
            draw.text((4, top + 4 + line * 15), text, fill="black", font=font)
    return grid


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


def _interval_text(entry: dict | None, digits: int = 3) -> str:
    if not entry:
        return "n/a"
    return f"{entry['value']:.{digits}f} [{entry['ci_low']:.{digits}f}, {entry['ci_high']:.{digits}f}]"


def summary_rows(metrics: dict) -> list[dict]:
    """One row per model (and the training-crops ceiling), the table of the report and README."""
    rows = []
    for name, entry in metrics["models"].items():
        comparison = entry.get("vs_baseline")
        rows.append({
            "model": name,
            "style_score": _interval_text(entry["style_score"]),
            "kid": _interval_text(entry["kid"], 4),
            "vs_baseline": "" if comparison is None else
            f"{comparison['mean_difference']:+.3f} [{comparison['ci_low']:+.3f}, {comparison['ci_high']:+.3f}]",
            "p_value": "" if comparison is None else f"{comparison['p_value']:.4f}",
            "adherence": entry["adherence"] if isinstance(entry["adherence"], str)
            else _interval_text(entry["adherence"], 2),
            "diversity": _fmt(entry["diversity"]),
            "nearest_train": f"{entry['memorisation']['min_distance']:.3f} / {entry['memorisation']['mean_distance']:.3f}",
            "near_copies": str(entry["memorisation"]["near_copies"]),
        })
    for key, label in (("train_crops", "(training crops)"), ("vae_ceiling", "(training crops through the VAE)")):
        ceiling = metrics["reference"].get(key)
        if ceiling:
            rows.append({"model": label, "style_score": _interval_text(ceiling["style_score"]),
                         "kid": _interval_text(ceiling["kid"], 4), "vs_baseline": "", "p_value": "",
                         "adherence": "", "diversity": "", "nearest_train": "", "near_copies": ""})
    return rows


SUMMARY_COLUMNS = {
    "model": "model",
    "style_score": "style_score (mean, 95% CI)",
    "kid": "KID vs held-out (95% CI)",
    "vs_baseline": "paired diff vs baseline (95% CI)",
    "p_value": "p (paired permutation)",
    "adherence": "CLIP score",
    "diversity": "diversity",
    "nearest_train": "nearest training crop min / mean",
    "near_copies": "near-copies",
}


def headline(metrics: dict) -> dict:
    """The few numbers `dvc metrics show` and the MLflow runs table show for an evaluation (data/
    evaluate/headline.json): `<model>_gain`, the mean paired style_score difference from
    `compare_to` of each model that carries an adapter, and the `evaluate.pairs` differences
    (`augmented_vs_adapter`); every other number stays in metrics.json."""
    gains = {f"{name}_gain": entry["vs_baseline"]["mean_difference"]
             for name, entry in metrics["models"].items() if "vs_baseline" in entry and entry.get("adapter")}
    return {**gains, **{name: c["mean_difference"] for name, c in metrics.get("comparisons", {}).items()}}


def markdown_table(metrics: dict) -> str:
    rows = summary_rows(metrics)
    lines = ["| " + " | ".join(SUMMARY_COLUMNS.values()) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(row[key] for key in SUMMARY_COLUMNS) + " |" for row in rows]
    lines += [f"\n{line}" for line in comparison_lines(metrics)]
    return "\n".join(lines) + "\n"


def comparison_lines(metrics: dict) -> list[str]:
    """One sentence per `evaluate.pairs` entry, e.g. whether the augmented adapter beats round 0's."""
    lines = []
    for name, c in metrics.get("comparisons", {}).items():
        model, against = name.split("_vs_")
        closer = "closer to" if c["mean_difference"] > 0 else "no closer to"
        significance = "significant" if c["significant"] else "not significant"
        lines.append(f"{model} vs {against}: style_score difference {c['mean_difference']:+.3f} "
                     f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], p = {c['p_value']:.4f} over {c['pairs']} pairs: "
                     f"{model} scores {closer} the painter than {against} ({significance}).")
    return lines


def render_report(metrics: dict, per_prompt: list[dict], results: list[Generated], plan: list[tuple[int, str, int]],
                  prompts: list[str], seeds: list[int], reference: tuple[list[str], list[Image.Image]],
                  train_crops: tuple[list[str], list[Image.Image]], settings: DictConfig,
                  roundtrip: list[Image.Image] = ()) -> str:
    """report.html: one file, every picture inlined as a base64 PNG."""
    esc = html.escape
    cell = int(settings.report.cell)
    names = [r.spec.name for r in results]
    baseline = metrics["compare_to"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ArtMaster evaluation</title><style>",
        "body{font-family:sans-serif;margin:1.5em;color:#222} table{border-collapse:collapse;margin:0.6em 0}",
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:top} th{background:#f3f3f3}",
        "img{image-rendering:pixelated;margin:1px} .small{font-size:11px;color:#555} .sig{color:#0a7a28;font-weight:bold}",
        "</style></head><body>",
        "<h1>ArtMaster evaluation</h1>",
        f"<p>Style reference: <b>{metrics['reference']['heldout_crops']}</b> crops of the held-out scans "
        f"{esc(', '.join(metrics['reference']['heldout_scans']))} (never trained on), resized to the training scale. "
        f"{len(prompts)} prompts x {len(seeds)} seeds per model at {esc(metrics['generation']['size'])} px, "
        f"{metrics['generation']['steps']} steps, guidance {metrics['generation']['guidance']}. "
        f"Paired comparisons are against <b>{esc(baseline)}</b> on the same prompts and seeds "
        f"(significant when p &lt; {metrics['alpha']}).</p>",
        "<h2>Summary</h2><table><tr>" + "".join(f"<th>{esc(v)}</th>" for v in SUMMARY_COLUMNS.values()) + "</tr>",
    ]
    for row in summary_rows(metrics):
        entry = metrics["models"].get(row["model"], {})
        significant = (entry.get("vs_baseline") or {}).get("significant")
        cells = []
        for key in SUMMARY_COLUMNS:
            css = " class='sig'" if key == "p_value" and significant else ""
            cells.append(f"<td{css}>{esc(row[key])}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    parts.extend(f"<p>{esc(line)}</p>" for line in comparison_lines(metrics))
    parts.append(
        "<p class='small'>style_score: higher = closer to the painter (about -1 for a typical reference work "
        "against the others). KID: unbiased MMD^2 against the held-out crops (0 = same distribution). "
        "Diversity: mean pairwise style distance between the seeds of one prompt, relative to the references' "
        "typical distance. Nearest training crop: style-space distance relative to the training crops' own typical "
        f"nearest-neighbour distance; near-copies are below {metrics['memorisation_threshold']}. "
        "(training crops): the training crops themselves scored against the held-out crops, the level a "
        "model reproducing its training data would reach; (training crops through the VAE): the same after "
        "the pipeline's VAE encodes and decodes them, the best any generation through that decoder can "
        "reach.</p>"
    )

    # per-prompt means
    parts.append("<h2>Per prompt: mean style_score (diversity)</h2><table><tr><th>prompt</th>"
                 + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>")
    for row in per_prompt:
        cells = "".join(f"<td>{row[n]:.3f} ({_fmt(row[f'{n}_diversity'], 2)})</td>" for n in names)
        parts.append(f"<tr><td>{esc(row['prompt'])}</td>{cells}</tr>")
    parts.append("</table>")

    # grid: prompt x model, every seed
    parts.append("<h2>Images: prompts x models (every seed; style_score under each image)</h2><table><tr><th>prompt</th>"
                 + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>")
    for index, prompt in enumerate(prompts):
        parts.append(f"<tr><td>{esc(prompt)}</td>")
        for result in results:
            cells = []
            for i, (p_index, _, seed) in enumerate(plan):
                if p_index != index:
                    continue
                title = esc(f"{result.spec.prompt(prompt)} | seed {seed}")
                cells.append(f"<div style='display:inline-block;text-align:center'>"
                             f"<img src='{data_uri(cell_image(result.images[i], cell))}' title='{title}'>"
                             f"<br><span class='small'>s{seed}: {result.scores[i]:.2f}</span></div>")
            parts.append("<td>" + "".join(cells) + "</td>")
        parts.append("</tr>")
    parts.append("</table>")

    # memorisation pairs
    shown = int(settings.memorisation.pairs_shown)
    candidates = [(float(r.nearest_distance[i]), r, i) for r in results for i in range(len(plan))]
    candidates.sort(key=lambda item: item[0])
    crops = dict(zip(*train_crops))
    parts.append(f"<h2>Memorisation: the {min(shown, len(candidates))} generations closest to a training crop</h2>"
                 "<table><tr><th>generation</th><th>nearest training crop</th><th>model, prompt, seed</th>"
                 "<th>style distance (relative)</th><th>pixel correlation</th></tr>")
    for distance, result, i in candidates[:shown]:
        p_index, prompt, seed = plan[i]
        crop_id = result.nearest_crop[i]
        parts.append(
            f"<tr><td><img src='{data_uri(cell_image(result.images[i], cell))}'></td>"
            f"<td><img src='{data_uri(cell_image(crops[crop_id], cell))}'><br><span class='small'>{esc(crop_id)}</span></td>"
            f"<td>{esc(result.spec.name)}<br>{esc(prompt)}<br>seed {seed}</td><td>{distance:.3f}</td>"
            f"<td>{result.pixel_correlation[i]:.3f}</td></tr>"
        )
    parts.append("</table>")

    # the reference
    ref_names, ref_images = reference
    count = min(int(settings.report.reference_shown), len(ref_images))
    parts.append(f"<h2>Style reference: held-out crops ({count} of {len(ref_images)} shown)</h2><p>")
    for name, image in list(zip(ref_names, ref_images))[:count]:
        parts.append(f"<img src='{data_uri(cell_image(image, cell))}' title='{esc(name)}'>")
    parts.append("</p>")
    if roundtrip:
        count = min(int(settings.report.reference_shown), len(roundtrip))
        parts.append(f"<h2>Training crops (top) and their VAE encode + decode (bottom): the ceiling of every "
                     f"model ({count} of {len(roundtrip)} shown)</h2><table><tr>")
        parts += [f"<td><img src='{data_uri(cell_image(image, cell))}' title='{esc(name)}'><br>"
                  f"<img src='{data_uri(cell_image(decoded, cell))}'></td>"
                  for name, image, decoded in list(zip(*train_crops, roundtrip))[:count]]
        parts.append("</tr></table>")
    parts.append(f"<p class='small'>Prompt adherence: {esc(metrics['adherence_backend'])}.</p></body></html>")
    return "\n".join(parts)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# --- the stage ----------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict:
    """Generate the prompt x seed set with every model and measure style fidelity (against the
    held-out scans), paired gains over the baseline, adherence, diversity and memorisation."""
    settings = cfg.evaluate
    metrics_cfg = settings.metrics
    specs = model_specs(settings)
    plan = sample_plan(settings)
    prompts, seeds = [str(p) for p in settings.prompts], [int(s) for s in settings.seeds]
    crop_dir = stage_dir(cfg, "crop")
    crops = read_jsonl(crop_dir / "crops.jsonl", within={"path": crop_dir})  # no path out of data/crop
    heldout_rows, train_rows = split_rows(crops, HELDOUT), split_rows(crops, TRAIN)
    if len(heldout_rows) < 2:
        raise ValueError(
            f"evaluate: {crop_dir / 'crops.jsonl'} has {len(heldout_rows)} held-out crop(s); the style reference "
            "needs at least 2: set data.holdout.scans >= 1 and re-run the crop stage"
        )
    if len(train_rows) < 2:
        raise ValueError(f"evaluate: {crop_dir / 'crops.jsonl'} has fewer than 2 training crops")
    image_scale = float(settings.generation.image_scale)
    out_dir = stage_dir(cfg, "evaluate")
    started = time.perf_counter()

    processes = Processes(cfg.model)
    tracking = stage_run(cfg, "evaluate", sections=("evaluate", "model")) if processes.is_main else nullcontext()
    with tracking:
        # only the main process scores: the others need no crops, and no VAE roundtrip of them
        train_crops = load_crops(crop_dir, train_rows if processes.is_main else [], image_scale)
        results, roundtrip = generate_all(cfg, specs, plan, processes, train_crops[1] if settings.vae_ceiling else [])
        generation_seconds = time.perf_counter() - started
        if not processes.is_main:
            return {}
        with staged_dir(out_dir) as staging:
            import mlflow

            extractor = StyleFeatureExtractor.from_config(metrics_cfg)
            reference = load_crops(crop_dir, heldout_rows, image_scale)
            style_model = StyleModel.fit(extractor.extract(reference[1], reference[0]), metrics_cfg)
            train_features = extractor.extract(train_crops[1], train_crops[0])
            train_model = StyleModel.fit(train_features, metrics_cfg)

            clip, adherence_backend = ClipScorer.load(settings.adherence)
            prompt_index = np.array([index for index, _, _ in plan])
            train_thumbs = thumbnail_vectors(train_crops[1], int(settings.memorisation.pixel_size))
            for result in results:
                result.features = extractor.extract(result.images, [f"{result.spec.name}/{i}" for i in range(len(plan))])
                result.scores = style_model.score(result.features)
                index, distance = train_model.nearest_references(result.features)
                result.nearest_crop = [train_crops[0][i] for i in index]
                result.nearest_distance = distance / train_model.typical_distance
                thumbs = thumbnail_vectors(result.images, int(settings.memorisation.pixel_size))
                result.pixel_correlation = np.einsum("ij,ij->i", thumbs, train_thumbs[index])
                if clip is not None:
                    result.adherence = clip.score(result.images, [content for _, content, _ in plan])

            # --- metrics -----------------------------------------------------------------------
            alpha = float(settings.alpha)
            near = float(settings.memorisation.near_copy_distance)
            baseline = next(r for r in results if r.spec.name == str(settings.compare_to))
            models, per_prompt = {}, [{"prompt_index": i, "prompt": p} for i, p in enumerate(prompts)]
            for result in results:
                spread, spread_per_prompt = diversity(style_model, result.features, prompt_index)
                for i, row in enumerate(per_prompt):
                    row[result.spec.name] = round(float(result.scores[prompt_index == i].mean()), 6)
                    row[f"{result.spec.name}_diversity"] = spread_per_prompt.get(i)
                entry = {
                    "adapter": str(result.spec.adapter) if result.spec.adapter else None,
                    "prompt_template": result.spec.prompt("<prompt>"),
                    "images": len(result.images),
                    "style_score": interval(result.scores, style_model),
                    "kid": style_model.set_distance(result.features).as_dict(),
                    "adherence": NOT_AVAILABLE if result.adherence is None else interval(result.adherence, style_model),
                    "diversity": spread,
                    "memorisation": {
                        "min_distance": float(result.nearest_distance.min()),
                        "mean_distance": float(result.nearest_distance.mean()),
                        "near_copies": int((result.nearest_distance < near).sum()),
                        "max_pixel_correlation": float(result.pixel_correlation.max()),
                    },
                    "seconds_generation": round(result.seconds, 2),
                }
                if result is not baseline:
                    entry["vs_baseline"] = paired(result.scores, baseline.scores, style_model, alpha)
                    if result.adherence is not None and baseline.adherence is not None:
                        entry["adherence_vs_baseline"] = paired(result.adherence, baseline.adherence, style_model, alpha)
                models[result.spec.name] = entry
            by_name = {result.spec.name: result for result in results}
            comparisons = {
                f"{model}_vs_{against}": paired(by_name[model].scores, by_name[against].scores, style_model, alpha)
                for model, against in ((str(a), str(b)) for a, b in settings.pairs)
            }
            width, height = generation_size(settings)
            train_scores = style_model.score(train_features)
            metrics = {
                "compare_to": baseline.spec.name,
                "alpha": alpha,
                "reference": {
                    "heldout_scans": sorted({str(r["scan_id"]) for r in heldout_rows}),
                    "heldout_crops": len(heldout_rows),
                    "train_crops": {"count": len(train_rows), "style_score": interval(train_scores, style_model),
                                    "kid": style_model.set_distance(train_features).as_dict()},
                    "vae_ceiling": None if not roundtrip else {
                        "style_score": interval(style_model.score(extractor.extract(roundtrip)), style_model),
                        "kid": style_model.set_distance(extractor.extract(roundtrip)).as_dict(),
                    },
                    "typical_distance": style_model.typical_distance,
                },
                "generation": {"size": f"{width}x{height}", "steps": int(settings.generation.steps),
                               "guidance": float(settings.generation.guidance), "prompts": len(prompts),
                               "seeds": len(seeds)},
                "adherence_backend": adherence_backend,
                "memorisation_threshold": near,
                "models": models,
                "comparisons": comparisons,
            }

            # --- files ---------------------------------------------------------------------------
            rows = []
            for result in results:
                folder = staging / "images" / result.spec.name
                folder.mkdir(parents=True)
                for i, (p_index, content, seed) in enumerate(plan):
                    relative = f"images/{result.spec.name}/p{p_index:02d}_s{seed}.png"
                    result.images[i].save(staging / relative)
                    rows.append({
                        "model": result.spec.name, "sample": i, "prompt_index": p_index, "prompt": content,
                        "seed": seed, "style_score": round(float(result.scores[i]), 6),
                        "vs_baseline": round(float(result.scores[i] - baseline.scores[i]), 6),
                        "adherence": "" if result.adherence is None else round(float(result.adherence[i]), 4),
                        "nearest_train_crop": result.nearest_crop[i],
                        "nearest_train_distance": round(float(result.nearest_distance[i]), 6),
                        "pixel_correlation": round(float(result.pixel_correlation[i]), 6),
                        "image": relative,
                    })
            columns = list(rows[0])
            write_csv(staging / "scores.csv", rows, columns)
            write_csv(staging / "per_prompt.csv", per_prompt,
                      ["prompt_index", "prompt", *models, *(f"{n}_diversity" for n in models)])
            draw_grid(results, plan, prompts, seeds, int(settings.report.cell), int(settings.report.grid_seeds)) \
                .save(staging / "grid.png")
            (staging / "summary.md").write_text(markdown_table(metrics), encoding="utf-8")
            report = render_report(metrics, per_prompt, results, plan, prompts, seeds, reference, train_crops, settings,
                                   roundtrip)
            (staging / "report.html").write_text(report, encoding="utf-8")
            metrics["seconds"] = {"generation": round(generation_seconds, 2),
                                  "total": round(time.perf_counter() - started, 2)}
            (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")

            # --- MLflow --------------------------------------------------------------------------
            log_summary(headline(metrics), folder=staging, note=markdown_table(metrics))
            mlflow.set_tag("evaluate.adherence", adherence_backend)
            mlflow.log_table({key: [row[key] for row in rows] for key in columns}, artifact_file="evaluate/scores.json")
            for name in ("metrics.json", "report.html", "scores.csv", "per_prompt.csv", "summary.md"):
                mlflow.log_artifact(str(staging / name), artifact_path="evaluate")
            log_picture(staging / "grid.png", "evaluate")

    print(markdown_table(metrics), end="")
    print(f"evaluate: {len(results)} models x {len(plan)} images in {metrics['seconds']['total']:.0f} s -> {out_dir}")
    return metrics


main = hydra_entry(run)


if __name__ == "__main__":
    main()
