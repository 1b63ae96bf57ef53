"""Shared fixtures: every test composes the real conf/ with its outputs redirected to tmp_path."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from artmaster.config import compose


@pytest.fixture
def make_cfg(tmp_path):
    """compose(overrides) with data/ and the MLflow store inside tmp_path."""

    def _make(*overrides: str):
        return compose(
            [
                f"paths.data_dir={tmp_path / 'data'}",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                f"tracking.artifact_dir={tmp_path / 'mlartifacts'}",
                *overrides,
            ]
        )

    return _make
