"""Convert checkpoints between the official SFTok layout and this project's format.

    python -m sftok.convert to-sftok    pytorch_model.bin OUT_DIR [--config infer_sftok.yaml]
    python -m sftok.convert to-sftok    HF_DIR            OUT_DIR          # model.safetensors + config.json
    python -m sftok.convert to-official SFTOK_DIR         OUT_DIR [--format bin|safetensors]

``to-sftok`` accepts stage-1/2 files (no ``pixel_*``), stage-3/inference files and the old key
``decoder.embedding_positional_embedding``; without ``--config`` the architecture is read off the weights.
``to-official`` writes ``pytorch_model.bin`` (or the HF ``model.safetensors``) plus an official
``config.json``; the state dict keys and shapes are exactly those the official ``SFTok`` loads strictly.
"""
from __future__ import annotations

import argparse
import sys

from sftok.checkpoint import from_official, load_model, save_model, save_official


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftok.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-sftok", help="official checkpoint -> this project's directory format")
    a.add_argument("src", help="pytorch_model.bin, model.safetensors, or an HF directory")
    a.add_argument("dst", help="output directory (model.safetensors + config.json)")
    a.add_argument("--config", help="official YAML or config.json (default: config.json beside src, "
                                    "else inferred from the weights)")
    b = sub.add_parser("to-official", help="this project's directory -> official layout")
    b.add_argument("src", help="directory written by sftok.save_model")
    b.add_argument("dst", help="output directory")
    b.add_argument("--format", choices=["bin", "safetensors"], default="bin",
                   help="pytorch_model.bin (default) or HF model.safetensors")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "to-sftok":
            model = from_official(args.src, args.config)
            out = save_model(model, args.dst)
        else:
            model = load_model(args.src)
            out = save_official(model, args.dst, args.format)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(t.numel() for t in model.state_dict().values())
    print(f"wrote {out} ({len(model.state_dict())} tensors, {n:,} elements; {model.extra_repr()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
