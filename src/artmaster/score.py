"""Tools `artmaster score` and `artmaster validate-metric`: style fidelity of any folders of images.

    artmaster score --reference DIR --images DIR [--json out.json] [hydra overrides]
    artmaster validate-metric --painter DIR --others DIR [--group-by auto|folder|prefix|file]
                              [--choose-weights] [--json out.json] [hydra overrides]
    artmaster validate-metric --synthetic DIR [--choose-weights] ...

Metric settings come from the composed config (`style_metric`, conf/style_metric/default.yaml);
trailing arguments are Hydra overrides, e.g. `style_metric.model.k=5`.

validate-metric holds out whole scans: each file belongs to a group (`--group-by`): `folder` = its
first subfolder, `prefix` = its name up to the first '-' (the crop stage names crops
<scan>-<bucket>-<n>), `file` = itself, `auto` = folder for files in subfolders, else prefix. The
other images are also scored after each colour filter of `style_metric.validation.colour_transfer`
matched to the painter's works. `--synthetic DIR` first writes the demo painter's and the other
synthetic painters' crops (artmaster.painter, `style_metric.validation.synthetic`) into DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from hydra.errors import HydraException
from omegaconf import DictConfig

from artmaster.config import compose, params_hash
from artmaster.files import write_atomic
from artmaster.metrics import (
    FeatureSet,
    ModelSettings,
    StyleFeatureExtractor,
    StyleModel,
    bootstrap_mean,
    choose_block_weights,
    image_files,
    load_rgb,
    validate,
)
from artmaster.metrics.transfer import colour_matcher

GROUP_MODES = ("auto", "folder", "prefix", "file")

USAGE = {
    "score": "score images against a painter's reference works (higher style_score = closer)",
    "validate-metric": "check that the style metric tells a painter's works from other images",
}


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"artmaster {command}",
        description=USAGE[command],
        epilog="Trailing arguments are Hydra overrides of conf/, e.g. style_metric.model.k=5",
    )
    if command == "score":
        parser.add_argument("--reference", type=Path, required=True, help="folder of the painter's works")
        parser.add_argument("--images", type=Path, required=True, help="folder of images to score")
    else:
        parser.add_argument("--painter", type=Path, help="folder of the painter's works")
        parser.add_argument("--others", type=Path, help="folder of other images")
        parser.add_argument("--synthetic", type=Path, metavar="DIR",
                            help="write synthetic painters' crops into DIR/painter and DIR/others and validate on them")
        parser.add_argument("--group-by", choices=GROUP_MODES, default="auto",
                            help="which files come from one scan and are held out together (default: auto)")
        parser.add_argument("--choose-weights", action="store_true",
                            help="also choose the block weights that separate best under colour transfer")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(payload, indent=2) + "\n")


def _extract_folders(extractor: StyleFeatureExtractor, folders: dict[str, Path]) -> tuple[list[FeatureSet], list[dict]]:
    """Features of each folder (by role), after checking every folder holds image files, so a
    mistyped path fails before minutes of extraction; unreadable files are listed, not fatal."""
    listed = {role: image_files(folder) for role, folder in folders.items()}
    for role, files in listed.items():
        if not files:
            raise ValueError(f"no image files in {role} folder {folders[role]}")
    extracted, skipped = [], []
    for role, files in listed.items():
        features, unreadable = extractor.extract_files(files, root=folders[role])
        if not len(features):
            raise ValueError(f"no readable images in {role} folder {folders[role]}")
        extracted.append(features)
        skipped += [{"file": str(err.path), "reason": err.reason} for err in unreadable]
    return extracted, skipped


def _summary(metrics: DictConfig, extractor: StyleFeatureExtractor) -> dict:
    return {
        "metrics_params_hash": params_hash(metrics),
        "backend": extractor.backend.name if extractor.backend else "none",
    }


def score_folders(reference_dir: Path, images_dir: Path, metrics: DictConfig) -> dict:
    """Per-image style scores of `images_dir` against `reference_dir`, plus set-level KID."""
    extractor = StyleFeatureExtractor.from_config(metrics)
    (reference, images), skipped = _extract_folders(extractor, {"reference": reference_dir, "images": images_dir})
    model = StyleModel.fit(reference, metrics)
    scores = model.score(images)
    s = model.settings
    kid = model.set_distance(images).as_dict() if len(images) >= 2 else None
    return {
        "reference": str(reference_dir),
        "images_dir": str(images_dir),
        "reference_count": len(reference),
        "images": [{"file": name, "style_score": float(v)} for name, v in zip(images.names, scores)],
        "mean_style_score": bootstrap_mean(scores, s.bootstrap, s.confidence, s.seed).as_dict(),
        "kid": kid,
        "skipped": skipped,
        **_summary(metrics, extractor),
    }


def file_group(name: str, mode: str) -> str:
    """The group (scan) of a file named `name` relative to its folder; see the module docstring."""
    path = Path(name)
    if mode == "file":
        return name
    if mode == "folder" or (mode == "auto" and len(path.parts) > 1):
        return path.parts[0] if len(path.parts) > 1 else name
    return path.name.split("-", 1)[0]


def _transferred(extractor: StyleFeatureExtractor, others_dir: Path, names: list[str], painter_dir: Path,
                 painter_names: list[str], methods: list[str]) -> dict[str, FeatureSet]:
    """Features of the other images after each colour filter matched to the painter's works."""
    references = [load_rgb(painter_dir / name) for name in painter_names]
    images = [load_rgb(others_dir / name) for name in names]
    out = {}
    for method in methods:
        match = colour_matcher(method, references)
        out[method] = extractor.extract([match(image) for image in images], names)
    return out


