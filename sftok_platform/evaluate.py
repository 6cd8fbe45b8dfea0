"""Reconstruction evaluation of a tokenizer checkpoint (SPEC E), batch inference on a Ray Data actor pool.

    python -m sftok_platform.evaluate --checkpoint CKPT --data SHARDS --split val --steps 1,2,4,8 \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth [--teacher PATH] [--out results.json] \\
        [--tracking-uri sqlite:////abs/mlflow.db] [--parent-run-id ID]

The official protocol: resize 256 + center crop (the data reader's eval transform); tokens from the encoder;
for every step count the multi-step decode (stage 3: soft logits -> pixel head; stage 1/2: hard ids -> the
teacher decoder), clamped and rounded to uint8; the FID Inception (``sftok.inception``) on the originals and
the reconstructions; 2048-d features summed in float64; FID(originals, reconstructions) with scipy sqrtm;
Inception Score of the reconstructions; PSNR (RGB and Y), SSIM, LPIPS-VGG per image; codebook usage and
entropy of the tokens.

How the work is split: :class:`BatchEvaluator` (a Ray Data callable class: one model, one Inception, one
GPU per actor) turns a batch of images into per-image features, logits, scalars and tokens;
:class:`EvalAccumulator` on the driver folds those batches into float64 running statistics
(``sftok.metrics``) as they stream in, so no 50k x 2048 matrix is ever held. ``use_ray=False`` runs the same
:class:`BatchEvaluator` in this process over the same Parquet shards (no Ray at all), which the tests use
to check that both paths agree.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from sftok_platform.config import Config, ConfigError
from sftok.inception import NUM_LOGITS, POOL_DIM, RANDOM_WEIGHTS_NOTE, FIDInceptionV3
from sftok.metrics import (
    CodebookStats, FeatureStats, InceptionScoreStats, MeanStats, fid_from_feature_stats, psnr, ssim, to_uint8,
)

DEFAULT_STEPS = (1, 2, 4, 8)
SCALARS = ("psnr", "psnr_y", "ssim", "lpips")


# ######################################################################################################
# Loading what an evaluator needs (paths are loaded where they are used: in the actor)
# ######################################################################################################

def _load_model(model):
    if isinstance(model, torch.nn.Module):
        return model
    from sftok.checkpoint import load_model
    return load_model(model)


def _load_teacher(teacher, hidden_channels: Optional[int] = None):
    """A MaskGIT-VQGAN from a module, a stage-0 export dir (teacher.safetensors + teacher.json) or a file."""
    if teacher is None or isinstance(teacher, torch.nn.Module):
        return teacher
    from sftok.maskgit_vqgan import load_teacher
    from sftok_platform.train.checkpointing import TEACHER_CONFIG, TEACHER_FILE, load_teacher_dir
    path = Path(teacher)
    kwargs = {}
    if path.is_dir():
        if (path / TEACHER_CONFIG).is_file():
            return load_teacher_dir(path)
        path = path / TEACHER_FILE
    if hidden_channels is not None:
        kwargs.setdefault("hidden_channels", hidden_channels)
    return load_teacher(path, **kwargs)


def _lpips_note(lpips_weights) -> str:
    vgg, heads = (lpips_weights or ("", ""))
    if not vgg or not heads:
        return ("LPIPS skipped: set losses.vgg16_weights and losses.lpips_heads (local files) to compute it "
                "(SPEC E's official LPIPS is the lpips package's AlexNet; this project reports LPIPS-VGG)")
    if _is_random(vgg) or _is_random(heads):
        return "LPIPS skipped: LPIPS-VGG weights are 'random' (the distance would be meaningless)"
    return ""


def _load_lpips(lpips_weights):
    """LPIPS-VGG (``sftok.lpips``) from (vgg16 file, heads file); None when either is unset or 'random'."""
    vgg, heads = (lpips_weights or ("", ""))
    if _is_random(vgg) or _is_random(heads):
        return None
    from sftok.lpips import LPIPS
    return LPIPS(vgg, heads).eval().requires_grad_(False)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ######################################################################################################
# The per-batch work (runs in a Ray actor, or in-process)
# ######################################################################################################

class BatchEvaluator:
    """``{"image": float32 [B,3,S,S] in [0,1]} -> per-image outputs`` for every step count.

    Output columns (numpy, first axis B): ``tokens`` int64 [B,64]; ``feat_real`` float32 [B,2048],
    ``logits_real`` [B,1008]; and for each step count s: ``feat_s``, ``logits_s``, ``psnr_s``, ``psnr_y_s``,
    ``ssim_s`` and ``lpips_s`` (nan when LPIPS is skipped).
    """

    def __init__(self, model, *, steps: Sequence[int] = DEFAULT_STEPS, teacher=None, teacher_hidden_channels=None,
                 inception_weights: str = "", inception_input_size: int = 299, temperature: float = 0.0,
                 seed: int = 0, assignment: Optional[str] = None, lpips_weights=None,
                 device: Optional[str] = None, num_threads: Optional[int] = None,
                 mean_image: Optional[np.ndarray] = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device or _default_device())
        self.model = _load_model(model).to(self.device).eval()
        self.teacher = _load_teacher(teacher, teacher_hidden_channels)
        if not self.model.cfg.pixel_head and self.teacher is None:
            raise ConfigError("this checkpoint has no pixel head (stage 1/2): its hard ids decode through the "
                              "MaskGIT-VQGAN teacher; pass teacher=<stage-0 export dir or teacher weights file>.")
        if self.teacher is not None:
            self.teacher = self.teacher.to(self.device).eval()
        self.inception = FIDInceptionV3("" if _is_random(inception_weights) else inception_weights).to(self.device)
        self.inception.INPUT_IMAGE_SIZE = int(inception_input_size)   # 299 = protocol; smaller = fast tests only
        self.lpips = _load_lpips(lpips_weights)
        if self.lpips is not None:
            self.lpips = self.lpips.to(self.device)
        self.steps = [int(s) for s in steps]
        self.temperature, self.seed, self.assignment = float(temperature), int(seed), assignment
        # the best constant prediction (mean train image, [3,S,S]): its PSNR is the baseline to beat
        self.mean_image = None if mean_image is None else torch.tensor(      # a copy: Ray hands read-only arrays
            np.asarray(mean_image), dtype=torch.float32).to(self.device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.as_tensor(np.asarray(batch["image"]), dtype=torch.float32).to(self.device)
        tokens = self.model.encode(images, assignment=self.assignment)
        pool, logits = self.inception.features(to_uint8(images))
        out = {"tokens": _np(tokens), "feat_real": _np(pool), "logits_real": _np(logits)}
        if self.mean_image is not None:
            constant = (self.mean_image[None].expand_as(images) * 255).round() / 255   # same 8-bit rounding
            out["psnr_mean_image"] = _np(psnr(constant, images))
            # a stronger reference: each image painted in its own mean colour (what 3 numbers per image buy)
            flat = (images.mean((2, 3), keepdim=True).expand_as(images) * 255).round() / 255
            out["psnr_image_colour"] = _np(psnr(flat, images))
        for s in self.steps:
            g = torch.Generator(device=self.device).manual_seed(self.seed + s)
            recon = self.model.decode_tokens(tokens, num_steps=s, temperature=self.temperature, generator=g,
                                             teacher=self.teacher)
            recon_u8 = to_uint8(recon)                       # the protocol's clamp + 8-bit rounding
            recon = recon_u8.float() / 255.0
            pool, logits = self.inception.features(recon_u8)
            out[f"feat_{s}"], out[f"logits_{s}"] = _np(pool), _np(logits)
            out[f"psnr_{s}"] = _np(psnr(recon, images))
            out[f"psnr_y_{s}"] = _np(psnr(recon, images, y_channel=True))
            out[f"ssim_{s}"] = _np(ssim(recon, images))
            lp = self.lpips(recon, images) if self.lpips is not None else torch.full((images.shape[0],), math.nan)
            out[f"lpips_{s}"] = _np(lp)
        return out


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return t.numpy() if t.dtype in (torch.int64, torch.float64) else t.float().numpy()


def _is_random(value) -> bool:
    return not value or str(value).strip().lower() == "random"


# ######################################################################################################
# Driver-side float64 reduction
# ######################################################################################################

class EvalAccumulator:
    """Folds :class:`BatchEvaluator` outputs into mergeable float64 statistics (``sftok.metrics``)."""

    def __init__(self, steps: Sequence[int], codebook_size: int):
        self.steps = [int(s) for s in steps]
        self.real = FeatureStats(POOL_DIM)
        self.real_is = InceptionScoreStats(NUM_LOGITS)
        self.recon = {s: FeatureStats(POOL_DIM) for s in self.steps}
        self.recon_is = {s: InceptionScoreStats(NUM_LOGITS) for s in self.steps}
        self.scalars = MeanStats()
        self.codebook = CodebookStats(codebook_size)

    @property
    def count(self) -> int:
        return self.real.count

    def update(self, out: dict[str, np.ndarray]) -> "EvalAccumulator":
        for name in ("psnr_mean_image", "psnr_image_colour"):
            if name in out:
                self.scalars.update(name, out[name])
        self.codebook.update(out["tokens"])
        self.real.update(out["feat_real"])
        self.real_is.update(out["logits_real"])
        for s in self.steps:
            self.recon[s].update(out[f"feat_{s}"])
            self.recon_is[s].update(out[f"logits_{s}"])
            for name in SCALARS:
                self.scalars.update(f"{name}_{s}", out[f"{name}_{s}"])
        return self

    def merge(self, other: "EvalAccumulator") -> "EvalAccumulator":
        self.codebook.merge(other.codebook)
        self.real.merge(other.real)
        self.real_is.merge(other.real_is)
        for s in self.steps:
            self.recon[s].merge(other.recon[s])
            self.recon_is[s].merge(other.recon_is[s])
        self.scalars.merge(other.scalars)
        return self

    def metrics(self, fid_method: str = "auto") -> dict[str, Any]:
        """``{"steps": {"<s>": {rfid, is, psnr, psnr_y, ssim, lpips}}, codebook_*, is_original, ...}``."""
        if self.count < 2:
            raise ValueError(f"evaluation saw {self.count} image(s); FID needs at least 2.")
        per_step = {}
        for s in self.steps:
            per_step[str(s)] = {
                "rfid": fid_from_feature_stats(self.real, self.recon[s], method=fid_method),
                "is": self.recon_is[s].compute(),
                **{name: self.scalars.mean(f"{name}_{s}") for name in SCALARS},
            }
        baselines = {f"baseline_{name}_psnr": self.scalars.mean(f"psnr_{name}") for name in ("mean_image", "image_colour")}
        return {
            "num_images": self.count,
            "steps": per_step,
            **{k: v for k, v in baselines.items() if v is not None},
            "is_original": self.real_is.compute(),
            "codebook_usage": self.codebook.usage,
            "codebook_entropy": self.codebook.entropy,
            "codebook_size": self.codebook.codebook_size,
        }


# ######################################################################################################
# Image sources
# ######################################################################################################

def iter_local_batches(shards: str, split: str, *, image_size: int, batch_size: int,
                       max_images: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """The eval images of a split without Ray: Parquet files in manifest order, the reader's eval transform."""
    import pyarrow.parquet as pq

    from sftok_platform.data import load_manifest, shard_paths
    from sftok_platform.data.transforms import eval_transform, to_chw_float

    manifest = load_manifest(shards)
    if split not in manifest.get("splits", {}):
        raise ConfigError(f"{shards} has no split {split!r}; it has {sorted(manifest.get('splits', {}))}.")
    limit = max_images if max_images and max_images > 0 else None
    seen, pending = 0, []
    for path, info in zip(shard_paths(shards, split, manifest), manifest["splits"][split]["shards"]):
        if info.get("rows", 1) == 0:
            continue
        table = pq.read_table(path, columns=["image_bytes"])
        for data in table.column("image_bytes").to_pylist():
            pending.append(eval_transform(data, image_size))
            seen += 1
            if len(pending) == batch_size or (limit is not None and seen >= limit):
                yield {"image": to_chw_float(pending)}
                pending = []
            if limit is not None and seen >= limit:
                return
    if pending:
        yield {"image": to_chw_float(pending)}


