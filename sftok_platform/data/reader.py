"""Read prepared shards into Ray Data for Ray Train: decode + augment on the fly, labels as ints.

Usage (driver)::

    ds_train = read_split(shards, "train", train=True, seed=cfg.data.shuffle_seed)
    ds_val = read_split(shards, "val", train=False)
    TorchTrainer(loop, datasets={"train": ds_train, "val": ds_val},
                 dataset_config=ray.train.DataConfig(datasets_to_split=["train"]), ...)

and in each worker, once per epoch (the iterator is one-shot, so call it again every epoch)::

    shard = ray.train.get_dataset_shard("train")
    for batch in iter_train_batches(shard, batch_size, epoch=epoch, seed=seed):   # drop_last=True
        images, labels = batch["image"], batch["label"]       # float32 [B,3,S,S] in [0,1], int64 [B]

Per-epoch reshuffle with a seed, without rebuilding the dataset: the Parquet file order is drawn by
``FileShuffleConfig(seed=seed)``, which Ray 2.60 reseeds from ``(seed, execution index)`` every time the
dataset is executed, i.e. every epoch (``reseed_after_execution=True``). The augmentation RNG of every row is
seeded from ``(seed, execution index, crc32(path))``: crops and flips change every epoch, yet a run with the
same seed sees the same images. Rows are mixed further by the local shuffle buffer in
``iter_train_batches`` (seeded from ``(seed, epoch)``). A restarted trainer starts again at execution 0 (Ray
2.60 has no mid-epoch data resume, PLATFORM 1.1); ``epoch_dataset`` gives an explicitly epoch-seeded dataset
for loops that rebuild their data per epoch.

Strings never reach ``iter_torch_batches`` (PLATFORM P15): the ``path`` column is used for seeding and dropped.
"""
from __future__ import annotations

import zlib
from typing import Any, Iterator

import numpy as np

from .manifest import PROXY_CODES_COLUMN, DataError, load_manifest, shard_paths
from .transforms import eval_transform, to_chw_float, train_transform

DEFAULT_BATCH = 16


def read_parquet(paths, **kwargs):
    """``ray.data.read_parquet`` through Ray Data's V1 Parquet datasource, the one every reader here uses.

    Ray 2.60's default (``DataContext.use_datasource_v2``) reads the file footers on a pool of new
    ``FooterReader`` actors (32 unless ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` says otherwise) at every
    execution of a dataset: every epoch, every validation pass, every trial. For shards that this platform
    wrote itself it buys nothing (no predicate or row-group pruning is asked for) and costs new processes:
    on 2 cores a 64-image val pass took 1.5-1.9 s against 0.16 s through V1, the first batch of a train
    epoch 1.9-2.9 s against 0.4-1.0 s (``bench/bench_read.py``). V1 keeps the same file shuffle (reseeded
    per execution) and column push-down. ``RAY_DATA_USE_DATASOURCE_V2=1`` in the environment selects V2.

    V1 samples a file when the dataset is created; its progress bar and its two INFO lines ("Estimated
    parquet encoding ratio", "... reader batch size") would show on the console at every stage and trial,
    so they are silenced here. The dataset draws no progress bars either (:func:`without_progress_bars`)."""
    import logging
    import os

    import ray
    from ray.data import DataContext
    logging.getLogger("ray.data._internal.datasource.parquet_datasource").setLevel(logging.WARNING)
    ctx = DataContext.get_current()
    saved = ctx.use_datasource_v2, ctx.enable_progress_bars
    ctx.use_datasource_v2 = os.environ.get("RAY_DATA_USE_DATASOURCE_V2", "0") == "1"
    ctx.enable_progress_bars = False
    try:
        ds = ray.data.read_parquet(paths, **kwargs)
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = saved
    return without_progress_bars(ds)


