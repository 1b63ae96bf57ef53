"""An independent judge of "paints like the painter": a small classifier trained from scratch to
tell the painter's held-out works from generated images.

The style metric (artmaster.metrics) also picks ArtAug's regions (critic) and keeps its refined
images (filter), so judging the augmented adapter with it alone would grade ArtAug by its own
criterion. This judge shares nothing with it: it learns its own features, from pixels, on other
data. It is a classifier two-sample test, cross-fitted: the images are split into folds (the
painter's by scan, generated ones by prompt, so no fold holds a near-twin of a training image),
and each image is judged by a classifier trained on the other folds. Its score for an image is the
probability that the image is the painter's; a model whose images the judge cannot tell from the
painter's (AUC 0.5 between the two) paints, as far as this judge can see, like the painter.

The classifier sees random patches (texture and brushwork, not the whole composition, which differs
with the content prompts) and judges an image by the mean logit of its patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from artmaster.config import Settings


@dataclass(frozen=True)
class JudgeSettings(Settings):
    patch: int
    steps: int
    batch_size: int
    lr: float
    channels: tuple[int, ...]
    folds: int
    seed: int

    @classmethod
    def from_config(cls, judge: DictConfig) -> JudgeSettings:
        settings = super().from_config(judge)
        if settings.folds < 2:
            raise ValueError(f"evaluate.judge.folds={settings.folds}: at least 2 (each image is judged by a "
                             "classifier trained on the other folds)")
        if settings.patch < 8 or settings.steps < 1 or settings.batch_size < 2 or not settings.channels:
            raise ValueError("evaluate.judge: patch >= 8, steps >= 1, batch_size >= 2 and some channels are needed")
        return settings


def classifier(channels: Sequence[int]) -> torch.nn.Module:
    """A small conv net: a 3x3 conv, then strided 3x3 convs, global average pool, one logit."""
    layers, width = [], 3
    for index, out in enumerate(channels):
        layers += [torch.nn.Conv2d(width, out, 3, stride=1 if index == 0 else 2, padding=1), torch.nn.ReLU()]
        width = out
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 1))


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _random_patches(images: list[torch.Tensor], count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    picks = torch.randint(len(images), (count,), generator=generator)
    patches = []
    for index in picks.tolist():
        image = images[index]
        top = int(torch.randint(image.shape[1] - size + 1, (1,), generator=generator))
        left = int(torch.randint(image.shape[2] - size + 1, (1,), generator=generator))
        patch = image[:, top : top + size, left : left + size]
        patches.append(patch.flip(-1) if bool(torch.randint(2, (1,), generator=generator)) else patch)
    return torch.stack(patches)


def _grid_patches(image: torch.Tensor, size: int) -> torch.Tensor:
    """Non-overlapping patches covering the image (the last row and column flush with its edge)."""
    _, height, width = image.shape
    tops = sorted({*range(0, height - size + 1, size), height - size})
    lefts = sorted({*range(0, width - size + 1, size), width - size})
    return torch.stack([image[:, t : t + size, l : l + size] for t in tops for l in lefts])


def _train(painter: list[torch.Tensor], generated: list[torch.Tensor], settings: JudgeSettings,
           seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = classifier(settings.channels)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    half = settings.batch_size // 2
    labels = torch.cat([torch.ones(half), torch.zeros(half)])  # balanced: the painter's works are few
    model.train()
    for _ in range(settings.steps):
        batch = torch.cat([_random_patches(painter, half, settings.patch, generator),
                           _random_patches(generated, half, settings.patch, generator)])
        loss = F.binary_cross_entropy_with_logits(model(batch)[:, 0], labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def _judge(model: torch.nn.Module, images: list[torch.Tensor], patch: int) -> np.ndarray:
    return np.array([float(torch.sigmoid(model(_grid_patches(image, patch))[:, 0].mean())) for image in images])


def cross_fitted_scores(painter: Sequence[Image.Image], painter_groups: Sequence[str],
                        generated: Sequence[Image.Image], generated_groups: Sequence[int],
                        settings: JudgeSettings, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """P(painter) for every image, each from the classifier of the fold that did not train on it.

    Folds: the painter's groups (scans) and the generated images' groups (prompts) are each dealt
    round-robin into min(folds, painter groups) folds."""
    scans = sorted(set(painter_groups))
    if len(scans) < 2:
        raise ValueError(f"the judge needs the painter's held-out works from at least 2 scans, got {len(scans)}")
    small = min(min(image.size) for image in [*painter, *generated])
    if small < settings.patch:
        raise ValueError(f"evaluate.judge.patch={settings.patch} px is larger than an image ({small} px)")
    folds = min(settings.folds, len(scans))
    scan_fold = {scan: i % folds for i, scan in enumerate(scans)}
    prompt_fold = {prompt: i % folds for i, prompt in enumerate(sorted(set(generated_groups)))}
    painter_fold = np.array([scan_fold[g] for g in painter_groups])
    generated_fold = np.array([prompt_fold[g] for g in generated_groups])
    painter_tensors = [_tensor(image) for image in painter]
    generated_tensors = [_tensor(image) for image in generated]
    painter_scores, generated_scores = np.empty(len(painter)), np.empty(len(generated))
    for fold in tqdm(range(folds), desc="evaluate: judge", unit="fold", disable=not progress):
        model = _train([t for t, f in zip(painter_tensors, painter_fold) if f != fold],
                       [t for t, f in zip(generated_tensors, generated_fold) if f != fold],
                       settings, settings.seed * 1000 + fold)
        held_painter, held_generated = np.flatnonzero(painter_fold == fold), np.flatnonzero(generated_fold == fold)
        painter_scores[held_painter] = _judge(model, [painter_tensors[i] for i in held_painter], settings.patch)
        generated_scores[held_generated] = _judge(model, [generated_tensors[i] for i in held_generated],
                                                  settings.patch)
    return painter_scores, generated_scores