def mean_train_image(shards: str, image_size: int, *, max_images: int = 2048, split: str = "train") -> np.ndarray:
    """The mean of (up to ``max_images``) eval-transformed train images, float32 [3,S,S] in [0,1].

    Why: it is the best constant reconstruction (it minimises the expected MSE), so its PSNR on the eval
    images is the floor a tokenizer must clear; a model that has learned nothing lands on it.
    """
    total, n = None, 0
    for batch in iter_local_batches(shards, split, image_size=image_size, batch_size=256, max_images=max_images):
        x = batch["image"].astype(np.float64)
        total = x.sum(0) if total is None else total + x.sum(0)
        n += x.shape[0]
    if not n:
        raise ConfigError(f"{shards} has no {split} images to average for the mean-image baseline.")
    return (total / n).astype(np.float32)


def _ray_batches(shards: str, split: str, evaluator_kwargs: dict, *, image_size: int, batch_size: int,
                 max_images: int, num_actors: Optional[int], cpus_per_actor: float) -> Iterator[dict]:
    """Stream :class:`BatchEvaluator` outputs from an actor pool (one GPU per actor where GPUs exist)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from sftok_platform.data import read_split

    from sftok_platform.cluster import connect
    connect()      # never attaches to some other cluster by accident: RAY_ADDRESS or a new local one
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    size = num_actors or (gpus if gpus else 1)
    # leave CPU for the Parquet read tasks, or the pool takes every CPU and the read never starts
    num_cpus = min(cpus_per_actor, max(0.25, (cpus - 1) / size)) if not gpus else cpus_per_actor
    ctx = DataContext.get_current()
    old_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True       # max_images keeps the same first N images every time
    try:
        ds = read_split(shards, split, train=False, image_size=image_size, batch_size=batch_size,
                        limit=max_images if max_images and max_images > 0 else None)
        ds = ds.select_columns(["image"]).map_batches(
            BatchEvaluator, fn_constructor_kwargs=evaluator_kwargs, batch_size=batch_size, batch_format="numpy",
            compute=ActorPoolStrategy(size=size), num_gpus=1 if gpus else 0, num_cpus=num_cpus)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    finally:
        ctx.execution_options.preserve_order = old_order


def _planned_images(shards: str, split: str, max_images: Optional[int]) -> int:
    """How many images the evaluation will see (0 when the manifest does not say)."""
    try:
        from sftok_platform.data import load_manifest
        s = load_manifest(shards)["splits"][split]
        total = int(s.get("num_images", sum(x["rows"] for x in s["shards"])))
    except Exception:          # noqa: BLE001 - progress only; the reader reports real data errors itself
        total = 0
    return min(total, max_images) if max_images and max_images > 0 and total else (max_images or total or 0)


class _Progress:
    """A progress line with rate and ETA every ~10% of the images (at most one per 5 s, and the last)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done, self.shown = int(total), label, 0, 0
        self.t0 = self.last = time.time()

    def update(self, n: int) -> None:
        self.done += int(n)
        now = time.time()
        finished = bool(self.total) and self.done >= self.total
        if not finished and (now - self.last < 5 or self.done - self.shown < self.total // 10):
            return
        self.last, self.shown = now, self.done
        rate = self.done / max(now - self.t0, 1e-9)
        if self.total:
            eta = max(self.total - self.done, 0) / max(rate, 1e-9)
            print(f"{self.label} {self.done}/{self.total} images, {rate:.1f} img/s, ETA {int(eta) // 60}:{int(eta) % 60:02d}",
                  flush=True)
        else:
            print(f"{self.label} {self.done} images, {rate:.1f} img/s", flush=True)


# ######################################################################################################
# The library entry point
# ######################################################################################################

def evaluate_checkpoint(checkpoint, shards: str, cfg: Optional[Config] = None, *, split: str = "val",
                        steps: Optional[Sequence[int]] = None, teacher=None, inception_weights: Optional[str] = None,
                        max_images: Optional[int] = None, batch_size: Optional[int] = None,
                        temperature: Optional[float] = None, use_ray: bool = True,
                        lpips_weights: Optional[tuple[str, str]] = None, assignment: Optional[str] = None,
                        num_actors: Optional[int] = None, cpus_per_actor: float = 1.0,
                        inception_input_size: int = 299, fid_method: str = "auto", seed: int = 0,
                        device: Optional[str] = None, out: Optional[str] = None,
                        tracking_uri: Optional[str] = None, experiment: Optional[str] = None,
                        parent_run_id: Optional[str] = None, run_name: str = "eval",
                        baseline: bool = True) -> dict[str, Any]:
    """Reconstruction metrics of one checkpoint over a split, per decoding step count.

    Args:
        checkpoint: a checkpoint dir/file (``sftok.load_model``: this project's or the official format) or
            an ``SFTok`` module. Stage-1/2 checkpoints (no pixel head) need ``teacher``.
        shards: the prepared Parquet shards (``python -m sftok_platform.data prepare``).
        cfg: optional run config; unset keyword arguments then come from ``cfg.eval`` (steps, temperature,
            max_images, batch_size, inception_weights), ``cfg.losses`` (LPIPS weights) and ``cfg.teacher``.
        teacher: MaskGIT-VQGAN module, stage-0 export dir, or weights file (stage-1/2 decoding).
        inception_weights: ``pt_inception-2015-12-05-6726825d.pth``; '' or 'random' = seeded random weights,
            reported with "random Inception weights: numbers are NOT comparable to papers".
        use_ray: True = Ray Data actor pool (``num_actors``, default one per GPU or 1 on CPU); False = this
            process, no Ray.
        assignment: override the tokenizer's Sinkhorn assignment ("per_image" makes tokens independent of
            how images are batched; the official protocol is the model's own, "batch").
        inception_input_size: 299 is the protocol; smaller sizes only make tests fast.
        fid_method: "auto" (default: scipy sqrtm, the official recipe, for full-rank statistics; the exact
            low-rank form when there are far fewer images than 2048 features), "sqrtm", "eigh" or "lowrank".
        baseline: also score the mean train image (up to 2048 images of the "train" split, when the shards
            have one) on the same images: ``baseline_mean_image_psnr``, the floor a learned model clears.
        out: also write the result as JSON there. tracking_uri (or cfg): also log to MLflow, as a child of
            ``parent_run_id`` when given, with one child run per step count.

    Returns a JSON-able dict: ``num_images``, ``split``, ``checkpoint``, ``stage`` ("stage3" or "stage12"),
    ``step_counts``, ``temperature``, ``steps`` ({"<s>": {"rfid", "is", "psnr", "psnr_y", "ssim", "lpips"}}),
    ``rfid_vs_steps`` ([{"steps", "rfid", "is"}]), headline ``rfid``/``is``/``psnr``/``psnr_y``/``ssim``/
    ``lpips`` at the largest step count, ``is_original``, ``codebook_usage``, ``codebook_entropy`` (bits),
    ``codebook_size``, ``baseline_mean_image_psnr`` (when computed), ``inception`` ({weights, sha256, paper_comparable, note, input_size}), ``notes``,
    ``seconds``, ``images_per_s``, ``ray``, ``mlflow_run_id`` (when logged).
    """
    ev = cfg.eval if cfg is not None else None
    steps = [int(s) for s in (steps if steps is not None else (ev.steps if ev else DEFAULT_STEPS))]
    temperature = float(temperature if temperature is not None else (ev.temperature if ev else 0.0))
    max_images = int(max_images if max_images is not None else (ev.max_images if ev else 0))
    batch_size = int(batch_size if batch_size is not None else (ev.batch_size if ev else 32))
    check_eval_arguments(steps, temperature=temperature, max_images=max_images, batch_size=batch_size,
                         num_actors=num_actors, inception_input_size=inception_input_size)
    if inception_weights is None:
        inception_weights = ev.inception_weights if ev else ""
    if lpips_weights is None and cfg is not None:
        lpips_weights = (cfg.losses.vgg16_weights, cfg.losses.lpips_heads)
    teacher_hidden = cfg.teacher.hidden_channels if cfg is not None else None

    model_cfg = _peek_model_config(checkpoint)
    t0 = time.time()
    mean_image = None
    if baseline and split != "train":
        from sftok_platform.data import load_manifest
        if "train" in load_manifest(shards).get("splits", {}):
            mean_image = mean_train_image(shards, model_cfg.image_size)
    kwargs = dict(steps=steps, teacher=teacher, teacher_hidden_channels=teacher_hidden,
                  inception_weights=inception_weights or "", inception_input_size=inception_input_size,
                  temperature=temperature, seed=seed, assignment=assignment, lpips_weights=lpips_weights,
                  device=device, mean_image=mean_image)
    acc = EvalAccumulator(steps, model_cfg.codebook_size)
    if use_ray:
        if isinstance(checkpoint, torch.nn.Module):
            checkpoint = checkpoint.cpu()
        batches: Iterable = _ray_batches(shards, split, dict(kwargs, model=checkpoint), image_size=model_cfg.image_size,
                                         batch_size=batch_size, max_images=max_images, num_actors=num_actors,
                                         cpus_per_actor=cpus_per_actor)
    else:
        evaluator = BatchEvaluator(checkpoint, **kwargs)
        batches = (evaluator(b) for b in iter_local_batches(shards, split, image_size=model_cfg.image_size,
                                                            batch_size=batch_size, max_images=max_images))
    progress = _Progress(_planned_images(shards, split, max_images), f"[eval {split}]")
    for out_batch in batches:
        acc.update(out_batch)
        progress.update(len(out_batch["tokens"]))
    seconds = time.time() - t0

    result = acc.metrics(fid_method=fid_method)
    inc = _describe_inception(inception_weights, inception_input_size)
    notes = [n for n in (inc["note"], _lpips_note(lpips_weights)) if n]
    if temperature > 0:
        notes.append(f"temperature {temperature}: stochastic decoding (seeded per batch)")
    last = str(max(steps))
    result.update({
        "checkpoint": str(checkpoint) if not isinstance(checkpoint, torch.nn.Module) else "<in-memory model>",
        "split": split, "stage": "stage3" if model_cfg.pixel_head else "stage12",
        "step_counts": steps, "temperature": temperature,
        "rfid_vs_steps": [{"steps": s, "rfid": result["steps"][str(s)]["rfid"], "is": result["steps"][str(s)]["is"]}
                          for s in steps],
        **{k: result["steps"][last][k] for k in ("rfid", "is", *SCALARS)},
        "inception": inc, "notes": notes, "seconds": seconds,
        "images_per_s": result["num_images"] / seconds if seconds > 0 else None, "ray": bool(use_ray),
    })
    if out:
        write_json(result, out)
    uri = tracking_uri or (_cfg_tracking_uri(cfg) if cfg is not None and parent_run_id else None)
    if uri:
        result["mlflow_run_id"] = log_to_mlflow(result, uri, experiment=experiment or (
            cfg.tracking.experiment if cfg is not None else "sftok"), parent_run_id=parent_run_id, run_name=run_name)
        if out:
            write_json(result, out)
    return result


def check_eval_arguments(steps: Sequence[int], *, temperature: float = 0.0, max_images: int = 0,
                         batch_size: int = 32, num_actors: Optional[int] = None,
                         inception_input_size: int = 299) -> None:
    """Refuse, before Ray starts and any image is decoded, every evaluation argument out of range (the
    flag and the fix in the message). Step counts are listed once each: they name the per-step results."""
    steps = list(steps)
    if not steps or min(steps) < 1:
        raise ConfigError(f"steps={steps}: give one or more decoding step counts >= 1, e.g. --steps 1,2,4,8.")
    if len(set(steps)) < len(steps):
        raise ConfigError(f"steps={steps}: list each decoding step count once, e.g. --steps 1,2,4,8.")
    if temperature < 0:
        raise ConfigError(f"--temperature {temperature:g}: use 0 (deterministic) or a positive sampling "
                          "temperature (official: 1.0).")
    if max_images < 0:
        raise ConfigError(f"--max-images {max_images}: use 0 for the whole split or a positive count.")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be >= 1 (default 32).")
    if num_actors is not None and num_actors < 1:
        raise ConfigError(f"--num-actors {num_actors}: must be >= 1 (leave it out for one per GPU, or 1).")
    if inception_input_size < 75:
        raise ConfigError(f"--inception-input-size {inception_input_size}: Inception-v3 needs >= 75 px "
                          "(299 is the FID protocol).")


def _peek_model_config(checkpoint):
    if isinstance(checkpoint, torch.nn.Module):
        return checkpoint.cfg
    from sftok.checkpoint import CONFIG_FILE, read_config_file, read_model_config
    p = Path(checkpoint)
    d = p if p.is_dir() else p.parent
    if (d / CONFIG_FILE).is_file() and read_config_file(d / CONFIG_FILE).get("format") == "sftok":
        return read_model_config(d)
    return _load_model(checkpoint).cfg    # official layouts: infer from the weights


def _describe_inception(weights, input_size: int) -> dict:
    from sftok.inception import PAPER_WEIGHTS_SHA256, sha256_file
    if _is_random(weights):
        info = {"weights": "", "sha256": "", "paper_comparable": False, "note": RANDOM_WEIGHTS_NOTE}
    else:
        sha = sha256_file(weights)
        ok = sha == PAPER_WEIGHTS_SHA256
        info = {"weights": str(weights), "sha256": sha, "paper_comparable": ok,
                "note": "" if ok else f"Inception weights {Path(weights).name} are not the published FID file "
                                      "(sha256 differs): numbers may not be comparable to papers"}
    info["input_size"] = int(input_size)
    if input_size != 299:
        info["paper_comparable"] = False
        info["note"] = "; ".join(filter(None, [info["note"], f"Inception input {input_size}px instead of 299: "
                                                             "test setting, NOT comparable"]))
    return info


def _cfg_tracking_uri(cfg: Config) -> str:
    from sftok_platform import tracking
    return tracking.tracking_uri(cfg)


# ######################################################################################################
# Reporting: JSON, table, MLflow
# ######################################################################################################

def write_json(result: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float))
    return path