def without_progress_bars(ds):
    """``ds`` (and every dataset derived from it: they share its ``DataContext``) draws no Ray Data
    progress bars, whatever the process-wide setting.

    Every job of this platform prints its own progress lines (stage steps, evaluation images, shards
    written). Bars drawn where a dataset executes inside Ray Train workers or Tune trials reach the
    driver's console through Ray's log forwarding, one redrawn line per operator: a no-flag pipeline
    run on prepared shards printed 127 bar lines in its first 45 s, and the 12-trial laptop ablation
    wrote an 11 MB log of them (434k lines)."""
    ds.context.enable_progress_bars = False
    return ds


class DecodeAugment:
    """map_batches fn: (image_bytes, label, path[, proxy_codes]) -> (image float32 [B,3,S,S], label int64)."""

    def __init__(self, *, train: bool, image_size: int = 256, seed: int | None = 0, proxy_codes: bool = False,
                 image_dtype: str = "float32"):
        if image_dtype not in ("float32", "uint8"):
            raise DataError(f"image_dtype={image_dtype!r}: use 'float32' (values in [0,1]) or 'uint8' (0..255).")
        self.train, self.size, self.seed, self.proxy_codes = train, image_size, seed, proxy_codes
        self.image_dtype = image_dtype

    def _rng(self, execution: int, path: str) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng([self.seed, execution, zlib.crc32(path.encode())])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ray.data import DataContext
        execution = DataContext.get_current()._execution_idx   # same source Ray's own reseeding uses
        images = []
        for data, path in zip(batch["image_bytes"], batch["path"]):
            if self.train:
                images.append(train_transform(data, self.size, self._rng(execution, str(path))))
            else:
                images.append(eval_transform(data, self.size))
        image = (to_chw_float(images) if self.image_dtype == "float32"
                 else np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))
        out = {"image": image, "label": np.asarray(batch["label"], dtype=np.int64)}
        if self.proxy_codes:
            out[PROXY_CODES_COLUMN] = np.stack([np.asarray(c, dtype=np.int64) for c in batch[PROXY_CODES_COLUMN]])
        return out


def read_split(shards_dir: str, split: str, *, train: bool, image_size: int = 256, seed: int | None = 0,
               proxy_codes: bool = False, batch_size: int = DEFAULT_BATCH, limit: int | None = None,
               image_dtype: str = "float32"):
    """A ``ray.data.Dataset`` of ``image`` float32 [3,S,S] in [0,1] and ``label`` int64 for one split.

    train=True: SPEC C.3 augmentation (shorter side to ``image_size`` bicubic antialias, random crop, h-flip)
    and files reshuffled every epoch from ``seed``. train=False: resize + center crop, file order fixed.
    ``proxy_codes=True`` adds the precomputed teacher codes (int64 [256]); they belong to the center crop,
    so the images are then center-cropped and unflipped even when ``train`` (no augmentation: see
    ``proxy_codes.py``). ``limit`` keeps the first N rows (quick evals).
    ``image_dtype="uint8"`` keeps images as uint8 [3,S,S] (0..255) through Ray: 4x less data in the object
    store and to the GPU; ``iter_train_batches`` then converts them to float32 in [0,1] on the device.
    """
    from ray.data import FileShuffleConfig

    manifest = load_manifest(shards_dir)
    files = [p for p, s in zip(shard_paths(shards_dir, split, manifest), manifest["splits"][split]["shards"])
             if s["rows"] > 0]
    if not files:
        raise DataError(f"{shards_dir}: split {split!r} has no images; prepare a source with images in it.")
    columns = ["image_bytes", "label", "path"]
    if proxy_codes:
        if not manifest.get("proxy_codes"):
            raise DataError(f"{shards_dir} has no proxy codes: run `python -m sftok_platform.data proxy-codes "
                            f"{shards_dir} --teacher <maskgit-vqgan .bin>` or set data.use_proxy_codes=false.")
        columns.append(PROXY_CODES_COLUMN)
    # select_columns, not read_parquet(columns=) (deprecated in Ray 2.60): Ray Data pushes the projection
    # into the Parquet read, so the unused columns are still not read
    ds = read_parquet(files, shuffle=FileShuffleConfig(seed=seed) if train else None).select_columns(columns)
    if limit is not None:
        ds = ds.limit(limit)
    augment = train and not proxy_codes
    return ds.map_batches(DecodeAugment(train=augment, image_size=image_size, seed=seed, proxy_codes=proxy_codes,
                                        image_dtype=image_dtype),
                          batch_size=batch_size, batch_format="numpy")


