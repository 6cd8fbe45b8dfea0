"""Where a pipeline run keeps its files, and the safe formats of training state and stage exports.

Layout of one run (``<run.root>/<run.name>/``)::

    config.yaml                     resolved config of the latest launch
    ray/<run>-<stage>/step_*/       Ray Train checkpoints (RunConfig(storage_path=<run>/ray)), state.pt
    stages/<stage>/export/          final EMA weights for the next stage (model.safetensors + config.json,
                                    or teacher.safetensors for stage 0)
    stages/<stage>/done.json        marker: the stage finished; a rerun skips it
    stages/<stage>/journal.jsonl    one line per optimiser step and per (re)start, written by rank 0

Training state (``state.pt``) is a dict of tensors, numbers and strings saved with ``torch.save`` and read
back with ``weights_only=True``: model, EMA, optimizer, grad scaler, discriminator + its optimizer, the step,
every rank's RNG states and the resolved config (YAML text). Nothing is unpickled beyond plain data.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

STATE_FILE = "state.pt"
TEACHER_FILE = "teacher.safetensors"
TEACHER_CONFIG = "teacher.json"


# ######################################################################################################
# Run layout
# ######################################################################################################

@dataclass(frozen=True)
class StagePaths:
    run_dir: Path
    stage: str

    @property
    def dir(self) -> Path:
        return self.run_dir / "stages" / self.stage

    @property
    def export(self) -> Path:
        return self.dir / "export"

    @property
    def done(self) -> Path:
        return self.dir / "done.json"

    @property
    def journal(self) -> Path:
        return self.dir / "journal.jsonl"

    @property
    def images(self) -> Path:
        return self.dir / "images"


def storage_path(run_dir: Path) -> Path:
    """``RunConfig(storage_path=...)`` of every stage of this run."""
    return Path(run_dir) / "ray"


def ray_run_name(run_name: str, stage: str) -> str:
    """Deterministic Ray Train run name: the same name resumes (PLATFORM.md P4), so never a timestamp."""
    return f"{run_name}-{stage}"


def is_done(paths: StagePaths) -> bool:
    return paths.done.is_file() and paths.export.is_dir()


def read_done(paths: StagePaths) -> dict:
    return json.loads(paths.done.read_text())


def write_json_atomic(path: Path, obj: Any, **dump_kwargs: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temp file and ``os.replace``: a kill leaves the old file
    or the new one, never half of one (a stage's ``done.json``, a sweep trial's ``trial.json``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, **dump_kwargs))
    os.replace(tmp, path)


def mark_done(paths: StagePaths, info: dict) -> None:
    write_json_atomic(paths.done, {"finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), **info}, indent=2,
                      default=str)


def journal(paths: StagePaths, **entry: Any) -> None:
    paths.dir.mkdir(parents=True, exist_ok=True)
    with paths.journal.open("a") as f:
        f.write(json.dumps(entry, default=float) + "\n")


class StepJournal:
    """Per-step journal entries (step, loss, time) held in memory and appended to ``journal.jsonl`` in one
    write on ``flush()``: the loop flushes on log and checkpoint steps and when it stops (also on an
    exception), so rank 0 does no file append on shared storage, and no device-to-host copy of the loss,
    on the other steps. A killed process loses the entries since the last flush, which are also the steps
    its restart replays from the last checkpoint."""

    def __init__(self, paths: StagePaths):
        self.paths, self.pending = paths, []

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss.detach(), round(time.time(), 3)))

    def flush(self) -> None:
        if not self.pending:
            return
        losses = torch.stack([loss.float().reshape(()) for _, loss, _ in self.pending]).cpu().tolist()
        self.paths.dir.mkdir(parents=True, exist_ok=True)
        with self.paths.journal.open("a") as f:
            f.write("".join(json.dumps({"step": step, "loss": value, "t": t}) + "\n"
                            for (step, _, t), value in zip(self.pending, losses)))
        self.pending = []


def nonfinite_tensors(state: dict, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors holding NaN or inf in a (nested) state dict."""
    bad = []
    for k, v in state.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            bad += nonfinite_tensors(v, name + ".")
        elif torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad.append(name)
    return bad


def read_journal(paths: StagePaths) -> list[dict]:
    if not paths.journal.is_file():
        return []
    return [json.loads(line) for line in paths.journal.read_text().splitlines() if line.strip()]


# ######################################################################################################
# RNG states (as tensors, so they survive weights_only loading)
# ######################################################################################################

def capture_rng() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ######################################################################################################
# Training state
# ######################################################################################################

