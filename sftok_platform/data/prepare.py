"""Turn an image folder (or the built-in synthetic set) into Parquet shards, resumably, with Ray Data.

How a prep runs
---------------
1. **Plan** (driver, cheap): list the source, give every file its split and label, and cut each split into
   shards of ``shard_size`` files. Files are assigned to shards in the order of a hash of their path, so a
   shard mixes classes (ImageNet sorted by class would otherwise make one class per shard, which hurts the
   file-level shuffle of the reader) and the plan depends only on the listing. Shard names are
   ``<split>/<split>-00012-of-00884.parquet``.
2. **Guard**: the output's ``manifest.json`` (written before any other file) holds the source fingerprint
   and the options. A different data set or different options in ``--out`` is an error before work starts;
   a missing/empty source too.
3. **Waves** of pending shards (``wave_images`` files at most; by default all of them at once): one Ray Data
   pipeline per wave, ``from_items`` with **one row per shard** (its planned files) -> ``map`` (one task per
   shard): read each file's original bytes, full decode to validate (convert or skip, see
   ``validate.py``), order rows by path hash (classes interleaved, so the reader's local shuffle buffer
   sees every class even in a data set of one or two shards), write ``<name>.parquet.tmp-*``, fsync,
   ``os.replace`` to the final name; the task returns the shard's record (rows, size, sha256, the
   skipped/converted files), which the driver adds to the manifest (replaced atomically) as shards finish.

   A shard is the unit of work because its file must hold exactly its planned rows under a deterministic
   name: Ray Data's ``write_parquet`` names files per task and would need a second pass (stage, then gather
   per shard), which cost a whole extra write and read of every image (measured: the prep spent 2.9x the
   CPU of a single-process loop per image; one pass: see BENCHMARKS.md, "Data preparation").

Why this is crash-safe: a shard either has its final file *and* a manifest record, or it is redone from its
source files. Final names are deterministic and written by rename, so a redo replaces rather than duplicates,
and a crash mid-write leaves only temp files, which the next run deletes before it starts (a shard task
that is cancelled mid-write deletes its own).
Rerunning after a crash therefore ends with every image exactly once; rerunning a finished prep finds every
shard recorded and does nothing. (Ray Data's own checkpointing, ``CheckpointConfig(id_column=...)``, is
beta, can leave partial files behind on a hard kill, and does not give deterministic file names.)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import synthetic
from .manifest import (KIND, SCHEMA_VERSION, DataError, check_at_least, file_sha256, fingerprint, is_remote,
                       read_manifest, write_manifest, load_manifest)
from .sources import Entry, scan_source
from .validate import CheckOptions, Checked, check_image

STAGING = "_staging"         # written by versions before 2026-12-07 (stage + gather); removed if found
ROW_GROUP_SIZE = 256        # ~30 MB of ImageNet JPEGs: bounded reader memory, far below Parquet's 2 GiB limit
TARGET_SHARD_BYTES = 160e6  # aim: 100-250 MB per shard (PLATFORM P17)
MIN_SHARD_IMAGES, MAX_SHARD_IMAGES = 1000, 2000

SHARD_SCHEMA = pa.schema([("image_bytes", pa.binary()), ("label", pa.int64()), ("path", pa.string()),
                          ("width", pa.int32()), ("height", pa.int32())])
_STAGE_SCHEMA = pa.schema(list(SHARD_SCHEMA) + [("skip_reason", pa.string()), ("note", pa.string())])


# ######################################################################################################
# Plan
# ######################################################################################################

@dataclass
class ShardPlan:
    split: str
    name: str
    file: str                 # relative to the output dir
    entries: list[Entry]


def _path_hash(relpath: str) -> bytes:
    """The order of files in a split and of rows in a shard: deterministic and class-mixed."""
    return hashlib.sha1(relpath.encode()).digest()


def plan_shards(split: str, entries: list[Entry], shard_size: int) -> list[ShardPlan]:
    """Cut ``entries`` into ~equal shards in path-hash order (deterministic, class-mixed)."""
    if not entries:
        return []
    order = sorted(entries, key=lambda e: _path_hash(e.relpath))
    n = math.ceil(len(order) / shard_size)
    bounds = np.linspace(0, len(order), n + 1).round().astype(int)
    shards = []
    for i in range(n):
        name = f"{split}-{i:05d}-of-{n:05d}"
        shards.append(ShardPlan(split, name, f"{split}/{name}.parquet",
                                sorted(order[bounds[i]:bounds[i + 1]], key=lambda e: e.relpath)))
    return shards


def auto_shard_size(avg_bytes: float) -> int:
    """Images per shard for ~160 MB shards, clamped to 1000-2000 images."""
    return int(np.clip(TARGET_SHARD_BYTES / max(avg_bytes, 1.0), MIN_SHARD_IMAGES, MAX_SHARD_IMAGES))


@dataclass
class PrepJob:
    """What to prepare: the planned rows and how one shard's planned files become rows."""
    source: dict[str, Any]
    options: dict[str, Any]
    classes: list[dict]
    splits: dict[str, list[Entry]]
    scan_skipped: dict[str, list[dict]]
    make_rows: Callable[[list[str], list[int]], pa.Table]   # (relpaths, labels) -> _STAGE_SCHEMA rows


