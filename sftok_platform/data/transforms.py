"""Decode + augment exactly as the official training and evaluation (SPEC C.3 and E).

Train: resize the shorter side to ``size`` (bicubic, antialias), random crop ``size``, random horizontal
flip (p=0.5), values in [0, 1]. Eval: the same resize, then a center crop. This mirrors torchvision's
``Resize(size, BICUBIC, antialias=True) -> RandomCrop(size) -> RandomHorizontalFlip() -> ToTensor()`` on PIL
images (same output-size rounding, same crop offsets), which ``tests/test_data_reader.py`` checks against
torchvision itself.

Randomness is explicit: the caller passes a ``numpy.random.Generator`` per image, so the reader can make
augmentation a pure function of (seed, epoch, row id) and a rerun is reproducible.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .validate import resize_shorter_side

__all__ = ["decode_rgb", "resize_shorter_side", "center_crop", "random_crop_flip", "train_transform",
           "eval_transform", "to_chw_float"]


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB PIL image (shards hold RGB already; ``convert`` is a no-op safety net)."""
    img = Image.open(io.BytesIO(data))
    return img if img.mode == "RGB" else img.convert("RGB")


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``center_crop`` offsets (round half to even of the half-margin)."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def random_crop_flip(img: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """torchvision ``RandomCrop(size)`` + ``RandomHorizontalFlip()`` with an explicit generator."""
    w, h = img.size
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    img = img.crop((left, top, left + size, top + size))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def train_transform(data: bytes, size: int, rng: np.random.Generator) -> np.ndarray:
    """Encoded image -> uint8 [size, size, 3] (SPEC C.3 train transform)."""
    return np.asarray(random_crop_flip(resize_shorter_side(decode_rgb(data), size), size, rng))


def eval_transform(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> uint8 [size, size, 3] (SPEC E eval transform)."""
    return np.asarray(center_crop(resize_shorter_side(decode_rgb(data), size), size))


def to_chw_float(images: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [0, 1] (what ``ToTensor`` gives)."""
    arr = np.stack(images) if isinstance(images, list) else images
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
