import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers.bad_scans import MARKER, MIN_SIDE, build_bad_scans, painting, shared_tracking_overrides
from PIL import Image

from artmaster.config import compose
from artmaster.ingest import hamming, perceptual_hash, run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A data folder per run, one MLflow store for all."""
    root = tmp_path_factory.mktemp("ingest")

    def make_cfg(name: str, scans_dir: Path, *overrides: str):
        return compose(
            [
                f"paths.data_dir={root / name}",
                *shared_tracking_overrides(tmp_path_factory),
                f"data.scans_dir={scans_dir}",
                f"data.ingest.min_side={MIN_SIDE}",
                *overrides,
            ]
        )

    return SimpleNamespace(root=root, make_cfg=make_cfg)


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Content hash (when readable) and mtime of every file; links by their target text."""
    return {
        path.relative_to(folder).as_posix(): (
            hashlib.sha256(path.read_bytes()).hexdigest() if os.access(path, os.R_OK) else "unreadable",
            path.stat().st_mtime_ns,
        )
        if not path.is_symlink()
        else ("link", os.readlink(path))
        for path in folder.rglob("*")
        if path.is_file() or path.is_symlink()
    }


@pytest.fixture(scope="module")
def corpus(workspace):
    scans = workspace.root / "bad_scans"
    expected = build_bad_scans(scans)
    before = _snapshot(scans)
    cfg = workspace.make_cfg("corpus", scans)
    summary = run(cfg)
    out = Path(cfg.paths.data_dir) / "ingest"
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    return SimpleNamespace(
        scans=scans,
        expected=expected,
        before=before,
        summary=summary,
        out=out,
        rows={row["source"]: row for row in rows},
        cfg=cfg,
    )


def _image(corpus, source: str) -> np.ndarray:
    row = corpus.rows[source]
    with Image.open(corpus.out / "images" / f"{row['id']}.png") as image:
        assert image.mode == "RGB"
        return np.asarray(image, dtype=np.int32)


def test_every_file_gets_its_expected_outcome(corpus):
    assert set(corpus.rows) == set(corpus.expected)  # every file processed; valid sidecars are not rows
    for source, expected in corpus.expected.items():
        row = corpus.rows[source]
        assert (row["status"], row["reason_code"]) == (expected.status, expected.reason_code), (
            source,
            row["reason"],
        )
        if expected.status != "accepted":
            assert row["reason"], source
        if expected.size is not None:
            assert (row["width"], row["height"]) == expected.size, source


def test_reasons_name_the_problem(corpus):
    reasons = {source: row["reason"] for source, row in corpus.rows.items()}
    assert reasons["zero.jpg"] == "empty file (0 bytes)"
    assert "truncated" in reasons["truncated.jpg"] and "truncated" in reasons["truncated.png"]
    assert "not an image" in reasons["notes.jpg"]
    assert "short side 48 px is under min_side=128" in reasons["tiny.png"]
    assert "aspect ratio 15.38" in reasons["banner.png"] and "max_aspect=12.0" in reasons["banner.png"]
    assert "10000000000 pixels" in reasons["gigantic.png"] and "without decoding" in reasons["gigantic.png"]
    assert reasons["dup_b.png"] == "same pixels as dup_a.png"
    assert "near-duplicate of near_dup_orig.png" in reasons["near_dup_reencoded.jpg"]


def test_summary_counts_and_line(corpus):
    statuses = [row["status"] for row in corpus.rows.values()]
    summary = corpus.summary
    assert summary["read"] == len(corpus.expected)
    assert summary["accepted"] == statuses.count("accepted")
    assert summary["rejected"] == len(statuses) - statuses.count("accepted")
    assert summary["duplicates"] == 2 and summary["sidecars"] == 3 and summary["sidecars_rejected"] == 3
    assert summary["reasons"]["truncated"] == 2 and summary["reasons"]["not_an_image"] == 4
    assert summary["line"].startswith(
        f"ingest: {summary['read']} read, {summary['accepted']} accepted, {summary['rejected']} rejected: "
    )
    assert "2 truncated" in summary["line"] and "3 sidecar(s) rejected" in summary["line"]
    assert json.loads((corpus.out / "summary.json").read_text(encoding="utf-8")) == summary


