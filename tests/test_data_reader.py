"""Readers for Ray Train: SPEC C.3/E transforms, shapes/dtypes/ranges, per-epoch reshuffle, ensure_dataset,
and the optional proxy-code precompute (a Ray Data actor pool running the teacher encoder).

The suite's shared local Ray (conftest ``ray_cluster``) runs them."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sftok_platform.data import DataError, ensure_dataset, iter_train_batches, load_manifest, read_split
from sftok_platform.data.prepare import prepare_synthetic
from sftok_platform.data.transforms import center_crop, eval_transform, random_crop_flip, resize_shorter_side

SIZE = 64   # read at 64x64: the same code path as 256, a 16th of the pixels


def test_transforms_match_torchvision():
    from torchvision import transforms as T
    rng = np.random.default_rng(0)
    for w, h in [(500, 375), (300, 400), (100, 60)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = T.Resize(256, interpolation=T.InterpolationMode.BICUBIC, antialias=True)(img)
        ours = resize_shorter_side(img, 256)
        assert ours.size == ref.size and np.array_equal(np.asarray(ours), np.asarray(ref))
        assert np.array_equal(np.asarray(center_crop(ours, 256)), np.asarray(T.CenterCrop(256)(ref)))
        # RandomCrop + RandomHorizontalFlip semantics: offsets in [0, H-256] x [0, W-256], flip p=0.5
        big, seen_flip = np.asarray(ours), set()
        for seed in range(8):
            crop = np.asarray(random_crop_flip(ours, 256, np.random.default_rng(seed)))
            r = np.random.default_rng(seed)
            top, left = int(r.integers(0, big.shape[0] - 255)), int(r.integers(0, big.shape[1] - 255))
            flip = bool(r.random() < 0.5)
            window = big[top:top + 256, left:left + 256]
            assert np.array_equal(crop, window[:, ::-1] if flip else window)
            seen_flip.add(flip)
        assert seen_flip == {True, False}


@pytest.fixture(scope="module")
def ray_local(ray_cluster):
    from ray.data import DataContext
    ctx = DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True    # lets the test see the file order of each epoch
    yield
    ctx.execution_options.preserve_order = before  # the Ray is shared: leave the next modules Ray's default


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("reader") / "shards"
    prepare_synthetic(out, 12, num_val=6, shard_size=3, quiet=True)
    return str(out)


def _digest(arr) -> str:
    return hashlib.sha1(np.ascontiguousarray(np.asarray(arr)).tobytes()).hexdigest()


def test_eval_reader_is_resize_center_crop(shards):
    rows = read_split(shards, "val", train=False, image_size=SIZE).take_all()
    assert len(rows) == 6
    stored = []
    for s in load_manifest(shards)["splits"]["val"]["shards"]:
        stored += pq.read_table(f"{shards}/{s['file']}").to_pylist()
    expect = sorted(_digest(eval_transform(r["image_bytes"], SIZE).transpose(2, 0, 1).astype(np.float32) / 255)
                    for r in stored)
    for r in rows:
        assert set(r) == {"image", "label"}
        assert r["image"].shape == (3, SIZE, SIZE) and r["image"].dtype == np.float32
        assert 0.0 <= r["image"].min() and r["image"].max() <= 1.0
    assert sorted(_digest(r["image"]) for r in rows) == expect
    assert sorted(int(r["label"]) for r in rows) == sorted(r["label"] for r in stored)


def test_train_batches_shapes_and_per_epoch_reshuffle(shards):
    import torch
    ds = read_split(shards, "train", train=True, image_size=SIZE, seed=7)
    it = ds.streaming_split(1)[0]          # what ray.train.get_dataset_shard returns (a DataIterator)
    epochs = []
    for epoch in range(2):
        batches = list(iter_train_batches(it, 5, epoch=epoch, seed=7, device="cpu"))
        assert len(batches) == 12 // 5      # drop_last, and epoch 2 is not empty
        for b in batches:
            assert b["image"].shape == (5, 3, SIZE, SIZE) and b["image"].dtype == torch.float32
            assert b["label"].dtype == torch.int64
            assert 0.0 <= b["image"].min().item() and b["image"].max().item() <= 1.0
        epochs.append(([_digest(x) for b in batches for x in b["image"].numpy()],
                       [int(x) for b in batches for x in b["label"]]))
    (imgs0, labels0), (imgs1, labels1) = epochs
    assert labels0 != labels1                             # another file order
    # square 256 sources leave no room to crop at 64, so flips are what differ here (crops: transforms test)
    assert set(imgs0) != set(imgs1)
    # same seed, fresh dataset: epoch 0 again, image for image
    again = read_split(shards, "train", train=True, image_size=SIZE, seed=7)
    first = list(iter_train_batches(again, 5, epoch=0, seed=7, device="cpu"))
    assert [_digest(x) for b in first for x in b["image"].numpy()] == imgs0


def test_datasets_draw_no_progress_bars_and_preparing_leaves_the_setting_alone(shards, tmp_path):
    """Datasets read here draw no Ray Data bars even where the process draws them (the platform's own
    progress lines are the UI; bars from Train workers flood the console), and preparing shards quietly
    no longer switches the process's bars off as a side effect (that is what used to hide them, only on
    a run that had to prepare its data first)."""
    from ray.data import DataContext
    ctx = DataContext.get_current()
    before = ctx.enable_progress_bars
    ctx.enable_progress_bars = True
    try:
        prepare_synthetic(tmp_path / "more", 4, num_val=2, shard_size=2, quiet=True)
        assert ctx.enable_progress_bars is True
        ds = read_split(shards, "val", train=False, image_size=SIZE)
        assert ds.context.enable_progress_bars is False
        assert ds.map_batches(lambda b: b).context.enable_progress_bars is False    # derived datasets too
        assert ctx.enable_progress_bars is True
    finally:
        ctx.enable_progress_bars = before


def test_ensure_dataset(shards, tmp_path, monkeypatch):
    from sftok_platform.config import load_config
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", ["data.synthetic_images=20", "data.synthetic_val_images=10", "run.root=runs"])
    path = ensure_dataset(cfg)
    first = tmp_path / "runs" / "data" / f"synthetic-20+10-seed0-{cfg.model.image_size}px"
    assert path == str(first)                                           # relative run root made absolute
    assert load_manifest(path)["counts"] == {"train": 20, "val": 10}
    mtime = (first / "manifest.json").stat().st_mtime_ns
    assert ensure_dataset(cfg) == path                                  # complete: reused as is
    assert (first / "manifest.json").stat().st_mtime_ns == mtime

    cfg.data.synthetic_images = 21                                      # another size: its own set, beside
    other = ensure_dataset(cfg)
    assert other == str(tmp_path / "runs" / "data" / f"synthetic-21+10-seed0-{cfg.model.image_size}px")
    assert load_manifest(other)["counts"] == {"train": 21, "val": 10}
    assert (first / "manifest.json").stat().st_mtime_ns == mtime
    (Path(other) / "manifest.json").write_text((first / "manifest.json").read_text())
    with pytest.raises(DataError, match="another version of the synthetic renderer"):
        ensure_dataset(cfg)                                             # a set that is not what its name says
    cfg.data.path = shards
    assert ensure_dataset(cfg) == shards
    cfg.data.path = str(tmp_path / "missing")
    with pytest.raises(DataError, match=r"no manifest.json in .*missing: run `python -m sftok_platform.data prepare"):
        ensure_dataset(cfg)


def test_proxy_codes_match_the_teacher_and_reach_the_reader(ray_local, tmp_path):
    import torch
    from safetensors.torch import save_file
    from sftok_platform.data.proxy_codes import add_proxy_codes
    from sftok_platform.data.transforms import to_chw_float
    from sftok.maskgit_vqgan import MaskGITVQGAN
    torch.manual_seed(0)
    teacher = MaskGITVQGAN(hidden_channels=32).eval()
    weights = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))

    shards = tmp_path / "proxy_shards"
    prepare_synthetic(shards, 4, num_val=1, shard_size=2, quiet=True)
    with pytest.raises(DataError, match="has no proxy codes"):
        read_split(str(shards), "train", train=True, proxy_codes=True)
    m = add_proxy_codes(str(shards), str(weights), hidden_channels=32, batch_size=4, actors=1, quiet=True)
    assert m["proxy_codes"]["num_codes"] == 256 and "proxy_codes_pending" not in m
    assert all(s["proxy_codes"] for split in m["splits"].values() for s in split["shards"])
    assert load_manifest(str(shards)) == m                      # checksums updated with the rewrite

    table = pq.read_table(shards / m["splits"]["train"]["shards"][0]["file"])
    codes = np.array(table.column("proxy_codes").to_pylist(), dtype=np.int64)
    images = to_chw_float([eval_transform(b, 256) for b in table.column("image_bytes").to_pylist()])
    expect = teacher.encode_codes(torch.from_numpy(images)).numpy()
    assert codes.shape == (2, 256) and codes.max() < 1024
    # other batch sizes change conv numerics in the last bits; a random teacher has near-tied codes
    assert (codes == expect).mean() > 0.95

    stamps = [(shards / s["file"]).stat().st_mtime_ns for s in m["splits"]["train"]["shards"]]
    assert add_proxy_codes(str(shards), str(weights), hidden_channels=32, quiet=True) == m   # rerun: no-op
    assert [(shards / s["file"]).stat().st_mtime_ns for s in m["splits"]["train"]["shards"]] == stamps

    ds = read_split(str(shards), "val", train=True, proxy_codes=True)
    (batch,) = list(iter_train_batches(ds, 1, epoch=0, device="cpu"))
    ds8 = read_split(str(shards), "val", train=False, image_dtype="uint8", proxy_codes=True)
    (batch8,) = list(iter_train_batches(ds8, 1, epoch=0, device="cpu"))   # uint8 through Ray, float on device
    assert batch8["image"].dtype == torch.float32 and torch.equal(batch8["image"], batch["image"])
    assert batch["proxy_codes"].shape == (1, 256) and batch["proxy_codes"].dtype == torch.int64
    assert batch["image"].shape == (1, 3, 256, 256) and batch["label"].dtype == torch.int64
