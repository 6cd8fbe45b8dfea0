"""``manifest.json``: the single source of truth about a shards directory.

A shards directory holds one sub-folder per split (``train/``, ``val/``) of Parquet shards and a
``manifest.json`` next to them. The manifest says what the shards contain (class index, counts, the files
that were skipped or converted and why), where the data came from (source fingerprint and prep options)
and whether the prep finished (``complete``). Readers trust only shards listed in a complete manifest, so a
half-finished prep can never be trained on by accident.

The manifest is always replaced atomically (write a temp file, fsync, ``os.replace``): a crash leaves
either the old or the new version, never a torn file.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
KIND = "sftok-image-shards"

# Columns of every shard row. ``image_bytes`` keeps the original encoded file (JPEG/PNG) unless the image
# had to be converted or ``--resize`` was asked for; ``path`` is the file's path relative to the source
# root and doubles as the row id.
SHARD_COLUMNS = ("image_bytes", "label", "path", "width", "height")
PROXY_CODES_COLUMN = "proxy_codes"


class DataError(ValueError):
    """A data set that cannot be prepared or read. The message says how to fix it."""


def check_at_least(*options: tuple[str, float | None, float]) -> None:
    """Refuse, before any work, each ``(flag, value, minimum)`` whose value is below its minimum (``None``:
    not given). The data commands call it first, so a zero or negative count never reaches Ray."""
    for flag, value, minimum in options:
        if value is not None and value < minimum:
            raise DataError(f"{flag} {value:g} must be >= {minimum:g}.")


def is_remote(path: str) -> bool:
    return "://" in str(path)


def join(root: str, *parts: str) -> str:
    """Join for local paths and URIs (``s3://bucket/x``) alike."""
    if is_remote(root):
        return posixpath.join(str(root), *parts)
    return os.path.join(str(root), *parts)


def _read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist (local paths or any pyarrow filesystem URI)."""
    if not is_remote(path):
        p = Path(path)
        return p.read_text() if p.is_file() else None
    import pyarrow.fs as pafs
    fs, inner = pafs.FileSystem.from_uri(path)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def read_manifest(shards_dir: str) -> dict[str, Any] | None:
    """The manifest as stored (complete or not), or None when there is none."""
    text = _read_text(join(shards_dir, MANIFEST_NAME))
    if text is None:
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{join(shards_dir, MANIFEST_NAME)} is not valid JSON ({e}); it was not written by "
                        f"this tool or was edited by hand. Delete the directory and prepare it again.") from e
    if manifest.get("kind") != KIND:
        raise DataError(f"{join(shards_dir, MANIFEST_NAME)} is not an SFTok shards manifest "
                        f"(kind={manifest.get('kind')!r}); point at a directory made by "
                        f"`python -m sftok_platform.data prepare`.")
    if manifest.get("schema_version", 0) > SCHEMA_VERSION:
        raise DataError(f"{shards_dir} was written by a newer version (schema {manifest['schema_version']} > "
                        f"{SCHEMA_VERSION}); upgrade this package.")
    return manifest


def load_manifest(shards_dir: str) -> dict[str, Any]:
    """The manifest of a *finished* prep. Raises ``DataError`` (with the command to run) otherwise."""
    shards_dir = str(shards_dir)
    manifest = read_manifest(shards_dir)
    if manifest is None:
        raise DataError(
            f"no {MANIFEST_NAME} in {shards_dir}: run `python -m sftok_platform.data prepare --source "
            f"<images dir> --out {shards_dir}` (or `prepare --synthetic 2000 --out {shards_dir}`) first, "
            f"or set data.path to a prepared shards directory.")
    if not manifest.get("complete"):
        done = sum(len(s["shards"]) for s in manifest["splits"].values())
        planned = sum(s["planned_shards"] for s in manifest["splits"].values())
        raise DataError(f"{shards_dir} holds an unfinished prep ({done}/{planned} shards): rerun the same "
                        f"`python -m sftok_platform.data prepare ... --out {shards_dir}` command to finish it.")
    return manifest


def write_manifest(shards_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Atomically replace ``manifest.json`` (temp file + fsync + rename)."""
    path = Path(shards_dir) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fingerprint(items: Iterable[Any]) -> str:
    """sha256 over a JSON stream of ``items`` (the planned rows of a source): same listing, same hash."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_paths(shards_dir: str, split: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """Absolute paths (or URIs) of the shards of ``split``, in name order."""
    manifest = manifest or load_manifest(shards_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{shards_dir} has no split {split!r}; it has {sorted(manifest['splits'])}.")
    return [join(shards_dir, s["file"]) for s in manifest["splits"][split]["shards"]]


def class_names(manifest: dict[str, Any]) -> list[str]:
    """Class names in label order (``label`` i -> ``class_names(m)[i]``)."""
    return [c["name"] for c in manifest["classes"]]


def summary(manifest: dict[str, Any]) -> str:
    """Human-readable report used by ``python -m sftok_platform.data inspect``."""
    lines = [f"source: {manifest['source'].get('type')} {manifest['source'].get('path', '')}".rstrip(),
             f"fingerprint: {manifest['source']['fingerprint'][:16]}  complete: {manifest.get('complete')}  "
             f"schema: {manifest['schema_version']}",
             f"options: {json.dumps(manifest['options'], sort_keys=True)}",
             f"classes: {len(manifest['classes'])}"
             + (f" ({', '.join(c['name'] for c in manifest['classes'][:10])}"
                f"{', ...' if len(manifest['classes']) > 10 else ''})" if manifest["classes"] else "")]
    for name, split in manifest["splits"].items():
        sizes = [s["bytes"] for s in split["shards"]]
        mb = sum(sizes) / 1e6
        lines.append(f"{name}: {split.get('num_images', sum(s['rows'] for s in split['shards']))} images in "
                     f"{len(split['shards'])}/{split['planned_shards']} shards ({mb:.1f} MB"
                     + (f", {mb / len(sizes):.1f} MB/shard" if sizes else "") + f"), "
                     f"{len(split.get('skipped', []))} skipped, {len(split.get('converted', []))} converted")
        reasons: dict[str, int] = {}
        for s in split.get("skipped", []):
            key = s["reason"].split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        for key, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  skipped {n:>6} x {key}")
        for s in split.get("skipped", [])[:5]:
            lines.append(f"    e.g. {s['path']}: {s['reason']}")
    return "\n".join(lines)