def test_accepted_scans_are_written_once_as_8bit_srgb_png(corpus):
    accepted = [row for row in corpus.rows.values() if row["status"] == "accepted"]
    written = sorted(path.name for path in (corpus.out / "images").iterdir())
    assert written == sorted(f"{row['id']}.png" for row in accepted)
    assert len(set(written)) == len(accepted)
    assert all(row["id"] is None for row in corpus.rows.values() if row["status"] != "accepted")
    assert corpus.rows["dup_b.png"]["sha256"] == corpus.rows["dup_a.png"]["sha256"]
    for row in accepted:
        with Image.open(corpus.out / "images" / f"{row['id']}.png") as image:
            assert image.mode == "RGB" and image.size == (row["width"], row["height"])
            assert "icc_profile" not in image.info
            digest = hashlib.sha256(f"{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest()
        assert digest == row["sha256"] and row["id"] == digest[:16] and len(row["phash"]) == 16


def test_exif_orientation_is_applied(corpus):
    pixels = _image(corpus, "rotated.jpg")
    assert pixels.shape == (240, 320, 3)
    corner = pixels[: 240 // 4 - 4, : 320 // 4 - 4].reshape(-1, 3).mean(0)  # the marker, displayed top-left
    assert np.abs(corner - MARKER).max() < 25
    assert corpus.rows["rotated.jpg"]["steps"] == ["EXIF orientation 6 applied"]


def test_icc_profile_is_converted_to_srgb(corpus):
    # the file's red marker is tagged with a profile whose red colorant is sRGB blue
    corner = _image(corpus, "icc_swapped.png")[:40, :40].reshape(-1, 3).mean(0)
    assert corner[2] > 150 and corner[0] < 80
    assert any(step.startswith("ICC profile") for step in corpus.rows["icc_swapped.png"]["steps"])


def test_transparency_is_composited_onto_the_background(corpus):
    assert (_image(corpus, "palette_alpha.png")[:, :110] == 255).all()
    rgba = _image(corpus, "rgba.png")
    assert (rgba[-320 // 4 :] == 255).all()
    assert np.abs(rgba[:40, :40].reshape(-1, 3).mean(0) - MARKER).max() < 2  # opaque pixels untouched


def test_alpha_background_comes_from_config(workspace, corpus):
    scans = workspace.root / "alpha_only"
    scans.mkdir()
    (scans / "rgba.png").write_bytes((corpus.scans / "rgba.png").read_bytes())
    cfg = workspace.make_cfg("alpha", scans, "data.ingest.alpha_background=[236,229,212]")
    run(cfg)
    row = json.loads((Path(cfg.paths.data_dir) / "ingest" / "manifest.jsonl").read_text(encoding="utf-8"))
    with Image.open(Path(cfg.paths.data_dir) / "ingest" / "images" / f"{row['id']}.png") as image:
        assert image.getpixel((5, image.height - 5)) == (236, 229, 212)


def test_sixteen_bit_images_keep_their_full_range(corpus):
    gray = _image(corpus, "gray16.png")[..., 0]
    assert gray[0].max() <= 1 and gray[-1].min() >= 254  # a 0..65535 ramp becomes 0..255, not clipped
    assert abs(gray.mean() - 127.5) < 2
    for source, index in (("rgb16.png", 5), ("rgb16.tif", 6)):
        assert (_image(corpus, source) == np.asarray(painting(index))).all(), source


def test_cmyk_jpeg_becomes_the_right_colours(corpus):
    difference = np.abs(_image(corpus, "cmyk.jpg") - np.asarray(painting(4), np.int32))
    assert difference.mean() < 6
    assert "CMYK -> RGB" in corpus.rows["cmyk.jpg"]["steps"]


def test_sidecars_are_clean_utf8_or_rejected_alone(corpus):
    assert corpus.rows["good.png"]["sidecar_text"] == "Misty gorge at dawn 第二行 end"
    cmyk = corpus.rows["cmyk.jpg"]
    assert cmyk["status"] == "accepted" and cmyk["sidecar_text"] is None
    assert "cmyk.txt is not UTF-8" in cmyk["sidecar_error"]


def test_the_corpus_has_at_least_25_kinds_of_awkward_file(corpus):
    assert len(corpus.expected) >= 35 and len({e.reason_code for e in corpus.expected.values()}) >= 11


def test_animated_and_multipage_files_give_their_first_frame(corpus):
    gif = _image(corpus, "animated.gif")
    first, second = (np.asarray(painting(i), dtype=np.int32) for i in (17, 18))
    assert np.abs(gif - first).mean() < 8 < np.abs(gif - second).mean()
    assert corpus.rows["animated.gif"]["steps"][0] == "first of 3 frames used (GIF with several frames)"
    assert (_image(corpus, "multipage.tif") == np.asarray(painting(20))).all()
    assert corpus.rows["multipage.tif"]["steps"][0].startswith("first of 2 frames used")


def test_links_going_nowhere_or_in_a_loop_are_rejected_with_the_reason(corpus):
    reasons = {source: row["reason"] for source, row in corpus.rows.items()}
    assert reasons["loop_a.png"] == "symbolic link loop (loop_a.png -> loop_b.png)"
    assert reasons["broken_link.png"] == "symbolic link to no_such_scan.png, which does not exist"
    assert "symbolic link loop" in reasons["山水 卷轴/up"]
    # the folder reached again through the link was not read twice: each scan has one row
    assert not any(source.startswith("山水 卷轴/up/") for source in corpus.rows)


def test_a_broken_icc_profile_is_ignored_and_noted(corpus):
    assert any(step.startswith("ICC profile ignored") for step in corpus.rows["bad_icc.png"]["steps"])


def test_unreadable_files_are_rejected_naming_the_permission(workspace, monkeypatch):
    """chmod 000 does not stop root, so the refusal is simulated: open() raises PermissionError."""
    import builtins

    scans = workspace.root / "unreadable"
    scans.mkdir()
    painting(40).save(scans / "fine.png")
    painting(41).save(scans / "locked.png")
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    cfg = workspace.make_cfg("unreadable", scans)
    summary = run(cfg)
    monkeypatch.undo()
    manifest = Path(cfg.paths.data_dir) / "ingest" / "manifest.jsonl"
    rows = {row["source"]: row for row in map(json.loads, manifest.read_text(encoding="utf-8").splitlines())}
    assert summary["accepted"] == 1 and rows["fine.png"]["status"] == "accepted"
    assert rows["locked.png"]["reason_code"] == "unreadable"
    assert rows["locked.png"]["reason"] == "permission denied (Permission denied): make the file readable to ingest it"


def test_sidecars_in_other_encodings_are_decoded_or_rejected_alone(corpus):
    from helpers.bad_scans import SIDECARS

    for name, (_, caption) in SIDECARS.items():
        row = corpus.rows[name]
        assert row["status"] == "accepted", name
        assert row["sidecar_text"] == caption, name
    assert "gbk_sidecar.txt is not UTF-8" in corpus.rows["gbk_sidecar.png"]["sidecar_error"]
    assert "save it as UTF-8" in corpus.rows["gbk_sidecar.png"]["sidecar_error"]
    assert "NUL bytes (UTF-16 without a byte-order mark?)" in corpus.rows["utf16_no_bom_sidecar.png"]["sidecar_error"]


def test_raw_scans_are_never_modified(corpus):
    assert _snapshot(corpus.scans) == corpus.before


def test_counts_are_logged_to_mlflow(corpus):
    import mlflow

    mlflow.set_tracking_uri(corpus.cfg.tracking.uri)
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`artmaster.stage` = 'ingest'", output_format="list"
    )
    logged = [r for r in runs if r.data.metrics.get("result/read") == corpus.summary["read"]]
    assert logged and logged[0].data.metrics["result/accepted"] == corpus.summary["accepted"]
    # the reasons are a table in the run's description, not one single-bar chart each
    assert "| rejected: truncated | 2 |" in logged[0].data.tags["mlflow.note.content"]
    assert not any("truncated" in name for name in logged[0].data.metrics)


def test_big_scans_are_decoded_reduced_or_downscaled(workspace):
    scans = workspace.root / "big"
    scans.mkdir()
    big = painting(20, 1200, 900)
    big.save(scans / "big.jpg", quality=90)
    big.save(scans / "big.png")
    cfg = workspace.make_cfg(
        "big", scans, "data.ingest.max_long_side=400", "data.ingest.phash_max_distance=-1"
    )
    run(cfg)
    rows = {
        row["source"]: row
        for row in map(
            json.loads, (Path(cfg.paths.data_dir) / "ingest" / "manifest.jsonl").open(encoding="utf-8")
        )
    }
    assert rows["big.jpg"]["declared_size"] == [1200, 900]
    assert [(row["width"], row["height"]) for row in rows.values()] == [(400, 300), (400, 300)]
    assert rows["big.jpg"]["steps"][0] == "JPEG decoded reduced from 1200x900 to 600x450"
    assert rows["big.png"]["steps"] == ["downscaled from 1200x900 to 400x300"]


def test_the_stage_fails_clearly_only_without_any_valid_scan(workspace):
    missing = workspace.root / "no_such_folder"
    with pytest.raises(FileNotFoundError, match="no_such_folder does not exist"):
        run(workspace.make_cfg("fail", missing))
    empty = workspace.root / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        run(workspace.make_cfg("fail", empty))
    broken = workspace.root / "broken"
    broken.mkdir()
    (broken / "zero.jpg").write_bytes(b"")
    (broken / "notes.jpg").write_text("not a picture")
    cfg = workspace.make_cfg("fail", broken)
    with pytest.raises(
        ValueError, match=r"(?s)2 read, 0 accepted.*no valid scan.*notes\.jpg: not an image.*zero\.jpg: empty"
    ):
        run(cfg)
    assert not (Path(cfg.paths.data_dir) / "ingest").exists()  # a failed run leaves no output behind
    assert not list(Path(cfg.paths.data_dir).glob(".ingest*"))


def test_perceptual_hash_is_stable_under_reencoding_and_separates_pictures():
    first, second = painting(30, 200, 260), painting(31, 200, 260)
    assert hamming(perceptual_hash(first), perceptual_hash(first.resize((100, 130)))) <= 2
    assert hamming(perceptual_hash(first), perceptual_hash(second)) > 12
    assert hamming(0b1011, 0b0001) == 2


# --- issue 15: faults found by probing ----------------------------------------------------------


def _rows(cfg) -> dict[str, dict]:
    manifest = Path(cfg.paths.data_dir) / "ingest" / "manifest.jsonl"
    return {row["source"]: row for row in map(json.loads, manifest.read_text(encoding="utf-8").splitlines())}


def test_a_file_name_that_is_not_utf8_is_ingested_and_recorded_with_escapes(workspace):
    scans = workspace.root / "latin1_names_scans"
    scans.mkdir()
    painting(42).save(scans / "plain.png")
    name = os.path.join(os.fsencode(scans), b"caf\xe9 \xff.png")  # Latin-1 bytes: not UTF-8
    painting(43).save(name, "PNG")
    with open(name[:-4] + b".txt", "wb") as handle:
        handle.write("Café in the mist".encode())
    cfg = workspace.make_cfg("latin1_names", scans)
    assert run(cfg)["accepted"] == 2
    rows = _rows(cfg)  # the manifest is valid UTF-8 JSON
    row = rows["caf\\xe9 \\xff.png"]
    assert row["status"] == "accepted" and row["sidecar_text"] == "Café in the mist"
    assert row["steps"][0] == "file name is not valid UTF-8: recorded with \\x escapes"
    assert "steps" in rows["plain.png"] and not rows["plain.png"]["steps"]


def test_links_leaving_the_scans_folder_are_rejected_unless_allowed(workspace):
    private = workspace.root / "private"
    (private / "system").mkdir(parents=True)
    (private / "secret.txt").write_text("TOP SECRET: the password is hunter2")
    painting(44).save(private / "elsewhere.png")
    for index in range(3):
        painting(45 + index).save(private / "system" / f"file_{index}.png")
    scans = workspace.root / "linked_scans"
    (scans / "inside").mkdir(parents=True)
    painting(48).save(scans / "scroll.png")
    (scans / "scroll.txt").symlink_to(private / "secret.txt")  # a sidecar leaving the folder
    (scans / "system").symlink_to(private / "system", target_is_directory=True)  # a folder leaving it
    (scans / "borrowed.png").symlink_to(private / "elsewhere.png")  # a scan leaving it
    painting(49).save(scans / "inside" / "real.png")
    (scans / "alias.png").symlink_to(scans / "inside" / "real.png")  # a link inside: followed

    cfg = workspace.make_cfg("linked", scans, "data.ingest.phash_max_distance=-1")
    summary = run(cfg)
    rows = _rows(cfg)
    manifest = (Path(cfg.paths.data_dir) / "ingest" / "manifest.jsonl").read_text(encoding="utf-8")
    assert "TOP SECRET" not in manifest and "hunter2" not in manifest
    assert not any(source.startswith("system/file") for source in rows)
    assert rows["system/"]["reason_code"] == rows["borrowed.png"]["reason_code"] == "outside_link"
    assert f"symbolic link to {private / 'system'}, outside the scans folder" in rows["system/"]["reason"]
    assert "data.ingest.follow_links_outside=true" in rows["borrowed.png"]["reason"]
    assert rows["scroll.png"]["status"] == "accepted" and rows["scroll.png"]["sidecar_text"] is None
    assert "sidecar scroll.txt is a symbolic link to" in rows["scroll.png"]["sidecar_error"]
    assert rows["alias.png"]["status"] == "accepted" and rows["inside/real.png"]["status"] == "duplicate"
    assert summary["accepted"] == 2

    allowed = workspace.make_cfg("linked_allowed", scans, "data.ingest.phash_max_distance=-1",
                                 "data.ingest.follow_links_outside=true")
    assert run(allowed)["accepted"] == 6
    rows = _rows(allowed)
    assert rows["scroll.png"]["sidecar_text"].startswith("TOP SECRET") and "system/file_2.png" in rows


def test_an_unreadable_subfolder_gets_a_manifest_row_naming_the_problem(workspace, monkeypatch):
    """chmod 000 does not stop root, so there the refusal is simulated: listing the folder raises."""
    scans = workspace.root / "locked_folder_scans"
    (scans / "locked").mkdir(parents=True)
    painting(50).save(scans / "fine.png")
    painting(51).save(scans / "locked" / "hidden.png")
    real_scandir = os.scandir

    def refusing_scandir(path="."):
        if isinstance(path, str) and path.endswith("locked"):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    cfg = workspace.make_cfg("locked_folder", scans)
    summary = run(cfg)
    monkeypatch.undo()
    rows = _rows(cfg)
    assert summary["accepted"] == 1 and summary["reasons"] == {"unreadable_folder": 1}
    assert rows["locked/"]["reason"] == (
        "cannot list the folder (Permission denied): its files are not read; make it readable"
    )


def test_the_eight_bit_conversion_of_a_16_bit_scan_makes_no_full_size_wide_copy():
    """Deterministic allocation count (tracemalloc sees numpy's buffers), not a timing:
    benchmarks/ingest_memory.py measures the process's peak memory."""
    import tracemalloc

    from artmaster.ingest import _to_eight_bit

    values = np.linspace(0, 65535, 2000 * 3000).reshape(3000, 2000).astype(np.uint16)
    sixteen = Image.fromarray(values)
    assert sixteen.mode == "I;16"
    tracemalloc.start()
    eight = _to_eight_bit(sixteen, [])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(np.asarray(eight), (values >> 8).astype(np.uint8))
    assert peak < 1.5 * values.size  # the 8-bit result and a strip: no int64 (8 bytes a pixel) copies


def test_a_scan_over_the_decoded_memory_budget_is_refused_before_decoding(workspace):
    scans = workspace.root / "budget_scans"
    scans.mkdir()
    gray16 = (np.arange(2000 * 2000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(2000, 2000)
    Image.fromarray(gray16).save(scans / "sixteen_bit.png")  # I;16: 8 MB decoded
    gray = (gray16 >> 8).astype(np.uint8)
    Image.fromarray(gray).save(scans / "gray.png")  # L: 4 MB decoded
    Image.fromarray(np.stack([gray, gray.T, 255 - gray], axis=-1)).save(scans / "colour.png")  # RGB: 16 MB
    cfg = workspace.make_cfg("budget", scans, "data.ingest.max_decoded_mb=5", "data.ingest.phash_max_distance=-1")
    run(cfg)
    rows = _rows(cfg)
    assert rows["gray.png"]["status"] == "accepted"
    assert rows["sixteen_bit.png"]["reason_code"] == rows["colour.png"]["reason_code"] == "too_large"
    assert rows["sixteen_bit.png"]["reason"] == (
        "refused without decoding: 2000x2000 I;16 takes 8 MB decoded, over data.ingest.max_decoded_mb=5"
    )


def test_special_files_damaged_pngs_and_long_sidecars_are_named_for_what_they_are(workspace):
    import zlib

    scans = workspace.root / "small_faults_scans"
    scans.mkdir()
    os.mkfifo(scans / "pipe.png")  # never opened: reading a FIFO would block the stage
    png = bytearray(Path(_save(painting(53), scans / "good.png")).read_bytes())
    png[29] ^= 0xFF  # the IHDR chunk's CRC
    (scans / "bad_crc.png").write_bytes(bytes(png))
    (scans / "good.txt").write_text("misty gorge " * 250_000)  # a 3 MB sidecar
    cfg = workspace.make_cfg("small_faults", scans)
    run(cfg)
    rows = _rows(cfg)
    assert rows["pipe.png"]["reason_code"] == "not_a_file"
    assert rows["pipe.png"]["reason"] == "a named pipe (FIFO), not a regular file; not read"
    assert rows["bad_crc.png"]["reason_code"] == "corrupt"
    assert rows["bad_crc.png"]["reason"] == (
        "a damaged PNG file (it starts like one, but broken PNG file (bad header checksum in b'IHDR'))"
    )
    good = rows["good.png"]
    assert good["status"] == "accepted" and len(good["sidecar_text"].encode()) <= 8192
    assert good["sidecar_text"].startswith("misty gorge misty gorge")
    assert "sidecar good.txt is longer than data.ingest.sidecar_max_bytes=8192: only its first 8192 bytes are kept" \
        in good["steps"]
    assert zlib.crc32(png[12:29]) != int.from_bytes(png[29:33], "big")  # the fault is in the file indeed


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def test_a_scans_path_that_is_a_file_or_holds_no_valid_scan_is_one_line(workspace):
    from artmaster.config import ConfigError

    a_file = workspace.root / "scans.zip"
    a_file.write_bytes(b"PK\x03\x04")
    with pytest.raises(ConfigError, match=r"scans folder .*scans\.zip is a file, not a folder \(set data\.scans_dir\)"):
        run(workspace.make_cfg("is_a_file", a_file))
    broken = workspace.root / "all_bad_scans"
    broken.mkdir()
    for index in range(5):
        (broken / f"notes_{index}.jpg").write_text("not a picture")
    with pytest.raises(ConfigError) as raised:
        run(workspace.make_cfg("all_bad", broken))
    message = str(raised.value)
    assert "\n" not in message and "5 read, 0 accepted" in message and "no valid scan in" in message
    assert "notes_0.jpg: not an image" in message and "and 2 more listed above" in message
