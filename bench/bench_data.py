"""Data benchmark: prep throughput (Ray Data vs a single-process PIL loop) and reader throughput.

    python bench/bench_data.py --images 3000 --cpus 2

1. Makes ``--images`` ImageNet-like JPEGs (500x375, q90, structured content) in a temp dir.
2. Baseline: one Python process reads every file, validates it exactly as the prep does (full decode,
   ``validate.check_image``) and writes Parquet shards of the same size.
3. Ray Data: ``prepare()`` on a local Ray instance with ``--cpus`` CPUs (started before the clock runs;
   the pipeline start, staging and commit are inside the clock), for the default mode (keep the original
   bytes) and ``--resize 288`` (decode + resize + re-encode).
4. Reader: images/s of ``read_split(train=True)`` (decode + SPEC C.3 augmentation to float32 [3,256,256])
   through ``iter_torch_batches``, next to the same transform in a single-process loop.
Prints one line per figure, and the machine load (``os.getloadavg``) before and after.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch                                                                 # noqa: E402

from sftok_platform.data import iter_train_batches, prepare, read_split      # noqa: E402
from sftok_platform.data.synthetic import render                             # noqa: E402
from sftok_platform.data.transforms import to_chw_float, train_transform     # noqa: E402
from sftok_platform.data.validate import CheckOptions, check_image           # noqa: E402


def make_source(root: Path, n: int, classes: int = 10) -> None:
    for i in range(n):
        d = root / "train" / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        arr, _ = render(i, seed=1, size=512)
        noise = np.random.default_rng(i).integers(-12, 13, (375, 500, 3))
        img = Image.fromarray(np.clip(arr[:375, :500].astype(int) + noise, 0, 255).astype(np.uint8))
        img.save(d / f"img_{i:07d}.JPEG", quality=90)


def baseline(root: Path, out: Path, shard_size: int, opts: CheckOptions) -> int:
    files = sorted(p for p in (root / "train").rglob("*") if p.is_file())
    out.mkdir(parents=True)
    rows, kept, shard = [], 0, 0

    def flush():
        nonlocal rows, shard
        if rows:
            pq.write_table(pa.Table.from_pylist(rows), out / f"train-{shard:05d}.parquet", row_group_size=256)
            rows, shard = [], shard + 1

    for p in files:
        c = check_image(p.read_bytes(), opts)
        if not c.skip_reason:
            rows.append({"image_bytes": c.data, "label": 0, "path": str(p.relative_to(root)),
                         "width": c.width, "height": c.height})
            kept += 1
        if len(rows) == shard_size:
            flush()
    flush()
    return kept


def ray_cpu_seconds() -> float:
    """CPU seconds used so far by this driver and the local Ray instance (GCS, raylet, every worker, also
    the ones already exited). Unlike wall time, this barely moves when other jobs load the machine."""
    import psutil
    from ray._private import worker
    total = time.process_time()
    for procs in worker._global_node.all_processes.values():
        for info in procs:
            try:
                proc = psutil.Process(info.process.pid)
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
                for child in proc.children(recursive=True):
                    ct = child.cpu_times()
                    total += ct.user + ct.system
            except psutil.Error:
                pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--reader-images", type=int, default=256, help="images for the single-process reader loop")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reader-only", action="store_true", help="reuse the shards of a previous run in --workdir")
    args = ap.parse_args()

    import ray
    from ray.data import DataContext
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    src = work / "src"
    if not src.exists():
        make_source(src, args.images)
    mb = sum(p.stat().st_size for p in src.rglob("*.JPEG")) / 1e6
    print(f"load before: {os.getloadavg()} on {os.cpu_count()} visible cores")
    print(f"source: {args.images} JPEGs 500x375 q90, {mb:.0f} MB ({mb / args.images * 1e3:.0f} KB avg)")
    from sftok_platform.cluster import connect
    connect(address="local", num_cpus=args.cpus)      # retries a raylet start-up time-out on a busy machine
    DataContext.get_current().enable_progress_bars = False

    # A 100-image copy of the source measures Ray's fixed cost per prep (pipeline start, waves, commit);
    # the first run also starts and warms the worker processes (imports), as any long prep would.
    small = work / "src_small"
    if not small.exists():
        for p in sorted((src / "train").rglob("*.JPEG"))[:100]:
            (small / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(p, small / p.relative_to(src))
    t = time.perf_counter()
    shutil.rmtree(work / "warm", ignore_errors=True)
    prepare(small, work / "warm", shard_size=args.shard_size, quiet=True)
    print(f"Ray cold start (first 100-image prep, starts the workers): {time.perf_counter() - t:.1f} s")

    manifests = {}
    for label, resize in () if args.reader_only else (("keep bytes", None), ("--resize 288", 288)):
        shutil.rmtree(work / "base", ignore_errors=True)
        t, c = time.perf_counter(), time.process_time()
        n = baseline(src, work / "base", args.shard_size, CheckOptions(resize=resize))
        t_base, c_base = time.perf_counter() - t, time.process_time() - c
        out = work / f"ray_{resize}"
        shutil.rmtree(out, ignore_errors=True)
        t, c = time.perf_counter(), ray_cpu_seconds()
        m = prepare(src, out, shard_size=args.shard_size, resize=resize, quiet=True)
        t_ray, c_ray = time.perf_counter() - t, ray_cpu_seconds() - c
        assert m["counts"]["train"] == n == args.images
        manifests[resize] = m
        shutil.rmtree(work / "fixed", ignore_errors=True)
        t = time.perf_counter()
        prepare(small, work / "fixed", shard_size=args.shard_size, resize=resize, quiet=True)
        t_fixed = time.perf_counter() - t
        marginal = (n - 100) / max(t_ray - t_fixed, 1e-9)
        print(f"  steady state: a 100-image prep takes {t_fixed:.1f} s (fixed cost); marginal Ray rate "
              f"(N-100)/(T_N - T_100) = {marginal:.1f} img/s = {marginal / (n / t_base):.2f}x the single-process loop")
        print(f"prep [{label}]: single-process PIL {n / t_base:.1f} img/s ({t_base:.1f} s wall, {n / c_base:.1f} "
              f"img per CPU-s) | Ray Data on {args.cpus} CPUs {n / t_ray:.1f} img/s ({t_ray:.1f} s wall, "
              f"{c_ray:.1f} CPU-s in driver + Ray processes = {n / c_ray:.1f} img per CPU-s) | "
              f"speedup {t_base / t_ray:.2f}x wall; CPU cost of Ray vs the loop {c_ray / c_base:.2f}x")

    shards = str(work / "ray_None")
    from sftok_platform.data import load_manifest
    first = load_manifest(shards)["splits"]["train"]["shards"][0]["file"]
    rows = pq.read_table(f"{shards}/{first}", columns=["image_bytes"]).column("image_bytes").to_pylist()[: args.reader_images]
    rng = np.random.default_rng(0)
    t, c = time.perf_counter(), time.process_time()
    for data in rows:
        to_chw_float([train_transform(data, 256, rng)])
    single, single_cpu = len(rows) / (time.perf_counter() - t), len(rows) / (time.process_time() - c)
    print(f"reader single-process (decode 500x375 JPEG + resize 256 + crop + flip -> float32 [3,256,256]): "
          f"{single:.1f} img/s ({single_cpu:.1f} img per CPU-s)")
    # the training ingest: float32 [0,1] through the object store (before) vs uint8, converted to float32
    # by the consumer (iter_train_batches, what the training loop uses since the uint8 change)
    for dtype in ("float32", "uint8", "float32", "uint8"):          # twice, interleaved: drift shows
        ds = read_split(shards, "train", train=True, seed=0, image_dtype=dtype)   # whole split: no half-used blocks
        t, c, n = time.perf_counter(), ray_cpu_seconds(), 0
        for batch in iter_train_batches(ds, 32, epoch=0, device="cpu", drop_last=False):
            assert batch["image"].dtype == torch.float32
            if n == 0:
                t_first, n_first = time.perf_counter(), len(batch["label"])
            n += len(batch["label"])
        t_end = time.perf_counter()
        t_read, c_read = t_end - t, ray_cpu_seconds() - c
        steady = (n - n_first) / max(t_end - t_first, 1e-9)
        print(f"reader read_split(image_dtype={dtype}) + iter_train_batches on {args.cpus} CPUs: "
              f"{n / t_read:.1f} img/s over {n} images ({t_read:.1f} s wall incl. {t_first - t:.1f} s to the "
              f"first batch; {steady:.1f} img/s after it; {n / c_read:.1f} img per CPU-s; "
              f"{3 * 256 * 256 * (4 if dtype == 'float32' else 1) / 1e3:.0f} KB per image through the object store)")
    print(f"load after: {os.getloadavg()}")
    ray.shutdown()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
