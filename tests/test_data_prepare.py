"""Prep of image folders into Parquet shards: layouts, bad input, manifest, resume, idempotence, errors.

The suite's shared local Ray (conftest ``ray_cluster``) runs the preps; each is a few dozen tiny images.
"""
from __future__ import annotations

import importlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sftok_platform.data import DataError, load_manifest, prepare, prepare_synthetic
from sftok_platform.data.manifest import file_sha256, read_manifest
from sftok_platform.data.sources import scan_source
from sftok_platform.data.validate import CheckOptions, check_image

prepare_mod = importlib.import_module("sftok_platform.data.prepare")   # the module, not the function
WNIDS = ["n01440764", "n01443537", "n01484850"]
NAMES = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]


# ######################################################################################################
# Generated folders
# ######################################################################################################

def _rgb(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bad_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected outcome): 'keep', 'convert:<substring>' or 'skip:<substring>'."""
    good = _encode(_rgb(64, 48, 1), "JPEG", quality=90)
    gray16 = Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    rgba = Image.fromarray(np.dstack([np.full((32, 32, 3), 10, np.uint8), np.zeros((32, 32), np.uint8)]))
    return {
        "gray.JPEG": (_encode(_rgb(50, 40, 2).convert("L"), "JPEG"), "convert:grayscale"),
        "cmyk.JPEG": (_encode(_rgb(50, 40, 3).convert("CMYK"), "JPEG"), "convert:CMYK"),
        "alpha.png": (_encode(rgba, "PNG"), "convert:alpha"),
        "sixteen.png": (_encode(gray16, "PNG"), "convert:high bit depth"),
        "palette.png": (_encode(_rgb(40, 40, 4).convert("P"), "PNG"), "convert:palette"),
        "bitmap.bmp": (_encode(_rgb(40, 40, 5), "BMP"), "convert:BMP"),
        "truncated.JPEG": (good[: len(good) // 2], "skip:corrupt"),
        "garbage.JPEG": (b"\xff\xd8\xff\xe0" + os.urandom(300), "skip:"),
        "empty.JPEG": (b"", "skip:empty file"),
        "notes.txt": (b"this is not an image\n", "skip:not an image"),
        "tiny.png": (_encode(_rgb(4, 4, 6), "PNG"), "skip:too small"),
    }


def make_imagenet(root: Path, per_class: int = 4, n_val: int = 5) -> dict:
    """An ImageNet-style tree with every kind of bad input in class 0. Returns the expected outcome."""
    for c, wnid in enumerate(WNIDS):
        d = root / "train" / wnid
        d.mkdir(parents=True)
        for i in range(per_class):
            (d / f"{wnid}_{i}.JPEG").write_bytes(_encode(_rgb(40 + 13 * i, 60 - 5 * i, 100 * c + i), "JPEG"))
    for name, (data, _) in bad_files().items():
        (root / "train" / WNIDS[0] / name).write_bytes(data)
    (root / "val").mkdir()
    lines = ["ImageId,PredictionString"]
    for i in range(n_val):
        stem = f"ILSVRC2012_val_{i + 1:08d}"
        (root / "val" / f"{stem}.JPEG").write_bytes(_encode(_rgb(48, 48, 1000 + i), "JPEG"))
        if i < n_val - 1:   # the last one has no label: skipped at scan time
            lines.append(f"{stem},{WNIDS[i % 3]} 1 2 3 4")
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    (root / "LOC_synset_mapping.txt").write_text("\n".join(f"{w} {n}" for w, n in zip(WNIDS, NAMES)) + "\n")
    outcomes = {f"train/{WNIDS[0]}/{k}": v[1] for k, v in bad_files().items()}
    n_keep_bad = sum(o.startswith(("keep", "convert")) for o in outcomes.values())
    return {"train": len(WNIDS) * per_class + n_keep_bad, "val": n_val - 1, "outcomes": outcomes}


@pytest.fixture(scope="module")
def ray_local(ray_cluster):
    return ray_cluster


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return root, make_imagenet(root)


@pytest.fixture(scope="module")
def prepared(ray_local, imagenet, tmp_path_factory):
    root, expected = imagenet
    out = tmp_path_factory.mktemp("shards") / "out"
    manifest = prepare(root, out, shard_size=5, quiet=True)
    return out, manifest, expected


def _rows(out: Path, manifest: dict, split: str) -> list[dict]:
    rows = []
    for s in manifest["splits"][split]["shards"]:
        rows += pq.read_table(out / s["file"]).to_pylist()
    return rows


# ######################################################################################################
# Pure parts (no Ray)
# ######################################################################################################

def test_check_image_outcomes():
    for name, (data, outcome) in bad_files().items():
        checked = check_image(data, CheckOptions())
        kind, _, text = outcome.partition(":")
        if kind == "skip":
            assert checked.skip_reason and text in checked.skip_reason, (name, checked.skip_reason)
            assert checked.data == b""
        else:
            assert not checked.skip_reason, (name, checked.skip_reason)
            assert text in checked.note, (name, checked.note)
            img = Image.open(io.BytesIO(checked.data))
            assert img.mode == "RGB" and img.size == (checked.width, checked.height)


def test_check_image_keeps_rgb_bytes_and_converts_values_correctly():
    jpeg = _encode(_rgb(70, 50, 9), "JPEG")
    kept = check_image(jpeg)
    assert kept.data == jpeg and (kept.width, kept.height) == (70, 50) and not kept.note
    # 16-bit: 65535 must become 255 (scaled, not clipped); alpha 0 composites to white
    white16 = Image.fromarray(np.full((20, 20), 65535, np.uint16))
    assert np.asarray(Image.open(io.BytesIO(check_image(_encode(white16, "PNG")).data))).min() == 255
    clear = Image.fromarray(np.zeros((20, 20, 4), np.uint8))
    assert np.asarray(Image.open(io.BytesIO(check_image(_encode(clear, "PNG")).data))).min() == 255
    # --resize: shorter side to S, re-encoded as JPEG; huge images are skipped before decoding
    resized = check_image(_encode(_rgb(120, 60, 3), "PNG"), CheckOptions(resize=30))
    assert (resized.width, resized.height) == (60, 30) and Image.open(io.BytesIO(resized.data)).format == "JPEG"
    assert "too large" in check_image(jpeg, CheckOptions(max_pixels=1000)).skip_reason


def test_scan_layouts_and_errors(tmp_path, imagenet):
    root, expected = imagenet
    plan = scan_source(root)
    assert plan.layout == "imagenet"
    assert [c["wnid"] for c in plan.classes] == WNIDS and plan.classes[1]["name"] == NAMES[1]
    assert len(plan.splits["train"]) == 3 * 4 + len(bad_files())      # every file is planned
    assert {e.label for e in plan.splits["val"]} == {0, 1, 2}
    assert [s["reason"] for s in plan.scan_skipped["val"]] == ["no label in LOC_val_solution.csv"]

    folders = tmp_path / "folders"
    for cls in ("cats", "dogs"):
        (folders / cls).mkdir(parents=True)
        for i in range(3):
            (folders / cls / f"{i}.png").write_bytes(_encode(_rgb(20, 20, i), "PNG"))
    plan = scan_source(folders, val_fraction=0.5)
    assert plan.layout == "class_folders" and [c["name"] for c in plan.classes] == ["cats", "dogs"]
    assert len(plan.splits["train"]) + len(plan.splits["val"]) == 6
    assert plan.splits == scan_source(folders, val_fraction=0.5).splits   # deterministic hold-out

    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(_encode(_rgb(20, 20, 0), "PNG"))
    plan = scan_source(flat)
    assert plan.layout == "unlabeled" and plan.splits["train"][0].label == -1

    with pytest.raises(DataError, match="does not exist"):
        scan_source(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no files"):
        scan_source(tmp_path / "empty")


# ######################################################################################################
# Prep through Ray Data
# ######################################################################################################

def test_prepare_rows_labels_and_manifest(prepared):
    out, manifest, expected = prepared
    assert manifest["complete"] and manifest["counts"] == {"train": expected["train"], "val": expected["val"]}
    assert [c["wnid"] for c in manifest["classes"]] == WNIDS and manifest["classes"][0]["name"] == NAMES[0]
    train = _rows(out, manifest, "train")
    paths = [r["path"] for r in train]
    assert len(paths) == len(set(paths)) == expected["train"]
    for r in train:
        assert r["label"] == WNIDS.index(r["path"].split("/")[1])
        img = Image.open(io.BytesIO(r["image_bytes"]))
        assert img.mode == "RGB" and img.size == (r["width"], r["height"])
    # every bad file is either a row (converted, with a note) or skipped (with a reason)
    skipped = {s["path"]: s["reason"] for s in manifest["splits"]["train"]["skipped"]}
    converted = {s["path"]: s["reason"] for s in manifest["splits"]["train"]["converted"]}
    for path, outcome in expected["outcomes"].items():
        kind, _, text = outcome.partition(":")
        assert text in (skipped if kind == "skip" else converted)[path], (path, outcome)
        assert (path in paths) == (kind != "skip")
    assert set(skipped) == {p for p, o in expected["outcomes"].items() if o.startswith("skip")}
    val = _rows(out, manifest, "val")
    assert len(val) == expected["val"] and {r["label"] for r in val} == {0, 1, 2}
    assert [s["reason"] for s in manifest["splits"]["val"]["skipped"]] == ["no label in LOC_val_solution.csv"]
    # shard files: deterministic names, recorded sizes and checksums
    shards = manifest["splits"]["train"]["shards"]
    n = len(shards)
    assert [s["name"] for s in shards] == [f"train-{i:05d}-of-{n:05d}" for i in range(n)]
    for s in shards:
        assert file_sha256(out / s["file"]) == s["sha256"] and (out / s["file"]).stat().st_size == s["bytes"]
    assert not (out / "_staging").exists()
    assert json.loads((out / "manifest.json").read_text()) == load_manifest(str(out))


def test_rerun_is_a_noop_and_other_data_is_refused(prepared, imagenet, tmp_path):
    out, manifest, _ = prepared
    root, _ = imagenet
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = prepare(root, out, shard_size=5, quiet=True)
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    with pytest.raises(DataError, match="other options"):
        prepare(root, out, shard_size=5, resize=32, quiet=True)
    other = tmp_path / "other"
    (other / "x").mkdir(parents=True)
    (other / "x" / "a.png").write_bytes(_encode(_rgb(20, 20, 0), "PNG"))
    with pytest.raises(DataError, match="different data set"):
        prepare(other, out, shard_size=5, quiet=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "file.txt").write_text("x")
    with pytest.raises(DataError, match="no manifest.json"):
        prepare(root, foreign, shard_size=5, quiet=True)
    with pytest.raises(DataError, match="no manifest.json in"):
        load_manifest(str(tmp_path / "nothing"))


def test_resume_after_crash_has_every_image_exactly_once(prepared, imagenet, tmp_path, monkeypatch):
    ref_out, ref_manifest, expected = prepared
    root, _ = imagenet
    out = tmp_path / "crashed"
    committed = []

    def crash_after_two(record):
        committed.append(record)
        if len(committed) == 2:
            raise KeyboardInterrupt("simulated crash after 2 shards")

    monkeypatch.setattr(prepare_mod, "_on_shard_committed", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, out, shard_size=5, quiet=True)
    partial = read_manifest(str(out))
    assert not partial["complete"] and sum(len(s["shards"]) for s in partial["splits"].values()) == 2
    with pytest.raises(DataError, match="unfinished prep"):
        load_manifest(str(out))
    survivors = {r["file"]: (out / r["file"]).stat().st_mtime_ns for r in committed}
    # debris of a hard kill: a staging part and a half-written temp shard
    (out / "_staging" / "wave-00000" / "shard=x").mkdir(parents=True, exist_ok=True)
    (out / "_staging" / "wave-00000" / "shard=x" / "part.parquet").write_bytes(b"junk")
    (out / "train" / ".train-00001-of-00009.parquet.tmp-123").write_bytes(b"junk")

    monkeypatch.setattr(prepare_mod, "_on_shard_committed", lambda record: None)
    manifest = prepare(root, out, shard_size=5, quiet=True)
    assert manifest["counts"] == ref_manifest["counts"]
    for split in ("train", "val"):
        paths = [r["path"] for r in _rows(out, manifest, split)]
        assert len(paths) == len(set(paths)) == expected[split]
        # same shards, byte for byte, as an uninterrupted prep
        assert [s["sha256"] for s in manifest["splits"][split]["shards"]] == \
               [s["sha256"] for s in ref_manifest["splits"][split]["shards"]]
    assert {f: (out / f).stat().st_mtime_ns for f in survivors} == survivors   # not redone
    assert not list(out.rglob("*.tmp-*")) and not (out / "_staging").exists()


def test_synthetic_set(ray_local, tmp_path):
    from sftok_platform.data import synthetic
    out = tmp_path / "syn"
    m = prepare_synthetic(out, 30, num_val=10, shard_size=16, quiet=True)
    assert m["counts"] == {"train": 30, "val": 10} and len(m["classes"]) == 10
    assert m["source"]["type"] == "synthetic"
    rows = _rows(out, m, "train")
    labels = sorted(r["label"] for r in rows)
    assert labels == sorted(i % 10 for i in range(30))
    r = rows[0]
    assert (r["width"], r["height"]) == (256, 256)
    index = int(r["path"].rsplit("/", 1)[1].split(".")[0])
    assert r["image_bytes"] == synthetic.render_jpeg(index, seed=0, split="train")[0]    # deterministic
    # classes differ in structure: mean per-class images are not all alike
    a, b = synthetic.render(0)[0].astype(float), synthetic.render(3)[0].astype(float)
    assert np.abs(a - b).mean() > 10
    assert prepare_synthetic(out, 30, num_val=10, shard_size=16, quiet=True) == m       # complete: no-op


BAD_DATA_COMMANDS = [
    ["prepare", "--synthetic", "10", "--shard-size", "0"],         # was: silently the default shard size
    ["prepare", "--synthetic", "10", "--synthetic-val", "-1"],     # was: silently no val split
    ["prepare", "--synthetic", "10", "--num-cpus", "0"],           # was: a crash inside Ray Data
    ["prepare", "--synthetic", "10", "--wave-images", "0"],
    ["prepare", "--source", "SRC", "--resize", "0"],               # was: every task failed inside Ray
    ["prepare", "--source", "SRC", "--max-pixels", "0"],
    ["proxy-codes", "SHARDS", "--teacher", "TEACHER", "--batch-size", "0"],
    ["proxy-codes", "SHARDS", "--teacher", "TEACHER", "--actors", "0"],
]


@pytest.mark.parametrize("argv", BAD_DATA_COMMANDS, ids=[" ".join(a) for a in BAD_DATA_COMMANDS])
def test_bad_counts_are_refused_before_ray_starts(argv, tmp_path, monkeypatch, capsys):
    """A zero or negative count ends the data command with exit code 2 and ``--flag N must be >= M``
    before Ray starts and before anything is written."""
    import sftok_platform.cluster as cluster
    from sftok_platform.data.__main__ import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a data command whose options are bad")

    monkeypatch.setattr(cluster, "connect", no_ray)
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (32, 32)).save(src / "a.png")
    shards = tmp_path / "shards"
    shards.mkdir()
    (tmp_path / "teacher.bin").write_bytes(b"0")
    names = {"SRC": str(src), "SHARDS": str(shards), "TEACHER": str(tmp_path / "teacher.bin")}
    argv = [names.get(a, a) for a in argv]
    out = ["--out", str(tmp_path / "out")] if argv[0] == "prepare" else []
    assert main([*argv, *out]) == 2
    flag, value = argv[-2], argv[-1]
    assert f"error: {flag} {value} must be >= " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_resume_after_killed_process(prepared, imagenet, tmp_path):
    """SIGKILL a real `prepare` process (and its Ray, workers included) mid-run, then finish it."""
    import subprocess
    import sys
    import time

    from processes import kill_with_ray
    ref_out, ref_manifest, expected = prepared
    root, _ = imagenet
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sftok_platform.data", "prepare", "--source", str(root), "--out", str(out),
           "--shard-size", "5", "--wave-images", "5", "--num-cpus", "1", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            m = read_manifest(str(out)) if (out / "manifest.json").exists() else None
            if m and sum(len(s["shards"]) for s in m["splits"].values()) >= 1:
                break
            time.sleep(0.2)
    finally:
        kill_with_ray(proc)          # the prep, its Ray and the Ray's workers (they are not in its group)
    partial = read_manifest(str(out))
    assert partial is not None and not partial["complete"], "the prep finished before it could be killed"
    manifest = prepare(root, out, shard_size=5, quiet=True)
    for split in ("train", "val"):
        paths = [r["path"] for r in _rows(out, manifest, split)]
        assert len(paths) == len(set(paths)) == expected[split]
        assert [s["sha256"] for s in manifest["splits"][split]["shards"]] == \
               [s["sha256"] for s in ref_manifest["splits"][split]["shards"]]
