"""Find the images of a source directory, their split and their label, before any work starts.

Layouts recognised (checked in this order):

* **ImageNet-style**: ``<root>/train/<class>/*`` (e.g. ``train/n01440764/*.JPEG``) and/or ``<root>/val``
  (``val/<class>/*``, or a flat ``val/*`` plus a labels file). Labels files: Kaggle's
  ``LOC_val_solution.csv`` (``ImageId,PredictionString``), or a text file of ``<file name> <wnid|int>``
  lines; given with ``--val-labels`` or found next to ``val/``.
* **Class folders**: ``<root>/<class>/*``: one split ``train`` (``--val-fraction`` holds some out).
* **Unlabeled**: images directly in ``<root>`` (or ``--unlabeled``): label -1 everywhere.

Class index: class folder names sorted (as torchvision's ImageFolder), label = position. Names come from a
``LOC_synset_mapping.txt`` / ``synset_words.txt`` style file (``<wnid> <name>`` lines) when one is given
(``--class-names``) or found in the root; otherwise the folder name is the name.

Every regular file is planned, whatever its extension: non-image files flow through validation and end up
in the manifest's skipped list with a reason, so nothing disappears silently. Unreadable files and broken
links are recorded here, at scan time, with their reason.
"""
from __future__ import annotations

import csv
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import DataError

CLASS_NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "class_names.txt")
VAL_LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt", "val_labels.csv", "val/labels.txt")


@dataclass(frozen=True)
class Entry:
    """One planned file: path relative to the source root (the row id) and its label (-1 = none)."""
    relpath: str
    label: int


@dataclass
class SourcePlan:
    root: str
    layout: str                                   # imagenet | class_folders | unlabeled
    splits: dict[str, list[Entry]]                # sorted by relpath
    classes: list[dict]                           # [{"index", "wnid", "name"}]
    scan_skipped: dict[str, list[dict]] = field(default_factory=dict)   # split -> [{"path", "reason"}]
    notes: list[str] = field(default_factory=list)


def _walk_files(top: Path, root: Path) -> tuple[list[str], list[dict]]:
    """Regular files under ``top`` as paths relative to ``root`` (sorted), plus unusable ones with reasons."""
    files, bad = [], []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if not p.exists():
                bad.append({"path": rel, "reason": "broken symbolic link"})
            elif not os.access(p, os.R_OK):
                bad.append({"path": rel, "reason": "not readable (permission denied)"})
            elif p.is_file():
                files.append(rel)
    return sorted(files), bad


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _top_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if not p.is_dir() and not p.name.startswith("."))


def read_class_names(path: str | os.PathLike) -> dict[str, str]:
    """``<wnid> <name...>`` lines (LOC_synset_mapping.txt / synset_words.txt) -> {wnid: name}."""
    names = {}
    for line in Path(path).read_text().splitlines():
        parts = line.strip().split(None, 1)
        if parts:
            names[parts[0]] = parts[1].strip() if len(parts) > 1 else parts[0]
    return names


def read_val_labels(path: str | os.PathLike, class_to_index: dict[str, int]) -> dict[str, int]:
    """A labels file -> {file stem: label}. Kaggle CSV or ``<file> <wnid|int>`` text lines."""
    path = Path(path)
    text = path.read_text()
    stems: dict[str, int] = {}

    def label_of(token: str) -> int:
        if token in class_to_index:
            return class_to_index[token]
        if token.lstrip("-").isdigit():
            return int(token)
        raise DataError(f"{path}: label {token!r} is neither a known class ({len(class_to_index)} classes, "
                        f"e.g. {next(iter(class_to_index), '?')}) nor an integer; fix the labels file.")

    first = text.split("\n", 1)[0]
    if "ImageId" in first and "PredictionString" in first:   # Kaggle LOC_val_solution.csv
        for row in csv.DictReader(text.splitlines()):
            stems[Path(row["ImageId"]).stem] = label_of(row["PredictionString"].split()[0])
    else:
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.replace(",", " ").split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) < 2:
                raise DataError(f"{path}:{n}: expected '<file name> <wnid or int label>', got {line!r}.")
            stems[Path(parts[0]).stem] = label_of(parts[1])
    if not stems:
        raise DataError(f"{path} holds no labels; expected Kaggle's LOC_val_solution.csv or "
                        f"'<file name> <wnid|int>' lines.")
    return stems


