"""Command line: ``python -m sftok_platform.data {prepare,inspect,proxy-codes} ...``."""
from __future__ import annotations

import argparse
import json
import sys

from .manifest import DataError, file_sha256, join, load_manifest, read_manifest, summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sftok_platform.data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="image folder (or --synthetic N) -> Parquet shards + manifest.json")
    src = prep.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", help="ImageNet root (train/, val/), a class-folder dir, or a folder of images")
    src.add_argument("--synthetic", type=int, metavar="N", help="make the built-in data set with N train images")
    prep.add_argument("--out", required=True, help="output shards directory (local or NFS)")
    prep.add_argument("--synthetic-val", type=int, default=None, metavar="M", help="val images (default N/10)")
    prep.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    prep.add_argument("--resize", type=int, default=None, metavar="S",
                      help="store images re-encoded (JPEG q95) with the shorter side at most S (e.g. 288)")
    prep.add_argument("--shard-size", type=int, default=None, help="images per shard (default: ~160 MB shards)")
    prep.add_argument("--min-size", type=int, default=16, help="skip images with a shorter side below this")
    prep.add_argument("--max-pixels", type=int, default=100_000_000, help="skip images with more pixels")
    prep.add_argument("--val-labels", help="labels for a flat val/ folder (LOC_val_solution.csv or "
                                           "'<file> <wnid|int>' lines)")
    prep.add_argument("--class-names", help="'<wnid> <name>' lines (LOC_synset_mapping.txt, synset_words.txt)")
    prep.add_argument("--unlabeled", action="store_true", help="ignore folders as classes (label -1)")
    prep.add_argument("--val-fraction", type=float, default=0.0,
                      help="hold out this fraction of a single-split source as 'val' (by path hash)")
    prep.add_argument("--wave-images", type=int, default=None, help="at most this many files per Ray Data pipeline (default: all pending shards in one)")
    prep.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local one)")
    prep.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    prep.add_argument("--quiet", action="store_true")

    ins = sub.add_parser("inspect", help="counts, classes and skipped files of a shards directory")
    ins.add_argument("shards")
    ins.add_argument("--json", action="store_true", help="print the whole manifest")
    ins.add_argument("--verify", action="store_true", help="recompute every shard's sha256")

    proxy = sub.add_parser("proxy-codes", help="add teacher proxy codes (center crop) to every shard")
    proxy.add_argument("shards")
    proxy.add_argument("--teacher", required=True, help="maskgit-vqgan-imagenet-f16-256.bin (HF fun-research/TiTok)")
    proxy.add_argument("--hidden-channels", type=int, default=128)
    proxy.add_argument("--batch-size", type=int, default=64)
    proxy.add_argument("--actors", type=int, default=None, help="encoder actors (default: one per GPU, else 1)")
    proxy.add_argument("--address", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            from .prepare import prepare, prepare_synthetic
            common = dict(wave_images=args.wave_images, quiet=args.quiet, address=args.address, num_cpus=args.num_cpus)
            if args.synthetic is not None:
                shard_size = {"shard_size": args.shard_size} if args.shard_size is not None else {}
                m = prepare_synthetic(args.out, args.synthetic, num_val=args.synthetic_val, seed=args.seed,
                                      **shard_size, **common)
            else:
                m = prepare(args.source, args.out, resize=args.resize, shard_size=args.shard_size,
                            min_size=args.min_size, max_pixels=args.max_pixels, val_labels=args.val_labels,
                            class_names=args.class_names, unlabeled=args.unlabeled,
                            val_fraction=args.val_fraction, **common)
            print(summary(m))
        elif args.command == "inspect":
            m = read_manifest(args.shards)
            if m is None:
                load_manifest(args.shards)   # raises the helpful "run prepare" error
            print(json.dumps(m, indent=1) if args.json else summary(m))
            if args.verify:
                bad = [s["file"] for split in m["splits"].values() for s in split["shards"]
                       if file_sha256(join(args.shards, s["file"])) != s["sha256"]]
                print(f"verify: {'all shards match their sha256' if not bad else f'{len(bad)} mismatched: {bad[:5]}'}")
                return 1 if bad else 0
            if not m.get("complete"):
                print("INCOMPLETE: rerun the same prepare command to finish it.")
                return 1
        elif args.command == "proxy-codes":
            from .proxy_codes import add_proxy_codes
            add_proxy_codes(args.shards, args.teacher, hidden_channels=args.hidden_channels,
                            batch_size=args.batch_size, actors=args.actors, address=args.address)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