def epoch_dataset(shards_dir: str, split: str, epoch: int, *, seed: int = 0, **kwargs):
    """``read_split(train=True)`` with a seed derived from ``(seed, epoch)``: the same epoch always gives the
    same file order and augmentations, also after a restart. For loops that rebuild their data each epoch."""
    return read_split(shards_dir, split, train=True, seed=int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]),
                      **kwargs)


def iter_train_batches(shard, batch_size: int, *, epoch: int, seed: int = 0, shuffle_buffer: int = 0,
                       device: Any = "auto", drop_last: bool = True, prefetch_batches: int = 2) -> Iterator[dict]:
    """One epoch of torch batches from a Ray Train dataset shard (``ray.train.get_dataset_shard``) or a Dataset.

    ``drop_last=True`` keeps every worker at the same number of steps (uneven batches deadlock the
    all-reduce, PLATFORM P9). ``shuffle_buffer`` > 0 adds a local shuffle seeded from ``(seed, epoch)``.
    uint8 images (``read_split(image_dtype="uint8")``) arrive as float32 in [0,1], converted on ``device``.
    """
    local_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]) if shuffle_buffer else None
    # dtypes stay as produced (image float32 or uint8, label/proxy_codes int64): no per-batch casts in Ray
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device, drop_last=drop_last,
                                          prefetch_batches=prefetch_batches,
                                          local_shuffle_buffer_size=shuffle_buffer or None,
                                          local_shuffle_seed=local_seed):
        batch["image"] = as_float_images(batch["image"])
        yield batch


def as_float_images(images):
    """float32 images in [0,1] from a batch of uint8 (0..255, ``image_dtype="uint8"``) or float32 images."""
    import torch
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def image_batches(shard, micro_batch: int, seed: int, device, first_epoch: int = 0) -> Iterator[Any]:
    """Endless micro-batches of images (stages 0-3) from a Ray Data shard, one reshuffled pass per epoch.

    ``iter_torch_batches`` is one-shot, so it is called again each epoch (PLATFORM.md 1.1). ``drop_last``
    keeps every rank on the same number of batches (uneven batches deadlock the all-reduce, P9). A resumed
    stage starts at a different ``first_epoch`` so its local shuffle differs from the first attempt's.
    """
    epoch = first_epoch
    while True:
        n = 0
        for batch in iter_train_batches(shard, micro_batch, epoch=epoch, seed=seed, device=device,
                                        shuffle_buffer=max(4 * micro_batch, 64)):
            n += 1
            yield batch["image"]
        if n == 0:
            raise RuntimeError(f"the train split of this worker has fewer than {micro_batch} images (one "
                               "micro-batch); use more data, fewer workers or a smaller global batch.")
        epoch += 1


def token_batches(shard, micro_batch: int, seed: int, device, first_epoch: int = 0) -> Iterator[dict]:
    """Endless micro-batches of token rows (stage 4: ``tokens``, ``tokens_flip``, ``label``), one reshuffled
    pass per epoch, like :func:`image_batches`."""
    import torch
    epoch = first_epoch
    dtypes = {"tokens": torch.int64, "tokens_flip": torch.int64, "label": torch.int64}
    while True:
        n = 0
        local_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        for batch in shard.iter_torch_batches(batch_size=micro_batch, dtypes=dtypes, device=device, drop_last=True,
                                              local_shuffle_buffer_size=max(4 * micro_batch, 64),
                                              local_shuffle_seed=local_seed):
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError(f"this worker's token shard has fewer than {micro_batch} rows (one micro-batch); "
                               "use more data, fewer workers or a smaller generator.global_batch_size.")
        epoch += 1