def steps_table(result: dict) -> str:
    """The rFID-vs-steps table as Markdown."""
    lines = ["| steps | rFID | IS | PSNR | PSNR-Y | SSIM | LPIPS |", "|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, p: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"  # noqa
    for s in result["step_counts"]:
        r = result["steps"][str(s)]
        lines.append(f"| {s} | {fmt(r['rfid'], 4)} | {fmt(r['is'], 3)} | {fmt(r['psnr'], 2)} | "
                     f"{fmt(r['psnr_y'], 2)} | {fmt(r['ssim'], 4)} | {fmt(r['lpips'], 4)} |")
    if result.get("baseline_mean_image_psnr") is not None:
        lines.append(f"| mean train image (baseline) | | | {fmt(result['baseline_mean_image_psnr'], 2)} | | | |")
    if result.get("baseline_image_colour_psnr") is not None:
        lines.append(f"| each image's own mean colour (baseline) | | | {fmt(result['baseline_image_colour_psnr'], 2)} | | | |")
    return "\n".join(lines)


def flat_metrics(result: dict) -> dict[str, float]:
    """Numbers for MLflow: headline keys plus ``<metric>/steps_<s>``."""
    out = {k: float(result[k]) for k in ("rfid", "is", "psnr", "psnr_y", "ssim", "lpips", "is_original",
                                          "codebook_usage", "codebook_entropy", "baseline_mean_image_psnr",
                                          "baseline_image_colour_psnr")
           if _finite(result.get(k))}
    for s, r in result["steps"].items():
        out.update({f"{k}/steps_{s}": float(v) for k, v in r.items() if _finite(v)})
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def log_to_mlflow(result: dict, tracking_uri: str, *, experiment: str = "sftok", parent_run_id: Optional[str] = None,
                  run_name: str = "eval") -> str:
    """One eval run (a child of ``parent_run_id`` when given) with a child run per step count.

    The eval run gets the headline metrics, ``rfid``/``is``/... logged with ``step=<decoding steps>`` (so the
    MLflow chart *is* the rFID-vs-steps curve), params, and artifacts ``eval/results.json`` +
    ``eval/rfid_vs_steps.md``. Returns the eval run id.
    """
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    tags = {"sftok.kind": "eval"}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    rid, now = run.info.run_id, int(time.time() * 1000)
    inc = result["inception"]
    params = {"checkpoint": result["checkpoint"], "split": result["split"], "num_images": result["num_images"],
              "steps": ",".join(map(str, result["step_counts"])), "temperature": result["temperature"],
              "stage": result["stage"], "inception_weights": inc["weights"] or "random",
              "inception_sha256": inc["sha256"] or "-", "paper_comparable": inc["paper_comparable"]}
    metrics = [Metric(k, v, now, 0) for k, v in flat_metrics(result).items() if "/" not in k]
    for s in result["step_counts"]:
        for k, v in result["steps"][str(s)].items():
            if _finite(v):
                metrics.append(Metric(f"{k}_vs_steps", float(v), now, int(s)))
    client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)[:500]) for k, v in params.items()],
                     tags=[RunTag("sftok.notes", "; ".join(result["notes"])[:5000] or "-")])
    with tempfile.TemporaryDirectory() as tmp:
        write_json(result, Path(tmp) / "results.json")
        (Path(tmp) / "rfid_vs_steps.md").write_text(steps_table(result) + "\n")
        client.log_artifacts(rid, tmp, artifact_path="eval")
    for s in result["step_counts"]:
        child = client.create_run(exp_id, run_name=f"{run_name}/steps={s}",
                                  tags={"mlflow.parentRunId": rid, "sftok.kind": "eval-steps"})
        r = result["steps"][str(s)]
        client.log_batch(child.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in r.items() if _finite(v)],
                         params=[Param("decode_steps", str(s)), Param("num_images", str(result["num_images"]))])
        client.set_terminated(child.info.run_id)
    client.set_terminated(rid)
    return rid


