"""Stage `crop`: exact bucket sizes, boxes inside the painting, bounded counts and overlap."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artmaster import crop, dataset
from artmaster.config import compose
from artmaster.imagestats import box_iou
from artmaster.painter import STYLES, mount_box, paint, scan

# scan id -> (style, width, height, seed); sizes small enough for a fast suite
SCANS = {
    "scroll": ("zeng_xiaohu", 1000, 1700, 1),
    "wide": ("zeng_xiaohu", 1500, 900, 2),
    "large": ("blue_green_gongbi", 1200, 1900, 3),
    "snow": ("snow_pine", 900, 1200, 4),
}


def _write_ingest(data_dir: Path, extra_rows=(), shading: dict[str, float] | None = None) -> dict:
    """Painter scans + manifest as the ingest stage writes them; returns scan id -> painting box."""
    images = data_dir / "ingest" / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, truth = [], {}
    for scan_id, (style, width, height, seed) in SCANS.items():
        image = scan(STYLES[style], width, height, seed)
        if shading and scan_id in shading:  # a strong extra light fall-off from left to right
            ramp = np.linspace(1.0, shading[scan_id], width, dtype=np.float32)[None, :, None]
            image = Image.fromarray((np.asarray(image, np.float32) * ramp).astype(np.uint8))
        image.save(images / f"{scan_id}.png", compress_level=0)  # fast to write; size is no concern
        truth[scan_id] = mount_box(width, height)
        rows.append({"id": scan_id, "source": f"{scan_id}.jpg", "status": "accepted", "sidecar_text": ""})
    rows.extend(extra_rows)
    manifest = data_dir / "ingest" / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return truth


@pytest.fixture(scope="module")
def tracking_root(tmp_path_factory) -> Path:
    """One MLflow store for the module: creating a SQLite store takes seconds."""
    return tmp_path_factory.mktemp("mlflow")


def _cfg(data_dir: Path, tracking_root: Path, *overrides: str):
    return compose(
        [
            f"paths.data_dir={data_dir}",
            f"tracking.uri=sqlite:///{tracking_root / 'mlflow.db'}",
            f"tracking.artifact_dir={tracking_root / 'mlartifacts'}",
            *overrides,
        ]
    )


@pytest.fixture(scope="module")
def cropped(tmp_path_factory, tracking_root):
    root = tmp_path_factory.mktemp("crop")
    data = root / "data"
    extra = [
        {"id": "dupe", "source": "dupe.jpg", "status": "duplicate", "sidecar_text": ""},
        {"id": "broken", "source": "broken.png", "status": "accepted", "sidecar_text": ""},
        {"id": "bare", "source": "bare.png", "status": "accepted", "sidecar_text": ""},
        {"id": "tiny", "source": "tiny.png", "status": "accepted", "sidecar_text": ""},
    ]
    truth = _write_ingest(data, extra, shading={"wide": 0.6})
    images = data / "ingest" / "images"
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    paint(STYLES["zeng_xiaohu"], 700, 800, 5).save(images / "bare.png", compress_level=0)  # no mount
    scan(STYLES["zeng_xiaohu"], 420, 600, 6).save(images / "tiny.png", compress_level=0)  # < every bucket
    cfg = _cfg(data, tracking_root, "data.holdout.scans=2")
    result = crop.run(cfg)
    rows = crop.read_jsonl(data / "crop" / "crops.jsonl")
    return {"root": root, "cfg": cfg, "result": result, "rows": rows, "truth": truth}


def test_every_crop_is_exactly_its_bucket_size(cropped):
    rows = cropped["rows"]
    assert rows, "no crops written"
    enabled = {b.name: (b.width, b.height) for b in crop.enabled_buckets(cropped["cfg"].crop)}
    assert set(enabled) == {"512x512", "512x768"}  # landscape is off by default
    for row in rows:
        path = cropped["root"] / "data" / "crop" / row["path"]
        assert path.parent.name == row["bucket"]
        with Image.open(path) as image:
            assert image.mode == "RGB"
            assert image.size == enabled[row["bucket"]] == (row["width"], row["height"])


def test_boxes_lie_inside_the_painting_and_keep_the_bucket_aspect(cropped):
    paintings = cropped["result"]["paintings"]
    for row in cropped["rows"]:
        left, top, right, bottom = row["box"]
        for frame in (cropped["truth"].get(row["scan_id"]), paintings[row["scan_id"]]):
            if frame is None:
                continue
            assert frame[0] <= left < right <= frame[2] and frame[1] <= top < bottom <= frame[3], row
        assert right - left >= row["width"] and bottom - top >= row["height"], "crops are never upscaled"
        assert (bottom - top) / (right - left) == pytest.approx(row["height"] / row["width"], abs=2e-3)


def test_mounting_border_is_dropped_even_under_strong_uneven_light(cropped):
    paintings = cropped["result"]["paintings"]
    for scan_id, (left, top, right, bottom) in cropped["truth"].items():
        found = paintings[scan_id]
        assert left <= found[0] and top <= found[1] and found[2] <= right and found[3] <= bottom, scan_id
        covered = (found[2] - found[0]) * (found[3] - found[1]) / ((right - left) * (bottom - top))
        assert covered > 0.9, f"{scan_id}: detected painting covers only {covered:.0%} of the real one"
    # a painting without any mount keeps (almost) all of its area
    bare = paintings["bare"]
    assert (bare[2] - bare[0]) * (bare[3] - bare[1]) > 0.9 * 700 * 800


def test_recorded_box_reproduces_the_saved_crop(cropped):
    data = cropped["root"] / "data"
    for row in cropped["rows"][:4]:
        with Image.open(data / "ingest" / "images" / f"{row['scan_id']}.png") as source:
            source = source.convert("RGB")
        saved = np.asarray(Image.open(data / "crop" / row["path"]), np.float32)
        size = (row["width"], row["height"])

        def difference(box):
            redone = np.asarray(source.crop(box).resize(size, Image.Resampling.BICUBIC), np.float32)
            return float(np.abs(redone - saved).mean())

        left, top, right, bottom = row["box"]
        shift = (right - left) // 8
        shifted_box = (left + shift, top, right + shift, bottom)
        if shifted_box[2] > source.width:
            shifted_box = (left - shift, top, right - shift, bottom)
        assert difference(row["box"]) < 3.0
        assert difference(shifted_box) > 3 * difference(row["box"])


def test_counts_and_overlap_are_bounded(cropped):
    settings = cropped["cfg"].crop
    by_scan = {}
    for row in cropped["rows"]:
        by_scan.setdefault(row["scan_id"], []).append(row)
    for scan_id, rows in by_scan.items():
        assert len(rows) <= settings.max_per_scan
        for key, group in itertools.groupby(sorted(rows, key=lambda r: (r["bucket"], r["scale"])), key=lambda r: (r["bucket"], r["scale"])):
            assert len(list(group)) <= settings.per_bucket_scale, (scan_id, key)
        for first, second in itertools.combinations(rows, 2):
            assert box_iou(first["box"], second["box"]) <= settings.max_iou + 1e-9, (first, second)
    large = by_scan["large"]
    assert len(large) >= 3 and len({r["scale"] for r in large}) >= 2, "a large scan gives crops at several scales"
    assert {r["bucket"] for r in by_scan["scroll"]} >= {"512x768"}, "a hanging scroll gets a portrait crop"


def test_unreadable_and_too_small_scans_are_reported_not_fatal(cropped):
    result = cropped["result"]
    failed = {f["scan_id"]: f for f in result["failed"]}
    assert set(failed) == {"broken"} and "broken.png" in failed["broken"]["path"]
    assert result["scans_without_crops"] == ["tiny"]
    scanned = {r["scan_id"] for r in cropped["rows"]}
    assert "dupe" not in scanned and set(SCANS) <= scanned
    summary = json.loads((cropped["root"] / "data" / "crop" / "summary.json").read_text())
    assert summary["crops"] == len(cropped["rows"]) == sum(summary["per_bucket"].values())


def test_contact_sheet_shows_every_readable_scan(cropped):
    sheet_cfg = cropped["cfg"].crop.contact_sheet
    scans = len(SCANS) + 2  # + bare + tiny; the broken one has no picture
    columns = min(sheet_cfg.columns, scans)
    rows = -(-scans // columns)
    with Image.open(cropped["root"] / "data" / "crop" / "contact_sheet.png") as sheet:
        assert sheet.size == (
            columns * sheet_cfg.tile,
            sheet_cfg.legend_height + rows * (sheet_cfg.tile + sheet_cfg.caption_height),
        )
        pixels = np.asarray(sheet.convert("RGB"))
    square = np.array(Image.new("RGB", (1, 1), sheet_cfg.colours.square).getpixel((0, 0)))
    assert (np.abs(pixels.astype(int) - square).sum(axis=2) == 0).sum() > 500, "square boxes are drawn"


def test_run_is_logged_to_mlflow(cropped):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cropped["cfg"].tracking.uri)
    experiment = client.get_experiment_by_name(cropped["cfg"].tracking.experiment_name)
    runs = client.search_runs([experiment.experiment_id], "tags.`artmaster.stage` = 'crop'")
    run = next(r for r in runs if r.data.metrics.get("result/crops") == len(cropped["rows"]))
    assert "contact_sheet.png" in [a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "pictures")]


def test_same_input_gives_identical_crops(cropped, tmp_path, tracking_root):
    data = tmp_path / "data"
    (data / "ingest").mkdir(parents=True)
    source = cropped["root"] / "data" / "ingest"
    again = [row for row in crop.read_jsonl(source / "manifest.jsonl") if row["id"] in ("scroll", "large")]
    crop.write_jsonl(data / "ingest" / "manifest.jsonl", again)
    (data / "ingest" / "images").symlink_to(source / "images")
    crop.run(_cfg(data, tracking_root, "data.holdout.scans=1"))
    first, second = cropped["root"] / "data" / "crop", data / "crop"
    expected = [row for row in cropped["rows"] if row["scan_id"] in ("scroll", "large")]

    def unsplit(rows):  # which scans are held out depends on the set of scans
        return [{k: v for k, v in row.items() if k != "split"} for row in rows]

    assert unsplit(crop.read_jsonl(second / "crops.jsonl")) == unsplit(expected)
    for row in expected:
        assert (first / row["path"]).read_bytes() == (second / row["path"]).read_bytes()


def test_heldout_scans_are_whole_scans_chosen_deterministically(cropped):
    rows, result = cropped["rows"], cropped["result"]
    holdout = cropped["cfg"].data.holdout
    assert holdout.scans == 2
    assert {row["split"] for row in rows} == {"train", "heldout"}
    by_scan = {}
    for row in rows:
        by_scan.setdefault(row["scan_id"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in by_scan.values()), "a scan's crops share one split"
    heldout = sorted(scan for scan, splits in by_scan.items() if splits == {"heldout"})
    assert heldout == result["heldout_scans"] and len(heldout) == 2
    assert result["per_split"] == {"train": sum(r["split"] == "train" for r in rows), "heldout": len(dataset.split_rows(rows, "heldout"))}
    assert crop.heldout_scans(list(by_scan), holdout) == set(heldout)
    assert crop.heldout_scans(list(reversed(list(by_scan))), holdout) == set(heldout), "order does not matter"


def test_heldout_choice_rules():
    holdout = compose(["data.holdout.scans=2", "data.holdout.seed=0"]).data.holdout
    ids = [f"scan{i}" for i in range(10)]
    chosen = crop.heldout_scans(ids, holdout)
    assert len(chosen) == 2 and chosen <= set(ids)
    other_seed = compose(["data.holdout.scans=2", "data.holdout.seed=1"]).data.holdout
    assert any(crop.heldout_scans(ids, compose([f"data.holdout.seed={s}"]).data.holdout) != chosen for s in range(1, 5))
    assert crop.heldout_scans(ids, other_seed) == crop.heldout_scans(ids, other_seed)
    assert crop.heldout_scans(ids, compose(["data.holdout.scans=0"]).data.holdout) == set()
    with pytest.raises(ValueError, match="leaves no scan to train on"):
        crop.heldout_scans(ids[:2], holdout)
    # rows written before the split existed count as training rows
    assert dataset.split_rows([{"crop_id": "x"}], "train") == [{"crop_id": "x"}]
    assert dataset.split_rows([{"crop_id": "x"}], "heldout") == []


def test_contact_sheet_frames_heldout_scans(cropped):
    sheet_cfg = cropped["cfg"].crop.contact_sheet
    with Image.open(cropped["root"] / "data" / "crop" / "contact_sheet.png") as sheet:
        pixels = np.asarray(sheet.convert("RGB")).astype(int)
    frame = np.array(Image.new("RGB", (1, 1), sheet_cfg.heldout_colour).getpixel((0, 0)))
    framed = (np.abs(pixels - frame).sum(axis=2) == 0).sum()
    # two framed cells: four sides of about a tile each, line_width + 2 px wide
    assert framed > 2 * 4 * (sheet_cfg.tile - 10) * (sheet_cfg.line_width + 2) * 0.9


def test_window_edges_avoid_dense_strokes():
    """Two windows with the same content share: the one whose edge runs through a gap between
    strokes beats the one whose edge slices through a dense stroke."""
    settings = compose([]).crop
    density = np.zeros((200, 300), np.float32)
    density[40:160, 60:240] = 0.5  # a painted mass
    density[:, 148:152] = 1.0  # a dense vertical stroke
    analysis = crop.ScanAnalysis(
        scan_size=(300, 200),
        painting=(0, 0, 300, 200),
        origin=(0, 0),
        factor=(1.0, 1.0),
        density=density,
        saliency=density,
        thumbnail=Image.new("RGB", (300, 200)),
    )
    slicing = [150 - 120, 0, 150, 200]  # right edge on the stroke
    beside = [156 - 120, 0, 156, 200]  # right edge just past it
    scores, eligible = crop.score_windows(np.array([slicing, beside]), analysis, settings)
    assert eligible.all()
    assert scores[1] > scores[0]


def test_no_accepted_scan_is_a_clear_error(tmp_path, tracking_root):
    ingest = tmp_path / "data" / "ingest"
    ingest.mkdir(parents=True)
    (ingest / "manifest.jsonl").write_text(json.dumps({"id": "x", "status": "rejected"}) + "\n")
    with pytest.raises(ValueError, match=r"manifest\.jsonl: no accepted scan"):
        crop.run(_cfg(tmp_path / "data", tracking_root))


def test_failed_run_leaves_previous_output_untouched(tmp_path, tracking_root):
    data = tmp_path / "data"
    previous = data / "crop"
    previous.mkdir(parents=True)
    (previous / "crops.jsonl").write_text("old\n")
    (data / "ingest" / "images").mkdir(parents=True)
    (data / "ingest" / "images" / "a.png").write_bytes(b"garbage")
    (data / "ingest" / "manifest.jsonl").write_text(json.dumps({"id": "a", "status": "accepted"}) + "\n")
    with pytest.raises(RuntimeError, match=r"no scan could be read .*a\.png"):
        crop.run(_cfg(data, tracking_root))
    assert (previous / "crops.jsonl").read_text() == "old\n"
    assert sorted(p.name for p in data.iterdir()) == ["crop", "ingest"], "no staging folder left behind"
