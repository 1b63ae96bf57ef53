import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers.bad_scans import shared_tracking_overrides
from PIL import ExifTags, Image, ImageOps

from artmaster.config import compose
from artmaster.demo_scans import DemoSettings, plan, run
from artmaster.ingest import run as ingest

MAGIC = {"jpeg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n", "tiff16": b"II*\x00"}
SMALL = [
    "data.demo.count=6",
    "data.demo.min_long_side=300",
    "data.demo.max_long_side=380",
    "data.demo.in_subfolder=2",
]


def test_default_plan_is_fourteen_big_mixed_scans():
    items = plan(DemoSettings.from_config(compose().data.demo))
    assert len(items) == 14
    assert min(max(item.width, item.height) for item in items) >= 2000
    assert {item.width > item.height for item in items} == {True, False}  # landscape and portrait
    assert {item.fmt for item in items} == {"jpeg", "png", "tiff16"}
    assert [item.exif_orientation for item in items if item.exif_orientation] == [6]
    assert sum(item.caption is not None for item in items) == 3
    assert sum(item.path.startswith("卷轴/") for item in items) == 4
    assert len({item.path for item in items}) == 14 and len({item.seed for item in items}) == 14


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.demo.formats=[gif]", "unknown formats"),
        ("data.demo.min_long_side=5000", "min_long_side <= max_long_side"),
        ("data.demo.exif_orientation=9", "must be 2..8"),
        ("data.demo.painter=nobody", "unknown painter style"),
    ],
)
def test_bad_demo_settings_are_refused(override, message):
    with pytest.raises((ValueError, KeyError), match=message):
        plan(DemoSettings.from_config(compose([override]).data.demo))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")

    def make_cfg(name: str, *overrides: str):
        return compose(
            [
                f"paths.data_dir={root / name}",
                *shared_tracking_overrides(tmp_path_factory),
                *SMALL,
                *overrides,
            ]
        )

    cfg = make_cfg("first")
    result = run(cfg)
    return SimpleNamespace(
        cfg=cfg, result=result, out=Path(result["dir"]), items=plan(DemoSettings.from_config(cfg.data.demo)), make_cfg=make_cfg
    )


def test_written_files_match_the_plan(demo):
    written = sorted(p.relative_to(demo.out).as_posix() for p in demo.out.rglob("*") if p.is_file())
    sidecars = [str(Path(item.path).with_suffix(".txt").as_posix()) for item in demo.items if item.caption]
    assert written == sorted([item.path for item in demo.items] + sidecars)
    for item in demo.items:
        path = demo.out / item.path
        assert path.read_bytes().startswith(MAGIC[item.fmt]), item.path
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
            assert upright.size == (item.width, item.height) and upright.mode == "RGB"
            if item.fmt == "tiff16":
                assert image.tag_v2[258] == (16, 16, 16)
        if item.caption:
            assert path.with_suffix(".txt").read_text(encoding="utf-8") == item.caption + "\n"
    assert any(item.path.startswith("卷轴/") for item in demo.items)


def test_one_jpeg_is_stored_rotated_with_an_exif_orientation_tag(demo):
    (item,) = [item for item in demo.items if item.exif_orientation]
    with Image.open(demo.out / item.path) as image:
        assert image.getexif()[ExifTags.Base.Orientation] == 6
        assert image.size == (item.height, item.width)  # stored pixels are rotated
        upright = np.asarray(ImageOps.exif_transpose(image), np.float32)
    # upright, the hanging scroll's silk border is deeper above the painting than beside it
    # (portrait) or as deep (landscape); the painted sky at the top is paler than the mountains below
    top, bottom = upright[: len(upright) // 2].mean(), upright[len(upright) // 2 :].mean()
    assert top > bottom + 15


def test_demo_scans_are_deterministic(demo):
    again = Path(run(demo.make_cfg("second"))["dir"])
    for item in demo.items:
        assert (again / item.path).read_bytes() == (demo.out / item.path).read_bytes(), item.path


def test_ingest_accepts_every_demo_scan(demo):
    cfg = demo.make_cfg("first", "data.ingest.min_side=128")
    summary = ingest(cfg)
    assert summary["accepted"] == len(demo.items) and summary["rejected"] == 0
    rows = [
        json.loads(line)
        for line in (Path(cfg.paths.data_dir) / "ingest" / "manifest.jsonl")
        .read_text(encoding="utf-8")
        .splitlines()
    ]
    by_source = {row["source"]: row for row in rows}
    for item in demo.items:
        row = by_source[item.path]
        assert (row["width"], row["height"]) == (item.width, item.height)
        assert row["sidecar_text"] == item.caption
    rotated = next(item for item in demo.items if item.exif_orientation)
    assert by_source[rotated.path]["steps"] == ["EXIF orientation 6 applied"]


def test_contact_sheet_is_logged_to_mlflow(demo):
    import mlflow

    mlflow.set_tracking_uri(demo.cfg.tracking.uri)
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string="tags.`artmaster.stage` = 'demo_scans'",
        output_format="list",
    )
    assert runs and all(r.data.metrics["result/scans"] == len(demo.items) for r in runs)
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "pictures")]
    assert artifacts == ["pictures/demo_scans.png"]