# ######################################################################################################
# Command line
# ######################################################################################################

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sftok_platform.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir/file (this project's or official format)")
    p.add_argument("--data", required=True, help="prepared Parquet shards dir")
    p.add_argument("--split", default="val")
    p.add_argument("--steps", default="1,2,4,8", help="comma-separated decoding step counts")
    p.add_argument("--inception-weights", default="",
                   help="pt_inception-2015-12-05-6726825d.pth (empty: random weights, NOT comparable to papers)")
    p.add_argument("--teacher", default=None, help="MaskGIT-VQGAN weights or stage-0 export (stage-1/2 checkpoints)")
    p.add_argument("--teacher-hidden-channels", type=int, default=None)
    p.add_argument("--lpips-vgg16", default="", help="torchvision VGG16 state_dict (vgg16-397923af.pth)")
    p.add_argument("--lpips-heads", default="", help="LPIPS linear heads (vgg.pth)")
    p.add_argument("--max-images", type=int, default=0, help="0 = the whole split")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = deterministic decoding (official: 1.0)")
    p.add_argument("--assignment", choices=["batch", "per_image"], default=None)
    p.add_argument("--inception-input-size", type=int, default=299,
                   help="299 is the protocol; smaller sizes (>= 75) only for quick smoke tests (not comparable)")
    p.add_argument("--fid-method", choices=["auto", "sqrtm", "eigh", "lowrank"], default="auto")
    p.add_argument("--no-ray", action="store_true", help="evaluate in this process instead of a Ray actor pool")
    p.add_argument("--num-actors", type=int, default=None, help="actor pool size (default: #GPUs, or 1)")
    p.add_argument("--ray-address", default=None,
                   help="Ray to use: default RAY_ADDRESS (set by `ray job submit`), else a private local Ray; "
                        "'auto' joins a running one")
    p.add_argument("--out", default="results.json")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI, e.g. sqlite:////abs/path/mlflow.db")
    p.add_argument("--experiment", default="sftok")
    p.add_argument("--parent-run-id", default=None)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        steps = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        print(f"error: --steps {args.steps!r}: use comma-separated integers, e.g. 1,2,4,8", file=sys.stderr)
        return 2
    from sftok_platform.data import DataError, load_manifest
    try:       # everything that can be refused is refused here, before Ray starts
        check_eval_arguments(steps, temperature=args.temperature, max_images=args.max_images,
                             batch_size=args.batch_size, num_actors=args.num_actors,
                             inception_input_size=args.inception_input_size)
        if not Path(args.checkpoint).exists():
            raise ConfigError(f"--checkpoint {args.checkpoint}: no such file or directory (a stage export, "
                              "e.g. runs/tiny/stages/stage3/export, or an official checkpoint).")
        load_manifest(args.data)
        teacher = _load_teacher(args.teacher, args.teacher_hidden_channels) if args.teacher else None
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _is_random(args.inception_weights):
        print(f"WARNING: {RANDOM_WEIGHTS_NOTE}", file=sys.stderr)
    if not args.no_ray:
        from sftok_platform.cluster import connect
        connect(address=args.ray_address or None)
    result = evaluate_checkpoint(
        args.checkpoint, args.data, split=args.split, steps=steps, teacher=teacher,
        inception_weights=args.inception_weights, max_images=args.max_images, batch_size=args.batch_size,
        temperature=args.temperature, use_ray=not args.no_ray, lpips_weights=(args.lpips_vgg16, args.lpips_heads),
        assignment=args.assignment, num_actors=args.num_actors, fid_method=args.fid_method, out=args.out,
        inception_input_size=args.inception_input_size,
        tracking_uri=args.tracking_uri, experiment=args.experiment, parent_run_id=args.parent_run_id)
    print(steps_table(result))
    print(f"\n{result['num_images']} images, {result['seconds']:.1f} s; codebook usage "
          f"{result['codebook_usage']:.4f}, entropy {result['codebook_entropy']:.3f} bits")
    for note in result["notes"]:
        print(f"NOTE: {note}")
    print(f"results: {args.out}" + (f"; MLflow run {result['mlflow_run_id']}" if "mlflow_run_id" in result else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
