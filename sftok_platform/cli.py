"""``sftok``: the command-line tool for a trained tokenizer.

    sftok tokenize a.jpg b.png --checkpoint CKPT [-o tokens.json]     # 64 token ids per image
    sftok reconstruct photo.jpg --checkpoint CKPT --steps 8 -o recon.png   # original | reconstruction
    sftok info CKPT                                                      # layout, sizes, params, stage

CKPT is this project's checkpoint directory (``model.safetensors`` + ``config.json``) or an official one
(``pytorch_model.bin``, or the Hugging Face ``model.safetensors`` + official ``config.json``). Images go
through the evaluation transform (shorter side to the model's size, bicubic + antialias, center crop).
Each image is encoded on its own, so its tokens never depend on the other images given (the official
Sinkhorn assignment couples the images of a batch).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
import torch


# ######################################################################################################
# helpers
# ######################################################################################################

def _device(name: Optional[str]) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """An image file -> float [1,3,size,size] in [0,1] through the evaluation transform (SPEC E)."""
    from sftok_platform.data.transforms import eval_transform, to_chw_float
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {str(p)!r} does not exist.")
    try:
        arr = eval_transform(p.read_bytes(), size)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for unreadable files
        raise ValueError(f"could not read image {str(p)!r} ({type(e).__name__}: {e}).") from None
    return torch.from_numpy(to_chw_float([arr]))


def _load(checkpoint: str, device: torch.device):
    from sftok.checkpoint import load_model
    return load_model(checkpoint).to(device).eval()


# ######################################################################################################
# tokenize / reconstruct
# ######################################################################################################

def cmd_tokenize(args) -> int:
    device = _device(args.device)
    model = _load(args.checkpoint, device)
    tokens = OrderedDict()
    for path in args.images:
        img = load_image(path, model.cfg.image_size).to(device)
        tokens[str(path)] = model.encode(img)[0].tolist()
    doc = {"checkpoint": str(args.checkpoint), "num_tokens": model.cfg.num_latent_tokens,
           "codebook_size": model.cfg.codebook_size, "tokens": tokens}
    text = json.dumps(doc, indent=1)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"wrote tokens of {len(tokens)} image(s) to {args.output}")
    else:
        print(text)
    return 0


def cmd_reconstruct(args) -> int:
    from PIL import Image

    from sftok.metrics import psnr, ssim, to_uint8
    from sftok_platform.evaluate import _load_teacher

    device = _device(args.device)
    model = _load(args.checkpoint, device)
    teacher = None
    if not model.cfg.pixel_head:
        if not args.teacher:
            print("error: this checkpoint has no pixel head (stage 1/2); pass --teacher <MaskGIT-VQGAN weights or "
                  "stage-0 export dir> to decode its hard ids.", file=sys.stderr)
            return 2
        teacher = _load_teacher(args.teacher, args.teacher_hidden_channels).to(device)
    img = load_image(args.image, model.cfg.image_size).to(device)
    tokens = model.encode(img)
    g = torch.Generator(device=device).manual_seed(args.seed)
    recon = model.decode_tokens(tokens, num_steps=args.steps, temperature=args.temperature, generator=g,
                                teacher=teacher)
    recon_u8, orig_u8 = to_uint8(recon), to_uint8(img)
    pair = torch.cat([orig_u8, recon_u8], dim=3)[0].permute(1, 2, 0).cpu().numpy()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(pair)).save(out)
    r = recon_u8.float() / 255
    print(f"wrote {out} (original | reconstruction, {args.steps} steps): PSNR {psnr(r, img).item():.2f} dB, "
          f"SSIM {ssim(r, img).item():.4f}; tokens {tokens[0].tolist()}")
    return 0


# ######################################################################################################
# info
# ######################################################################################################

def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("model.safetensors", "pytorch_model.bin", "teacher.safetensors"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{str(path)!r} has no model.safetensors, pytorch_model.bin or teacher.safetensors.")


def tensor_shapes(path: str | Path) -> "OrderedDict[str, tuple[tuple[int, ...], str]]":
    """``{key: (shape, dtype)}`` of a weights file without materialising it (safetensors header / mmap)."""
    path = Path(path)
    out: OrderedDict = OrderedDict()
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
        return out
    from sftok.weights import read_state_dict
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    except Exception:  # noqa: BLE001 - old (non-zip) torch files cannot be mmapped
        state = read_state_dict(path)
    for k, v in state.items():
        if torch.is_tensor(v):
            out[k] = (tuple(v.shape), str(v.dtype).replace("torch.", ""))
    return out


def describe_checkpoint(checkpoint: str | Path) -> dict:
    """What ``sftok info`` prints, as a dict: format, file, layout, stage, architecture, parameter counts."""
    from sftok.checkpoint import (
        CONFIG_FILE, infer_model_config, normalize_official_keys, read_config_file, read_model_config,
    )
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    wfile = _weights_file(path)
    shapes = tensor_shapes(wfile)
    meta = {k: torch.empty(s, device="meta") for k, (s, _) in shapes.items()}
    meta = normalize_official_keys(meta)
    cfg_file = wfile.parent / CONFIG_FILE
    cfg_data = read_config_file(cfg_file) if cfg_file.is_file() else None
    counts: OrderedDict = OrderedDict()
    for k, (s, dtype) in shapes.items():   # parameters = floating-point tensors (not int buffers)
        if "int" in dtype.lower() or dtype.upper() in ("I64", "I32", "BOOL"):
            continue
        top = k.split(".")[0]
        counts[top] = counts.get(top, 0) + int(np.prod(s, dtype=np.int64))
    info = {"path": str(path), "weights_file": str(wfile), "file_mb": round(wfile.stat().st_size / 2 ** 20, 1),
            "num_tensors": len(shapes), "dtypes": sorted({d for _, d in shapes.values()}),
            "params_total": int(sum(counts.values())), "params_by_module": dict(counts)}
    if "latent_tokens" not in meta:
        if {"encoder.conv_in.weight", "quantize.embedding.weight"} <= set(meta):
            info.update(format="MaskGIT-VQGAN teacher", layout="teacher (encoder/decoder/quantize)",
                        stage="teacher (stage 0 export or official maskgit-vqgan .bin)",
                        teacher_hidden_channels=int(meta["decoder.conv_out.weight"].shape[1]),
                        teacher_codebook_size=int(meta["quantize.embedding.weight"].shape[0]))
            return info
        raise ValueError(f"{wfile} is neither an SFTok nor a MaskGIT-VQGAN checkpoint (keys: "
                         f"{list(shapes)[:5]} ...).")
    if cfg_data is not None and cfg_data.get("format") == "sftok":
        cfg, fmt = read_model_config(wfile.parent), "sftok (model.safetensors + config.json)"
    else:
        cfg = infer_model_config(meta)
        fmt = (f"official key layout ({wfile.name}"
               + (" + official config.json)" if cfg_data is not None else "; architecture read off the shapes)"))
    import dataclasses
    info.update(format=fmt, model=dataclasses.asdict(cfg),
                layout="stage-3 / inference (pixel head)" if cfg.pixel_head else "stage 1/2 (no pixel head)",
                stage="stage3" if cfg.pixel_head else "stage1/2 (decode through the MaskGIT-VQGAN teacher)",
                params_tokenizer=int(sum(v for k, v in counts.items() if not k.startswith("pixel_"))))
    return info


def cmd_info(args) -> int:
    info = describe_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"checkpoint : {info['path']}")
    print(f"format     : {info['format']}")
    print(f"weights    : {info['weights_file']} ({info['file_mb']} MB, {info['num_tensors']} tensors, "
          f"{'/'.join(info['dtypes'])})")
    print(f"layout     : {info['layout']}")
    print(f"stage      : {info['stage']}")
    m = info.get("model")
    if m:
        print(f"encoder    : {m['encoder_size']}  decoder: {m['decoder_size']}  image {m['image_size']}px, patch "
              f"{m['patch_size']}")
        print(f"tokens     : {m['num_latent_tokens']} x codebook {m['codebook_size']} (dim {m['token_size']}); "
              f"proxy codes {m['num_proxy_codes']} x {m['teacher_codebook_size']}")
        if m["pixel_head"]:
            print(f"pixel head : MaskGIT-VQGAN decoder, hidden {m['pixel_hidden_channels']}")
    print(f"parameters : {info['params_total']:,} total" +
          (f" ({info['params_tokenizer']:,} without the pixel head)" if "params_tokenizer" in info else ""))
    for k, v in info["params_by_module"].items():
        print(f"  {k:<16} {v:>14,}")
    return 0


# ######################################################################################################
# entry point
# ######################################################################################################

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sftok", description="SFTok tokenizer tool: tokenize, reconstruct, info.",
                                epilog="CKPT: this project's checkpoint dir or an official checkpoint.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("tokenize", help="images -> 64 token ids each (JSON)")
    t.add_argument("images", nargs="+")
    t.add_argument("--checkpoint", required=True)
    t.add_argument("-o", "--output", default=None, help="JSON file (default: stdout)")
    t.add_argument("--device", default=None)
    t.set_defaults(fn=cmd_tokenize)

    r = sub.add_parser("reconstruct", help="image -> tokens -> image; saves original | reconstruction")
    r.add_argument("image")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--steps", type=int, default=8, help="decoding steps (default 8)")
    r.add_argument("--temperature", type=float, default=0.0, help="0 = deterministic (official default 1.0)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--teacher", default=None, help="MaskGIT-VQGAN weights/export (stage-1/2 checkpoints)")
    r.add_argument("--teacher-hidden-channels", type=int, default=None)
    r.add_argument("-o", "--output", default="recon.png")
    r.add_argument("--device", default=None)
    r.set_defaults(fn=cmd_reconstruct)

    i = sub.add_parser("info", help="layout, sizes, parameter counts and stage of a checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
