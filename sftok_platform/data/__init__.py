"""Data for the SFTok platform: image folders -> Parquet shards (Ray Data) -> Ray Train readers.

    python -m sftok_platform.data prepare --source /data/imagenet --out /shared/shards
    python -m sftok_platform.data prepare --synthetic 2000 --out ./shards
    python -m sftok_platform.data inspect ./shards

Modules: ``sources`` (what to read), ``validate`` (keep/convert/skip one file), ``prepare`` (the resumable
Ray Data prep), ``manifest`` (manifest.json), ``synthetic`` (the built-in data set), ``transforms`` +
``reader`` (decode and augment for training/eval), ``proxy_codes`` (optional teacher-code precompute).
"""
from .manifest import DataError, class_names, load_manifest, shard_paths
from .prepare import ensure_dataset, prepare, prepare_synthetic
from .reader import epoch_dataset, iter_train_batches, read_parquet, read_split

__all__ = ["DataError", "class_names", "ensure_dataset", "epoch_dataset", "iter_train_batches", "load_manifest",
           "prepare", "prepare_synthetic", "read_parquet", "read_split", "shard_paths"]