def validate_folders(painter_dir: Path, others_dir: Path, metrics: DictConfig, group_by: str = "auto",
                     choose_weights: bool = False) -> dict:
    """Leave-one-scan-out AUC (plain and after each colour filter) and retrieval of the metric on
    two labelled folders; with `choose_weights`, the block weights chosen on them too."""
    extractor = StyleFeatureExtractor.from_config(metrics)
    (painter, others), skipped = _extract_folders(extractor, {"painter": painter_dir, "others": others_dir})
    settings = metrics.validation
    transferred = _transferred(extractor, others_dir, others.names, painter_dir, painter.names,
                               [str(m) for m in settings.colour_transfer])
    painter_groups = [file_group(name, group_by) for name in painter.names]
    others_groups = [file_group(name, group_by) for name in others.names]
    # Prefix names so that equally named files in the two folders stay distinguishable.
    painter.names = [f"painter/{name}" for name in painter.names]
    others.names = [f"others/{name}" for name in others.names]
    model_settings = ModelSettings.from_config(metrics)
    chosen = None
    if choose_weights:
        chosen = choose_block_weights(painter, others, model_settings, painter_groups, transferred,
                                      candidates=[float(c) for c in settings.weight_candidates],
                                      max_colour_gain={str(k): float(v) for k, v in settings.max_colour_gain.items()})
        result = chosen.validation
    else:
        result = validate(painter, others, model_settings, painter_groups, others_groups, transferred)
    return {
        "painter": str(painter_dir),
        "others": str(others_dir),
        "painter_count": len(painter),
        "painter_groups": result.painter_groups,
        "others_count": len(others),
        "group_by": group_by,
        "auc": result.auc,
        "auc_colour_transferred": result.auc_transferred,
        "colour_gain": result.colour_gain,
        "retrieval_accuracy": result.retrieval_accuracy,
        "painter_retrieval_accuracy": result.painter_accuracy,
        "others_retrieval_accuracy": result.others_accuracy,
        "painter_mean_style_score": float(np.mean(result.painter_scores)),
        "others_mean_style_score": float(np.mean(result.others_scores)),
        "colour_transferred_mean_style_score": {m: float(np.mean(v)) for m, v in result.transferred_scores.items()},
        "block_weights": chosen.weights if chosen else {k: float(v) for k, v in metrics.model.block_weights.items()},
        "weights_chosen": chosen is not None,
        "misretrieved": [{"file": file, "nearest": nearest} for file, nearest in result.misretrieved],
        "painter_scores": {name: float(v) for name, v in zip(painter.names, result.painter_scores)},
        "others_scores": {name: float(v) for name, v in zip(others.names, result.others_scores)},
        "skipped": skipped,
        **_summary(metrics, extractor),
    }


