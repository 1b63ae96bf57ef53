"""Training replicates: seeds, folders and configs of each replicate."""

from __future__ import annotations

from pathlib import Path

import pytest

from artmaster import replicates


def test_replicates_count_up_from_the_seed_and_the_product_keeps_the_usual_folders(make_cfg):
    cfg = make_cfg("replicates.count=3", "seed=5")
    runs = list(replicates.each(cfg))
    assert [(r.index, r.seed, c.seed) for r, c in runs] == [(0, 5, 5), (1, 6, 6), (2, 7, 7)]
    product, second, _ = (r for r, _ in runs)
    assert runs[0][1] is cfg, "the product runs the config as given"
    assert product.folder(Path("data/train")) == Path("data/train")
    assert second.folder(Path("data/train")) == Path("data/train/replicates/seed_6")
    assert second.adapter(Path("data/train/lora")) == Path("data/train/replicates/seed_6/lora")
    assert second.adapter(Path("data/retrain/round_0/lora")) == Path("data/retrain/round_0/replicates/seed_6/lora")


@pytest.mark.parametrize(("which", "others_render"), [("product", False), ("all", True)])
def test_only_the_replicates_asked_for_render_training_samples(make_cfg, which, others_render):
    cfg = make_cfg("replicates.count=2", f"replicates.samples={which}")
    (_, product), (_, other) = replicates.each(cfg)
    assert product.train.samples.enabled is True
    assert other.train.samples.enabled is others_render
    assert list(other.train.samples.prompts) == list(product.train.samples.prompts)  # same text encodings


def test_a_count_below_one_is_refused(make_cfg):
    with pytest.raises(ValueError, match=r"replicates\.count=0"):
        replicates.replicates(make_cfg("replicates.count=0"))
