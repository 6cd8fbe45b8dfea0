"""Check one encoded image file and turn it into something every reader can decode as 8-bit RGB.

Pure PIL + numpy (no Ray), so the rules are unit-testable and the same in the Ray Data pipeline and the
single-process benchmark baseline. Every file ends in exactly one of three states:

* kept: an 8-bit RGB JPEG or PNG is stored byte for byte (no generation loss, no wasted CPU);
* converted: anything else that decodes (grayscale, CMYK, palette, alpha, 16-bit, BMP/TIFF/WebP/GIF, or any
  image when ``resize`` is set) is re-encoded as RGB, and the reason is recorded;
* skipped: empty, not an image, corrupt or truncated, too small or too large, with the reason.

A full decode (``Image.load``) is what catches truncated JPEGs; ``Image.verify`` alone does not.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# We enforce our own pixel limit before decoding (see ``check_image``); PIL's bomb check would raise on
# the very files we want to skip with a readable reason.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

JPEG_QUALITY = 95


@dataclass(frozen=True)
class CheckOptions:
    """Prep options that decide what a file becomes (recorded in the manifest)."""
    resize: int | None = None        # shorter side to this (bicubic, antialias) when larger; re-encode JPEG
    min_size: int = 16               # shorter side below this: skipped
    max_pixels: int = 100_000_000    # width*height above this: skipped before decoding (decompression bombs)


@dataclass
class Checked:
    data: bytes          # encoded RGB image to store (b"" when skipped)
    width: int
    height: int
    skip_reason: str = ""   # non-empty: the file is not stored
    note: str = ""          # non-empty: the file was converted (why)


def _skip(reason: str) -> Checked:
    return Checked(b"", 0, 0, skip_reason=reason)


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str]:
    """Any PIL mode -> 8-bit RGB, plus a note saying what was done ("" when already RGB)."""
    mode = img.mode
    if mode == "RGB":
        return img, ""
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), f"{mode} with alpha composited on white"
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0                       # 0..65535 -> 0..255
        elif arr.max(initial=0) > 255:              # 32-bit int / float: scale the used range
            lo, hi = arr.min(), arr.max()
            arr = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB"), f"{mode} (high bit depth) -> 8-bit RGB"
    names = {"L": "grayscale", "1": "bilevel", "CMYK": "CMYK", "P": "palette", "YCbCr": "YCbCr"}
    return img.convert("RGB"), f"{names.get(mode, mode)} -> RGB"


def _is_16bit_png(img: Image.Image) -> bool:
    return any("16" in str(t[-1]) for t in getattr(img, "tile", []) or [])


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` with bicubic (antialiased in PIL), long side as torchvision computes it."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BICUBIC)


def check_image(data: bytes, opts: CheckOptions = CheckOptions()) -> Checked:
    """Validate ``data`` (an encoded file) and return what to store. Never raises on bad input."""
    if len(data) == 0:
        return _skip("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return _skip("not an image (unrecognised format)")
    except Exception as e:  # noqa: BLE001 - any parser error means "not an image we can use"
        return _skip(f"not an image ({type(e).__name__}: {e})")
    fmt, (w, h) = img.format, img.size
    if w * h > opts.max_pixels:
        return _skip(f"too large ({w}x{h} = {w * h} pixels > max_pixels {opts.max_pixels})")
    if min(w, h) < opts.min_size:
        return _skip(f"too small ({w}x{h}, shorter side < min_size {opts.min_size})")
    sixteen_bit = fmt == "PNG" and _is_16bit_png(img)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data raises OSError, SyntaxError, ValueError...
        return _skip(f"corrupt image ({type(e).__name__}: {e})")

    rgb, note = _to_rgb(img)
    if sixteen_bit and not note:
        note = "16-bit PNG -> 8-bit RGB"
    keep = not note and opts.resize is None and fmt in ("JPEG", "PNG")
    if keep:
        return Checked(data, w, h)
    if fmt not in ("JPEG", "PNG") and not note:
        note = f"{fmt} -> {'JPEG' if opts.resize else 'PNG'}"
    if opts.resize is not None:
        rgb = resize_shorter_side(rgb, opts.resize) if min(rgb.size) > opts.resize else rgb
    # Lossy sources stay lossy (JPEG q95); lossless sources stay lossless unless --resize asks for size.
    as_jpeg = fmt == "JPEG" or opts.resize is not None
    buf = io.BytesIO()
    if as_jpeg:
        rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        rgb.save(buf, format="PNG", compress_level=1)
    return Checked(buf.getvalue(), rgb.size[0], rgb.size[1], note=note)
