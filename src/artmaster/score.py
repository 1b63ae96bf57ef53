"""Tools `artmaster score` and `artmaster validate-metric`: style fidelity of any folders of images.

    artmaster score --reference DIR --images DIR [--json out.json] [hydra overrides]
    artmaster validate-metric --painter DIR --others DIR [--json out.json] [hydra overrides]

Metric settings come from the composed config (`evaluate.metrics`, conf/evaluate/default.yaml);
trailing arguments are Hydra overrides, e.g. `evaluate.metrics.model.k=5`.
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
from artmaster.metrics import (
    FeatureSet,
    ModelSettings,
    StyleFeatureExtractor,
    StyleModel,
    bootstrap_mean,
    image_files,
    validate,
)

USAGE = {
    "score": "score images against a painter's reference works (higher style_score = closer)",
    "validate-metric": "check that the style metric tells a painter's works from other images",
}


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"artmaster {command}",
        description=USAGE[command],
        epilog="Trailing arguments are Hydra overrides of conf/, e.g. evaluate.metrics.model.k=5",
    )
    if command == "score":
        parser.add_argument("--reference", type=Path, required=True, help="folder of the painter's works")
        parser.add_argument("--images", type=Path, required=True, help="folder of images to score")
    else:
        parser.add_argument("--painter", type=Path, required=True, help="folder of the painter's works")
        parser.add_argument("--others", type=Path, required=True, help="folder of other images")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    temporary.replace(path)


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


def validate_folders(painter_dir: Path, others_dir: Path, metrics: DictConfig) -> dict:
    """Leave-one-out retrieval accuracy and AUC of the metric on two labelled folders."""
    extractor = StyleFeatureExtractor.from_config(metrics)
    (painter, others), skipped = _extract_folders(extractor, {"painter": painter_dir, "others": others_dir})
    # Prefix names so that equally named files in the two folders stay distinguishable.
    painter.names = [f"painter/{name}" for name in painter.names]
    others.names = [f"others/{name}" for name in others.names]
    result = validate(painter, others, ModelSettings.from_config(metrics))
    return {
        "painter": str(painter_dir),
        "others": str(others_dir),
        "painter_count": len(painter),
        "others_count": len(others),
        "retrieval_accuracy": result.retrieval_accuracy,
        "painter_retrieval_accuracy": result.painter_accuracy,
        "others_retrieval_accuracy": result.others_accuracy,
        "auc": result.auc,
        "painter_mean_style_score": float(np.mean(result.painter_scores)),
        "others_mean_style_score": float(np.mean(result.others_scores)),
        "misretrieved": [{"file": file, "nearest": nearest} for file, nearest in result.misretrieved],
        "skipped": skipped,
        **_summary(metrics, extractor),
    }


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
    print(f"painter works: {result['painter_count']} in {result['painter']}")
    print(f"other images:  {result['others_count']} in {result['others']}")
    print(
        f"leave-one-out retrieval accuracy: {result['retrieval_accuracy']:.1%} "
        f"(painter {result['painter_retrieval_accuracy']:.1%}, others {result['others_retrieval_accuracy']:.1%})"
    )
    print(f"AUC, painter's works vs others (leave-one-out style_score): {result['auc']:.3f}")
    print(
        f"mean style_score: painter {result['painter_mean_style_score']:.3f}, "
        f"others {result['others_mean_style_score']:.3f}"
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
        metrics = compose(overrides).evaluate.metrics
    except HydraException as err:
        parser.error(f"bad Hydra override: {err}")
    try:
        if command == "score":
            result = score_folders(args.reference, args.images, metrics)
            print_scores(result)
        else:
            result = validate_folders(args.painter, args.others, metrics)
            print_validation(result)
    except (FileNotFoundError, ValueError) as err:
        print(f"artmaster {command}: {err}", file=sys.stderr)
        return 1
    if args.json:
        _write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
