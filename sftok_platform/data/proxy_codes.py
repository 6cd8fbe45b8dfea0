"""Optional: precompute the teacher's proxy codes once and store them in the shards.

Stages 1-2 train against the MaskGIT-VQGAN teacher's 16x16 code grid of each training image. Computing it on
the fly costs one teacher encoder pass per image per step (roughly the cost of the tokenizer's own forward
for SFTok-B); precomputing makes it free at train time. The price: codes belong to one fixed view, so the
images must be that view too. ``read_split(..., proxy_codes=True)`` therefore serves the **center crop,
unflipped** (the eval transform) even for training: the random crop + flip augmentation of SPEC C.3 is lost.
On ImageNet for a few epochs that is a mild loss (each image is seen a handful of times); for long runs or
small data sets, on-the-fly codes with augmentation are the faithful choice (the official code computes
them on the fly). ``data.use_proxy_codes`` picks.

Pipeline per wave of shards (Ray Data): ``read_parquet`` -> decode + center crop on CPU tasks (uint8) ->
teacher encoder in an actor pool (``compute=ActorPoolStrategy``, one GPU per actor when the cluster has
GPUs) -> codes collected in the driver (512 bytes/image) -> each shard rewritten with a ``proxy_codes``
column (fixed-size list of 256 uint16) by temp file + rename, and its manifest record updated. Rerunning
skips shards already marked; the manifest's top-level ``proxy_codes`` entry appears only when all are done.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .manifest import (PROXY_CODES_COLUMN, DataError, check_at_least, file_sha256, is_remote, load_manifest,
                       write_manifest)
from .prepare import ROW_GROUP_SIZE
from .reader import read_parquet
from .transforms import eval_transform

NUM_CODES = 256


def _decode_center(batch: dict[str, np.ndarray], image_size: int = 256) -> dict[str, np.ndarray]:
    images = np.stack([eval_transform(b, image_size) for b in batch["image_bytes"]])
    return {"image": images, "path": batch["path"]}


class TeacherEncoder:
    """Ray Data actor: uint8 center crops -> teacher codes (uint16 [256])."""

    def __init__(self, teacher_path: str, hidden_channels: int = 128):
        import torch
        from sftok.maskgit_vqgan import load_teacher
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.teacher = load_teacher(teacher_path, hidden_channels=hidden_channels).to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        with torch.inference_mode(), torch.autocast(self.device, enabled=False):
            codes = self.teacher.encode_codes(x)
        if codes.shape[1] != NUM_CODES:
            raise DataError(f"teacher gave {codes.shape[1]} codes per image, expected {NUM_CODES} (256x256 input).")
        return {"path": batch["path"], PROXY_CODES_COLUMN: codes.to(torch.int32).cpu().numpy().astype(np.uint16)}


def _rewrite_shard(path: Path, codes: dict[str, np.ndarray]) -> None:
    table = pq.read_table(path)
    if PROXY_CODES_COLUMN in table.column_names:
        table = table.drop_columns([PROXY_CODES_COLUMN])
    rows = np.stack([codes[p] for p in table.column("path").to_pylist()]).astype(np.uint16)
    col = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), type=pa.uint16()), NUM_CODES)
    table = table.append_column(PROXY_CODES_COLUMN, col)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    compression = {c: ("none" if c == "image_bytes" else "zstd") for c in table.column_names}
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression=compression)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def add_proxy_codes(shards_dir: str, teacher: str, *, hidden_channels: int = 128, batch_size: int = 64,
                    actors: int | None = None, wave_images: int = 20_000, address: str | None = None,
                    quiet: bool = False) -> dict[str, Any]:
    """Add ``proxy_codes`` (center crop, 256 x uint16) to every shard of ``shards_dir``. Resumable."""
    check_at_least(("--hidden-channels", hidden_channels, 1), ("--batch-size", batch_size, 1),
                   ("--actors", actors, 1), ("--wave-images", wave_images, 1))
    if is_remote(shards_dir):
        raise DataError("proxy-codes rewrites shards in place: run it on the local/NFS copy, then sync.")
    out = Path(shards_dir).resolve()
    manifest = load_manifest(str(out))
    if not Path(teacher).is_file():
        raise DataError(f"teacher weights {teacher} not found; pass the MaskGIT-VQGAN .bin "
                        f"(maskgit-vqgan-imagenet-f16-256.bin, HF fun-research/TiTok) or a stage-0 teacher file.")
    with open(teacher, "rb") as f:
        teacher_sha = hashlib.sha256(f.read()).hexdigest()
    info = manifest.get("proxy_codes_pending") or {}
    if manifest.get("proxy_codes", {}).get("teacher_sha256") not in (None, teacher_sha) or \
            info.get("teacher_sha256") not in (None, teacher_sha):
        raise DataError(f"{out} already has proxy codes of another teacher; prepare a fresh copy of the shards.")
    todo = [s for split in manifest["splits"].values() for s in split["shards"]
            if s["rows"] > 0 and not s.get("proxy_codes")]
    if not todo:
        if not quiet:
            print(f"[proxy-codes] {out}: every shard has proxy codes; nothing to do", file=sys.stderr)
        return manifest
    manifest.pop("proxy_codes", None)
    manifest["proxy_codes_pending"] = {"teacher_sha256": teacher_sha}
    write_manifest(out, manifest)

    from sftok_platform.cluster import connect
    connect(address=address)
    import ray
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = actors or max(1, gpus)
    t0, done = time.time(), 0
    while todo:
        wave, n = [], 0
        while todo and (not wave or n + todo[0]["rows"] <= wave_images):
            n += todo[0]["rows"]
            wave.append(todo.pop(0))
        ds = read_parquet([str(out / s["file"]) for s in wave]).select_columns(["image_bytes", "path"])
        ds = ds.map_batches(_decode_center, batch_size=batch_size)
        ds = ds.map_batches(TeacherEncoder, fn_constructor_kwargs={"teacher_path": str(teacher),
                                                                   "hidden_channels": hidden_channels},
                            compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if gpus else 0,
                            batch_size=batch_size)
        codes: dict[str, np.ndarray] = {}
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            for p, c in zip(batch["path"], batch[PROXY_CODES_COLUMN]):
                codes[str(p)] = np.asarray(c)
        for record in wave:
            path = out / record["file"]
            _rewrite_shard(path, codes)
            record.update(bytes=path.stat().st_size, sha256=file_sha256(path), proxy_codes=True)
            write_manifest(out, manifest)
            done += record["rows"]
        if not quiet:
            print(f"[proxy-codes] {done} images encoded, {done / (time.time() - t0):.1f} img/s", file=sys.stderr)
    manifest.pop("proxy_codes_pending", None)
    manifest["proxy_codes"] = {"teacher": str(Path(teacher).resolve()), "teacher_sha256": teacher_sha,
                               "view": "eval transform (resize shorter side 256 bicubic + center crop 256)",
                               "dtype": "uint16", "num_codes": NUM_CODES}
    write_manifest(out, manifest)
    return manifest