# ######################################################################################################
# Row producers (run inside Ray Data tasks)
# ######################################################################################################

class _FileRows:
    """A shard's planned files -> rows: original bytes, fully decoded to validate (convert or skip)."""

    def __init__(self, root: str, opts: CheckOptions):
        self.root, self.opts = root, opts

    def __call__(self, relpaths: list[str], labels: list[int]) -> pa.Table:
        cols = {k: [] for k in _STAGE_SCHEMA.names}
        for relpath, label in zip(relpaths, labels):
            try:
                with open(os.path.join(self.root, relpath), "rb") as f:
                    checked = check_image(f.read(), self.opts)
            except OSError as e:                       # vanished or unreadable since the scan: skipped, reported
                checked = Checked(b"", 0, 0, skip_reason=f"unreadable: {e.strerror or e}")
            for k, v in (("image_bytes", checked.data), ("label", label), ("path", relpath),
                         ("width", checked.width), ("height", checked.height),
                         ("skip_reason", checked.skip_reason), ("note", checked.note)):
                cols[k].append(v)
        return pa.table(cols, schema=_STAGE_SCHEMA)


class _SyntheticRows:
    """A shard's planned synthetic entries -> rendered JPEG rows (deterministic in seed, split and index)."""

    def __init__(self, seed: int, size: int):
        self.seed, self.size = seed, size

    def __call__(self, relpaths: list[str], labels: list[int]) -> pa.Table:
        cols = {k: [] for k in _STAGE_SCHEMA.names}
        for relpath in relpaths:
            split, index = synthetic.parse_relpath(relpath)
            data, label = synthetic.render_jpeg(index, seed=self.seed, split=split, size=self.size)
            for k, v in (("image_bytes", data), ("label", label), ("path", relpath), ("width", self.size),
                         ("height", self.size), ("skip_reason", ""), ("note", "")):
                cols[k].append(v)
        return pa.table(cols, schema=_STAGE_SCHEMA)


class _BuildShard:
    """Ray Data ``map`` fn: one shard row (name, file, planned relpaths and labels) -> its final Parquet file
    in ``out``; returns ``{"record": <manifest record as JSON>}``."""

    def __init__(self, make_rows: Callable[[list[str], list[int]], pa.Table], out: str):
        self.make_rows, self.out = make_rows, out

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        relpaths, labels = list(row["relpaths"]), [int(x) for x in row["labels"]]
        record = write_shard(self.out, row["name"], row["file"], self.make_rows(relpaths, labels), set(relpaths))
        return {"record": json.dumps(record)}


def write_shard(out: str, name: str, file: str, table: pa.Table, expected: set[str]) -> dict[str, Any]:
    """A shard's rows (``_STAGE_SCHEMA``) -> its final Parquet file, atomically. Returns the manifest record."""
    paths = table.column("path").to_pylist()
    if len(paths) != len(expected) or set(paths) != expected:
        missing, extra = sorted(expected - set(paths)), sorted(set(paths) - expected)
        raise DataError(f"shard {name}: {len(paths)} rows for {len(expected)} planned files "
                        f"(missing {missing[:3]}, unexpected {extra[:3]}); rerun the prep to redo it.")
    reasons, notes = table.column("skip_reason").to_pylist(), table.column("note").to_pylist()
    skipped = sorted(({"path": p, "reason": r} for p, r in zip(paths, reasons) if r), key=lambda x: x["path"])
    converted = sorted(({"path": p, "reason": n} for p, n, r in zip(paths, notes, reasons) if n and not r),
                       key=lambda x: x["path"])
    keep = pa.array([not r for r in reasons], type=pa.bool_())
    rows = table.filter(keep).select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
    kept_paths = rows.column("path").to_pylist()
    rows = rows.take(sorted(range(len(kept_paths)), key=lambda i: _path_hash(kept_paths[i])))

    final = Path(out) / file
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    compression = {"image_bytes": "none", "label": "zstd", "path": "zstd", "width": "zstd", "height": "zstd"}
    try:
        pq.write_table(rows, tmp, row_group_size=ROW_GROUP_SIZE, compression=compression)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:          # an error, or Ray cancelling this task (the driver failed): no debris
        tmp.unlink(missing_ok=True)
        raise
    return {"name": name, "file": file, "rows": rows.num_rows, "bytes": final.stat().st_size,
            "sha256": file_sha256(final), "skipped": skipped, "converted": converted}


