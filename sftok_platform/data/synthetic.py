"""The built-in data set: seeded 256x256 images in 10 classes with real structure.

It exists so that the default pipeline and the tests run offline, and so that a tokenizer trained on it
has something learnable: edges and flat regions (shapes), periodic patterns (stripes, checkers, rings),
smooth fields (gradients, blobs), fine detail (text, dots). Every image is a pure function of
``(seed, split, index)``, so any shard can be regenerated independently and reruns are bit-identical.
Labels cycle through the classes (``index % 10``), so every split is balanced.
"""
from __future__ import annotations

import io
import string

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CLASSES = ("disks", "rectangles", "triangles", "stripes", "checkers", "gradients", "rings", "blobs",
           "text", "dots")
SPLIT_IDS = {"train": 0, "val": 1}
JPEG_QUALITY = 95


def _color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return x, y


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a + (b - a) * t[..., None]


def _background(rng, size):
    x, y = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.float32(np.cos(angle)) * x + np.float32(np.sin(angle)) * y
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    return _mix(_color(rng), _color(rng), t * np.float32(rng.uniform(0.2, 0.6)))


def _shapes(rng, size, kind):
    img = Image.fromarray(_background(rng, size).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, 5)):
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        r = rng.uniform(0.08, 0.3) * size
        fill = tuple(int(c) for c in _color(rng))
        if kind == "disks":
            ry = r * rng.uniform(0.6, 1.0)
            draw.ellipse([cx - r, cy - ry, cx + r, cy + ry], fill=fill)
        elif kind == "rectangles":
            rw, rh = r, r * rng.uniform(0.4, 1.2)
            draw.rectangle([cx - rw, cy - rh, cx + rw, cy + rh], fill=fill)
        else:
            angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, 3)
            draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=fill)
    return np.asarray(img, dtype=np.float32)


def _stripes(rng, size):
    x, y = _grid(size)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 16)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * x + np.sin(angle) * y) + rng.uniform(0, 6.3))
    if rng.random() < 0.5:
        t = (t > 0.5).astype(np.float32)
    return _mix(_color(rng), _color(rng), t)


def _checkers(rng, size):
    x, y = _grid(size)
    angle, cells = rng.uniform(0, np.pi / 2), rng.integers(3, 12)
    u, v = np.cos(angle) * x - np.sin(angle) * y, np.sin(angle) * x + np.cos(angle) * y
    t = ((np.floor(u * cells) + np.floor(v * cells)) % 2).astype(np.float32)
    return _mix(_color(rng), _color(rng), t)


def _gradients(rng, size):
    x, y = _grid(size)
    corners = [_color(rng) for _ in range(4)]
    top = _mix(corners[0], corners[1], x)
    bottom = _mix(corners[2], corners[3], x)
    return top * (1 - y[..., None]) + bottom * y[..., None]


def _rings(rng, size):
    x, y = _grid(size)
    cx, cy = rng.uniform(0.2, 0.8, 2)
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    t = 0.5 + 0.5 * np.cos(2 * np.pi * rng.uniform(4, 14) * r)
    return _mix(_color(rng), _color(rng), t)


def _blobs(rng, size):
    cells = int(rng.integers(3, 9))
    low = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.float32)


def _text(rng, size):
    bg, fg = _color(rng), _color(rng)
    if np.abs(bg - fg).sum() < 150:
        fg = 255 - bg
    img = Image.new("RGB", (size, size), tuple(int(c) for c in bg))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(rng.integers(size // 12, size // 5)))
    y = rng.uniform(0, 0.1) * size
    while y < size:
        word = "".join(rng.choice(list(string.ascii_letters + string.digits), rng.integers(3, 9)))
        draw.text((rng.uniform(-0.1, 0.4) * size, y), word, fill=tuple(int(c) for c in fg), font=font)
        y += font.size * rng.uniform(1.1, 1.6)
    return np.asarray(img, dtype=np.float32)


def _dots(rng, size):
    x, y = _grid(size)
    n, radius = rng.integers(4, 12), rng.uniform(0.15, 0.4)
    fx, fy = (x * n + rng.uniform(0, 1)) % 1 - 0.5, (y * n + rng.uniform(0, 1)) % 1 - 0.5
    t = (np.sqrt(fx ** 2 + fy ** 2) < radius).astype(np.float32)
    return _mix(_color(rng), _color(rng), t)


def render(index: int, *, seed: int = 0, split: str = "train", size: int = 256) -> tuple[np.ndarray, int]:
    """Image ``index`` of ``split`` as uint8 [size, size, 3] and its label."""
    label = index % len(CLASSES)
    rng = np.random.default_rng([seed, SPLIT_IDS.get(split, 2), index])
    kind = CLASSES[label]
    if kind in ("disks", "rectangles", "triangles"):
        img = _shapes(rng, size, kind)
    else:
        img = {"stripes": _stripes, "checkers": _checkers, "gradients": _gradients, "rings": _rings,
               "blobs": _blobs, "text": _text, "dots": _dots}[kind](rng, size)
    # Mild sensor noise: no two images identical, no flat areas that compress to nothing.
    img = img + rng.random(img.shape, dtype=np.float32) * 10.0
    return np.clip(img - 4.5, 0, 255).astype(np.uint8), label


def render_jpeg(index: int, *, seed: int = 0, split: str = "train", size: int = 256) -> tuple[bytes, int]:
    arr, label = render(index, seed=seed, split=split, size=size)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), label


def relpath(split: str, index: int) -> str:
    """Row id of a synthetic image (looks like an ImageNet path: ``train/<class>/<index>.jpg``)."""
    return f"{split}/{CLASSES[index % len(CLASSES)]}/{index:08d}.jpg"


def parse_relpath(relpath: str) -> tuple[str, int]:
    """The (split, index) that :func:`relpath` encoded."""
    split, _, name = relpath.split("/")
    return split, int(name.split(".")[0])


def classes() -> list[dict]:
    return [{"index": i, "wnid": name, "name": name} for i, name in enumerate(CLASSES)]