def save_state(directory: str | os.PathLike, state: dict) -> Path:
    """Write ``state.pt`` atomically into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)
    return directory / STATE_FILE


def load_state(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read ``state.pt`` with ``weights_only=True`` (tensors and plain containers only)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a training checkpoint of this project.")
    return torch.load(path, map_location=map_location, weights_only=True)


def optimizer_parts(optimizer_state: dict) -> list[dict]:
    """The torch optimizer state dicts inside a saved optimizer state: itself, or the Muon and AdamW halves
    of a ``MuonWithAdamW`` state (``{"muon": ..., "adamw": ...}``)."""
    return [optimizer_state] if "state" in optimizer_state else list(optimizer_state.values())


def optimizer_fingerprint(optimizer_state: dict) -> float:
    """A number that changes with any optimizer moment: the sum of |exp_avg| + |exp_avg_sq| (AdamW) and
    |momentum_buffer| (Muon) over all params. A Muon+AdamW state (``{"muon": ..., "adamw": ...}``) sums both.

    Used by the journal to show that a resumed stage continued with the very optimizer state it saved.
    """
    total = 0.0
    for part in optimizer_parts(optimizer_state):
        for s in part["state"].values():
            for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                if key in s:
                    total += float(s[key].double().abs().sum())
    return total


# ######################################################################################################
# Stage exports (what the next stage loads)
# ######################################################################################################

def save_teacher(teacher: torch.nn.Module, directory: str | os.PathLike, *, hidden_channels: int,
                 codebook_size: int, z_channels: int, arch=None) -> Path:
    """Stage-0 export: ``teacher.safetensors`` (official MaskGIT-VQGAN keys) + ``teacher.json`` (the sizes and
    the :class:`sftok.maskgit_vqgan.VQGANArch` layout, so ``sftok evaluate --teacher DIR`` rebuilds it).
    ``arch`` defaults to the teacher's own (``MaskGITVQGAN.arch``)."""
    from sftok.maskgit_vqgan import OFFICIAL_ARCH
    arch = arch or getattr(teacher, "arch", OFFICIAL_ARCH)
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in teacher.state_dict().items()}
    save_file(sd, str(directory / TEACHER_FILE), metadata={"format": "maskgit-vqgan"})
    (directory / TEACHER_CONFIG).write_text(json.dumps(
        {"hidden_channels": hidden_channels, "codebook_size": codebook_size, "z_channels": z_channels,
         "arch": arch.to_dict()}, indent=2))
    return directory / TEACHER_FILE


def teacher_file(export_dir: str | os.PathLike) -> Path:
    return Path(export_dir) / TEACHER_FILE


def load_teacher_export(path: str | os.PathLike, cfg, device: str | torch.device = "cpu"):
    """A frozen teacher from a stage-0 export dir or the official weights file (``teacher.weights``)."""
    from sftok.maskgit_vqgan import load_teacher
    path = Path(path)
    if path.is_dir():
        path = path / TEACHER_FILE
    t = cfg.teacher
    teacher = load_teacher(path, hidden_channels=t.hidden_channels, codebook_size=t.codebook_size,
                           z_channels=t.z_channels, arch=cfg.teacher_arch())
    return teacher.to(device).eval().requires_grad_(False)


def load_teacher_dir(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """A frozen teacher from a stage-0 export dir alone: its ``teacher.json`` holds the sizes and layout."""
    from sftok.maskgit_vqgan import load_teacher
    directory = Path(directory)
    meta = json.loads((directory / TEACHER_CONFIG).read_text())
    return load_teacher(directory / TEACHER_FILE, **meta).to(device).eval().requires_grad_(False)


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    import shutil
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def latest_checkpoint_dir(ray_run_dir: str | os.PathLike) -> Optional[Path]:
    """The newest ``step_*`` directory of a Ray Train run dir (for inspection and tests)."""
    steps = sorted(Path(ray_run_dir).glob("step_*"))
    return steps[-1] if steps else None


def recorded_checkpoint_steps(ray_run_dir: str | os.PathLike) -> list[int]:
    """Steps of the checkpoints Ray Train has *recorded* for a run (its ``checkpoint_manager_snapshot.json``):
    the ones a restart resumes from. A ``step_*`` directory appears earlier, while the report is still being
    persisted; a run stopped in between restarts from the previous recorded step. Empty while the snapshot is
    missing or being written."""
    snapshot = Path(ray_run_dir) / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []
    return sorted(int(r["checkpoint_dir_name"].rsplit("_", 1)[1]) for r in results)


__all__ = ["StagePaths", "storage_path", "ray_run_name", "is_done", "read_done", "mark_done", "journal",
           "read_journal", "capture_rng", "restore_rng", "save_state", "load_state", "optimizer_parts",
           "optimizer_fingerprint", "save_teacher", "teacher_file", "load_teacher_export", "copy_tree", "latest_checkpoint_dir",
           "recorded_checkpoint_steps", "STATE_FILE"]
