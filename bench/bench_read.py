"""Reader start-up benchmark: Ray Data's V2 Parquet datasource (Ray 2.60's default) against V1 (what
``sftok_platform.data.reader.read_parquet`` uses), on the same shards in the same Ray session.

    python bench/bench_read.py                      # the no-flag pipeline's synthetic shards (made if missing)
    python bench/bench_read.py --shards DIR --reps 3

For each datasource and repetition, two figures every stage pays: a whole val pass (``read_split(train=False)``,
all rows) and the first batch of a train epoch (``read_split(train=True)``), each a fresh execution as in a
stage. Prints one line per figure and the machine load before and after.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", default=None, help="prepared shards (default: 2048+64 synthetic images at 64 px)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    from ray.data import DataContext

    from sftok_platform.cluster import connect
    from sftok_platform.data import prepare_synthetic, read_split
    connect(None, num_cpus=args.cpus)
    DataContext.get_current().enable_progress_bars = False
    shards = args.shards
    if shards is None:
        shards = str(Path(tempfile.gettempdir()) / "sftok-bench-read-2048+64-64px")
        if not Path(shards, "manifest.json").is_file():
            prepare_synthetic(shards, 2048, num_val=64, image_size=64, quiet=True)
    print(f"shards {shards}; load {os.getloadavg()[0]:.2f}", flush=True)
    for datasource in ("v2", "v1"):
        os.environ["RAY_DATA_USE_DATASOURCE_V2"] = "1" if datasource == "v2" else "0"
        for rep in range(args.reps):
            t = time.perf_counter()
            ds = read_split(shards, "val", train=False, image_size=64, image_dtype="uint8")
            rows = sum(len(b["image"]) for b in ds.iter_batches(batch_size=16))
            val_s = time.perf_counter() - t
            t = time.perf_counter()
            ds = read_split(shards, "train", train=True, image_size=64, image_dtype="uint8", seed=rep)
            batches = iter(ds.iter_batches(batch_size=16))
            next(batches)
            batches.close()               # shut this execution down before the next one starts
            print(f"{datasource} rep {rep}: val pass ({rows} images) {val_s:.2f} s, first train batch "
                  f"{time.perf_counter() - t:.2f} s", flush=True)
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