# Test hook: called in the driver after each shard is recorded (tests inject a crash here).
def _on_shard_committed(record: dict[str, Any]) -> None:
    pass


# ######################################################################################################
# Driver
# ######################################################################################################

def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[prepare] {msg}", file=sys.stderr, flush=True)


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _same_dataset_or_raise(out: Path, existing: dict, job: PrepJob) -> None:
    old_fp, new_fp = existing["source"]["fingerprint"], job.source["fingerprint"]
    if old_fp != new_fp:
        raise DataError(f"{out} already holds a different data set (source {existing['source'].get('path')} "
                        f"fingerprint {old_fp[:12]}; this source {job.source.get('path')} has {new_fp[:12]}). "
                        f"Use a new --out directory, or delete {out} to re-prepare.")
    if existing["options"] != job.options:
        diff = {k: (existing["options"].get(k), v) for k, v in job.options.items() if existing["options"].get(k) != v}
        raise DataError(f"{out} was prepared with other options ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}). "
                        f"Rerun with the original options, use a new --out, or delete {out}.")


def _new_manifest(job: PrepJob, plans: dict[str, list[ShardPlan]]) -> dict[str, Any]:
    return {"kind": KIND, "schema_version": SCHEMA_VERSION, "complete": False, "source": job.source,
            "options": job.options, "classes": job.classes,
            "splits": {split: {"planned_images": len(job.splits[split]), "planned_shards": len(plans[split]),
                               "scan_skipped": job.scan_skipped.get(split, []), "shards": []}
                       for split in job.splits}}


def _finalize(manifest: dict[str, Any]) -> None:
    for split in manifest["splits"].values():
        split["shards"].sort(key=lambda s: s["name"])
        split["num_images"] = sum(s["rows"] for s in split["shards"])
        split["skipped"] = sorted(split["scan_skipped"] + [x for s in split["shards"] for x in s["skipped"]],
                                  key=lambda x: x["path"])
        split["converted"] = sorted((x for s in split["shards"] for x in s["converted"]), key=lambda x: x["path"])
    manifest["counts"] = {name: s["num_images"] for name, s in manifest["splits"].items()}
    manifest["complete"] = True