def _held_out(relpath: str, fraction: float) -> bool:
    """Deterministic split by a hash of the path: the same file always lands in the same split."""
    return (zlib.crc32(relpath.encode()) % 100_000) < fraction * 100_000


def scan_source(source: str | os.PathLike, *, val_labels: str | None = None, class_names: str | None = None,
                unlabeled: bool = False, val_fraction: float = 0.0) -> SourcePlan:
    """Plan the rows of ``source``. Raises ``DataError`` for a missing or empty source (before any work)."""
    root = Path(source).expanduser().resolve()
    if not root.exists():
        raise DataError(f"source {source} does not exist; pass --source <dir with images> "
                        f"(or --synthetic N for the built-in data set).")
    if not root.is_dir():
        raise DataError(f"source {source} is not a directory; pass the folder that holds the images.")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1).")

    split_dirs = {name: root / d for name, d in (("train", "train"), ("val", "val"), ("val", "validation"))
                  if (root / d).is_dir()}
    plan = SourcePlan(root=str(root), layout="", splits={}, classes=[])

    def set_classes(folders: list[str]) -> dict[str, int]:
        names_file = class_names or next((str(root / f) for f in CLASS_NAME_FILES if (root / f).is_file()), None)
        names = read_class_names(names_file) if names_file else {}
        if names_file:
            plan.notes.append(f"class names from {names_file}")
        plan.classes = [{"index": i, "wnid": w, "name": names.get(w, w)} for i, w in enumerate(folders)]
        return {w: i for i, w in enumerate(folders)}

    def class_folder_split(split: str, d: Path, c2i: dict[str, int]) -> None:
        entries, skipped = [], []
        for f in _top_files(d):
            skipped.append({"path": f.relative_to(root).as_posix(), "reason": "file outside the class folders"})
        for cls in _subdirs(d):
            files, bad = _walk_files(cls, root)
            skipped += bad
            if cls.name not in c2i:
                skipped += [{"path": f, "reason": f"class folder {cls.name!r} is not in the train classes"}
                            for f in files]
                continue
            entries += [Entry(f, c2i[cls.name]) for f in files]
        plan.splits[split] = sorted(entries, key=lambda e: e.relpath)
        plan.scan_skipped[split] = skipped

    if split_dirs and not unlabeled:
        plan.layout = "imagenet"
        train_dir, val_dir = split_dirs.get("train"), split_dirs.get("val")
        folders = [p.name for p in _subdirs(train_dir or val_dir)]
        c2i = set_classes(folders)
        if train_dir is not None:
            class_folder_split("train", train_dir, c2i)
        if val_dir is not None and _subdirs(val_dir):
            class_folder_split("val", val_dir, c2i)
        elif val_dir is not None:
            labels_file = val_labels or next((str(root / f) for f in VAL_LABEL_FILES if (root / f).is_file()), None)
            files, bad = _walk_files(val_dir, root)
            if labels_file is None:
                plan.notes.append("val: no labels file found (pass --val-labels); val labels are -1")
                plan.splits["val"] = [Entry(f, -1) for f in files]
            else:
                plan.notes.append(f"val labels from {labels_file}")
                stems = read_val_labels(labels_file, c2i)
                plan.splits["val"] = [Entry(f, stems[Path(f).stem]) for f in files if Path(f).stem in stems]
                bad += [{"path": f, "reason": f"no label in {Path(labels_file).name}"}
                        for f in files if Path(f).stem not in stems]
            plan.scan_skipped["val"] = bad
    elif _subdirs(root) and not _top_files(root) and not unlabeled:
        plan.layout = "class_folders"
        c2i = set_classes([p.name for p in _subdirs(root)])
        class_folder_split("train", root, c2i)
    else:
        plan.layout = "unlabeled"
        files, bad = _walk_files(root, root)
        plan.splits["train"] = [Entry(f, -1) for f in files]
        plan.scan_skipped["train"] = bad

    if val_fraction > 0 and "val" not in plan.splits:
        train = plan.splits["train"]
        plan.splits["val"] = [e for e in train if _held_out(e.relpath, val_fraction)]
        plan.splits["train"] = [e for e in train if not _held_out(e.relpath, val_fraction)]
        plan.scan_skipped["val"] = []
        plan.notes.append(f"val: {val_fraction:.1%} of train held out by path hash")

    if sum(len(v) for v in plan.splits.values()) == 0:
        raise DataError(f"source {root} holds no files ({plan.layout} layout); expected train/<class>/*.JPEG, "
                        f"<class>/<images> or a folder of images.")
    return plan