def write_synthetic_painters(folder: Path, synthetic: DictConfig) -> tuple[Path, Path]:
    """The demo painter's crops in folder/painter/<painting>/; in folder/others/<name>_<painting>/
    every other synthetic painter's (other styles, other styles in the demo painter's palette) and
    other works of the demo painter with rotated hues (`hue<shift>`)."""
    from tqdm import tqdm

    from artmaster.painter import DEMO_STYLE, STYLES, painting_crops, palette_variants, rotate_hue

    painter_dir, others_dir = folder / "painter", folder / "others"
    seed, demo = int(synthetic.seed), STYLES[DEMO_STYLE]
    styles = {name: style for name, style in STYLES.items() if name != DEMO_STYLE} | palette_variants(DEMO_STYLE)
    # (folder, name prefix, style, paintings, seed, hue shift)
    jobs = [(painter_dir, "", demo, int(synthetic.painter_paintings), seed, 0)]
    jobs += [(others_dir, f"{name}_", style, int(synthetic.other_paintings), seed, 0) for name, style in styles.items()]
    jobs += [(others_dir, f"hue{shift:+d}_", demo, int(synthetic.other_paintings), seed + 1, int(shift))
             for shift in synthetic.hue_shifts]
    with tqdm(total=sum(job[3] * int(synthetic.per_painting) for job in jobs), desc="synthetic painters",
              unit="crop") as bar:
        for root, prefix, style, paintings, job_seed, shift in jobs:
            for number, (index, crop) in enumerate(painting_crops(
                    style, paintings, job_seed, int(synthetic.crop), int(synthetic.long_side),
                    int(synthetic.per_painting))):
                target = root / f"{prefix}{index:02d}" / f"{number:03d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                (rotate_hue(crop, shift) if shift else crop).save(target)
                bar.update()
    return painter_dir, others_dir


def _interval(values: dict) -> str:
    return f"{values['value']:.4g}  [{values['confidence']:.0%} CI {values['ci_low']:.4g} .. {values['ci_high']:.4g}]"


def _print_skipped(skipped: list[dict]) -> None:
    for entry in skipped:
        print(f"skipped {entry['file']}: {entry['reason']}")


def print_scores(result: dict) -> None:
    width = max([len("file"), *(len(entry["file"]) for entry in result["images"])])
    print(f"{'file':<{width}}  style_score")
    for entry in result["images"]:
        print(f"{entry['file']:<{width}}  {entry['style_score']:11.3f}")
    print()
    print(f"references: {result['reference_count']} in {result['reference']} (backend: {result['backend']})")
    print(f"mean style_score: {_interval(result['mean_style_score'])}")
    if result["kid"] is None:
        print("KID: not available (needs at least 2 images)")
    else:
        print(f"KID (unbiased MMD^2, polynomial kernel) vs references: {_interval(result['kid'])}")
    _print_skipped(result["skipped"])


def print_validation(result: dict) -> None:
    print(f"painter works: {result['painter_count']} from {result['painter_groups']} scans in {result['painter']}")
    print(f"other images:  {result['others_count']} in {result['others']} (scans by: {result['group_by']})")
    weights = ", ".join(f"{name} {weight:g}" for name, weight in result["block_weights"].items())
    print(f"block weights{' (chosen here)' if result['weights_chosen'] else ''}: {weights}")
    print(f"AUC, painter's works vs others (leave-one-scan-out style_score): {result['auc']:.3f}")
    for method, auc in result["auc_colour_transferred"].items():
        print(f"AUC with the others colour-matched to the painter ({method}): {auc:.3f}; "
              f"that filter closes {result['colour_gain'][method]:.0%} of the score gap")
    print(
        f"leave-one-scan-out retrieval accuracy: {result['retrieval_accuracy']:.1%} "
        f"(painter {result['painter_retrieval_accuracy']:.1%}, others {result['others_retrieval_accuracy']:.1%})"
    )
    transferred = ", ".join(f"{m} {v:.3f}" for m, v in result["colour_transferred_mean_style_score"].items())
    print(
        f"mean style_score: painter {result['painter_mean_style_score']:.3f}, "
        f"others {result['others_mean_style_score']:.3f}, others colour-matched: {transferred}"
    )
    for entry in result["misretrieved"]:
        print(f"misretrieved: {entry['file']} -> nearest {entry['nearest']}")
    _print_skipped(result["skipped"])


def cli(command: str, argv: list[str]) -> int:
    """Entry point of both tools (see cli.TOOLS); returns the exit status."""
    parser = _parser(command)
    args, overrides = parser.parse_known_args(argv)
    flags = [arg for arg in overrides if arg.startswith("-")]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    try:
        metrics = compose(overrides).style_metric
    except HydraException as err:
        parser.error(f"bad Hydra override: {err}")
    try:
        if command == "score":
            result = score_folders(args.reference, args.images, metrics)
            print_scores(result)
        else:
            if args.synthetic:
                args.painter, args.others = write_synthetic_painters(args.synthetic, metrics.validation.synthetic)
            elif not (args.painter and args.others):
                parser.error("validate-metric needs --painter and --others, or --synthetic DIR")
            result = validate_folders(args.painter, args.others, metrics, args.group_by, args.choose_weights)
            print_validation(result)
    except (FileNotFoundError, ValueError) as err:
        print(f"artmaster {command}: {err}", file=sys.stderr)
        return 1
    if args.json:
        _write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