def run_job(job: PrepJob, out: str | os.PathLike, *, shard_size: int, wave_images: int | None = None,
            quiet: bool = False, address: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Prepare (or finish preparing) ``job`` into ``out``. Returns the complete manifest."""
    if is_remote(str(out)):
        raise DataError(f"--out {out}: prepare writes to a local or shared (NFS) path; copy the finished "
                        f"directory to object storage afterwards (e.g. `aws s3 sync`). Readers take s3:// paths.")
    out = Path(out).expanduser().resolve()
    plans = {split: plan_shards(split, entries, shard_size) for split, entries in job.splits.items()}
    manifest = read_manifest(str(out)) if out.is_dir() else None
    if manifest is None and out.is_dir() and any(out.iterdir()):
        raise DataError(f"--out {out} is not empty and has no manifest.json: it is not a shards directory "
                        f"made by this tool. Pick an empty or new directory.")
    if manifest is not None:
        _same_dataset_or_raise(out, manifest, job)
    else:
        manifest = _new_manifest(job, plans)

    # Keep only records whose file is still there; everything else is (re)done.
    pending: dict[str, list[ShardPlan]] = {}
    for split, shards in plans.items():
        records = [r for r in manifest["splits"][split]["shards"]
                   if (out / r["file"]).is_file() and (out / r["file"]).stat().st_size == r["bytes"]]
        manifest["splits"][split]["shards"] = records
        done = {r["name"] for r in records}
        pending[split] = [s for s in shards if s.name not in done]
    todo = [s for shards in pending.values() for s in shards]
    if not todo and manifest.get("complete"):
        _log(quiet, f"{out} is complete ({', '.join(f'{k}: {v}' for k, v in manifest['counts'].items())} images); "
                    f"nothing to do")
        return manifest

    manifest["complete"] = False
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, manifest)                     # first file in --out: marks it as ours
    shutil.rmtree(out / STAGING, ignore_errors=True)  # an older version's leftovers
    for split in plans:
        for stale in (out / split).glob(".*.tmp-*") if (out / split).is_dir() else []:
            stale.unlink()

    if todo:
        from sftok_platform.cluster import connect
        connect(address=address, num_cpus=num_cpus)
        import ray
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        total = sum(len(s.entries) for s in todo)
        wave_images = wave_images or total
        _log(quiet, f"{len(todo)} shards ({total} files) to prepare into {out}; {cpus} CPUs, one task per shard"
                    + (f", waves of <= {wave_images} files" if wave_images < total else ""))
        build = _BuildShard(job.make_rows, str(out))
        t0, done_files = time.time(), 0
        while todo:
            wave, n = [], 0
            while todo and (not wave or n + len(todo[0].entries) <= wave_images):
                n += len(todo[0].entries)
                wave.append(todo.pop(0))
            by_name = {s.name: s for s in wave}
            items = [{"name": s.name, "file": s.file, "relpaths": [e.relpath for e in s.entries],
                      "labels": [e.label for e in s.entries]} for s in wave]
            # one block per shard, so that each shard is one task (Ray Data's tasks retry when their worker dies)
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map(build)
            ds.context.enable_progress_bars = not quiet    # this dataset only: the process's setting stays
            # leaving this loop early (an error, Ctrl-C) shuts the pipeline down and cancels its running
            # shard tasks; a task cancelled mid-write deletes its temp file (write_shard)
            for row in ds.iter_rows():
                record = json.loads(row["record"])
                shard = by_name[record["name"]]
                manifest["splits"][shard.split]["shards"].append(record)
                write_manifest(out, manifest)
                done_files += len(shard.entries)
                _on_shard_committed(record)
                rate = done_files / max(time.time() - t0, 1e-9)
                _log(quiet, f"{shard.file}: {record['rows']} rows, {len(record['skipped'])} skipped | "
                            f"{done_files}/{total} files, {rate:.0f} files/s, ETA {_fmt_eta((total - done_files) / rate)}")

    _finalize(manifest)
    write_manifest(out, manifest)
    shutil.rmtree(out / STAGING, ignore_errors=True)
    _log(quiet, f"done: {', '.join(f'{k}: {v}' for k, v in manifest['counts'].items())} images in {out}")
    return manifest


# ######################################################################################################
# Public entry points
# ######################################################################################################

def prepare(source: str | os.PathLike, out: str | os.PathLike, *, resize: int | None = None,
            shard_size: int | None = None, min_size: int = 16, max_pixels: int = 100_000_000,
            val_labels: str | None = None, class_names: str | None = None, unlabeled: bool = False,
            val_fraction: float = 0.0, wave_images: int | None = None, quiet: bool = False,
            address: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """Prepare an image folder (ImageNet layout, class folders or unlabeled) into Parquet shards."""
    check_at_least(("--resize", resize, 1), ("--shard-size", shard_size, 1), ("--min-size", min_size, 0),
                   ("--max-pixels", max_pixels, 1), ("--wave-images", wave_images, 1), ("--num-cpus", num_cpus, 1))
    plan = scan_source(source, val_labels=val_labels, class_names=class_names, unlabeled=unlabeled,
                       val_fraction=val_fraction)
    for note in plan.notes:
        _log(quiet, note)
    if shard_size is None:
        all_entries = [e for entries in plan.splits.values() for e in entries]
        sample = [all_entries[i] for i in np.linspace(0, len(all_entries) - 1, min(256, len(all_entries))).astype(int)]
        avg = float(np.mean([os.path.getsize(os.path.join(plan.root, e.relpath)) for e in sample]))
        if resize:
            avg = min(avg, 0.35 * resize * resize)     # q95 JPEG at ~resize^2 pixels: ~0.3 bytes/pixel
        shard_size = auto_shard_size(avg)
    opts = CheckOptions(resize=resize, min_size=min_size, max_pixels=max_pixels)
    rows = ([split, e.relpath, e.label] for split, entries in plan.splits.items() for e in entries)
    job = PrepJob(
        source={"type": plan.layout, "path": plan.root, "fingerprint": fingerprint(rows),
                "num_files": {k: len(v) for k, v in plan.splits.items()}},
        options={"resize": resize, "min_size": min_size, "max_pixels": max_pixels, "shard_size": shard_size},
        classes=plan.classes, splits=plan.splits, scan_skipped=plan.scan_skipped,
        make_rows=_FileRows(plan.root, opts))
    return run_job(job, out, shard_size=shard_size, wave_images=wave_images, quiet=quiet, address=address,
                   num_cpus=num_cpus)


def prepare_synthetic(out: str | os.PathLike, num_images: int, *, num_val: int | None = None, seed: int = 0,
                      image_size: int = 256, shard_size: int = 2000, wave_images: int | None = None,
                      quiet: bool = False, address: str | None = None, num_cpus: int | None = None) -> dict[str, Any]:
    """The built-in data set: ``num_images`` train + ``num_val`` (default 10%) val images, seeded."""
    if num_images < 1:
        raise DataError(f"--synthetic {num_images}: ask for at least 1 image (e.g. --synthetic 2000).")
    check_at_least(("--synthetic-val", num_val, 0), ("--seed", seed, 0), ("image size", image_size, 8),
                   ("--shard-size", shard_size, 1), ("--wave-images", wave_images, 1), ("--num-cpus", num_cpus, 1))
    num_val = max(1, num_images // 10) if num_val is None else num_val
    splits = {"train": [Entry(synthetic.relpath("train", i), i % len(synthetic.CLASSES)) for i in range(num_images)]}
    if num_val > 0:
        splits["val"] = [Entry(synthetic.relpath("val", i), i % len(synthetic.CLASSES)) for i in range(num_val)]
    rows = ([split, e.relpath, e.label] for split, entries in splits.items() for e in entries)
    job = PrepJob(
        source={"type": "synthetic", "path": "", "fingerprint": fingerprint(rows),
                "num_files": {k: len(v) for k, v in splits.items()}},
        options={"seed": seed, "image_size": image_size, "shard_size": shard_size,
                 "generator": f"synthetic-v1/{len(synthetic.CLASSES)}-classes"},
        classes=synthetic.classes(), splits=splits, scan_skipped={},
        make_rows=_SyntheticRows(seed, image_size))
    return run_job(job, out, shard_size=shard_size, wave_images=wave_images, quiet=quiet, address=address,
                   num_cpus=num_cpus)


def ensure_dataset(cfg) -> str:
    """The shards dir for a pipeline run (``cfg``: ``sftok_platform.config.Config``).

    ``cfg.data.path`` set: it must hold a complete manifest (else a ``DataError`` saying which command makes
    it). Empty: the synthetic set under ``<cfg.run.root>/data/synthetic-<train>+<val>-seed<s>-<size>px`` is made,
    or reused when complete. The name carries what defines the set, so runs and sweeps with other sizes
    under the same root get their own set instead of a refusal.
    """
    if cfg.data.path:
        path = cfg.data.path if is_remote(cfg.data.path) else str(Path(cfg.data.path).expanduser().resolve())
        load_manifest(path)
        return path
    if is_remote(cfg.run.root):
        raise DataError(f"run.root={cfg.run.root} is object storage; the built-in synthetic set needs a local or "
                        f"NFS path: prepare it (`python -m sftok_platform.data prepare --synthetic "
                        f"{cfg.data.synthetic_images} --out DIR`) and set data.path=DIR.")
    d = cfg.data
    name = f"synthetic-{d.synthetic_images}+{d.synthetic_val_images}-seed{d.seed}-{cfg.model.image_size}px"
    out = Path(cfg.run.root).expanduser().resolve() / "data" / name
    try:
        prepare_synthetic(out, cfg.data.synthetic_images, num_val=cfg.data.synthetic_val_images,
                          seed=cfg.data.seed, image_size=cfg.model.image_size, quiet=True)
    except DataError as e:
        raise DataError(f"{e} ({out} was made by another version of the synthetic renderer: delete it, or use "
                        f"another run.root)") from None
    return str(out)
