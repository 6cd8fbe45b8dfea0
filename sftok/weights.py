"""External weight files: where each one comes from, and one way to resolve and load them.

SFTok training and evaluation need pretrained networks this project does not ship (the MaskGIT-VQGAN
teacher, VGG16 + LPIPS heads, a DINO ViT-S/16, Inception). Nothing is ever downloaded: each file is a
local path in the config. :func:`resolve_weight` turns a config value into a path, or raises
:class:`MissingWeightsError` whose message names the file, what it is, where to get it and which config key
to set, so a user can fix it without reading code.

Random initialisation is only for tests and smoke runs, and must be asked for: the config value
``"random"`` (:data:`RANDOM`), or ``allow_random=True`` from code. An empty path is never silently random.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

RANDOM = "random"


@dataclass(frozen=True)
class ExternalWeight:
    key: str            # config key that holds the path
    what: str           # what the network is and what it is used for
    filename: str       # the usual file name
    source: str         # where to get it


KNOWN_WEIGHTS: dict[str, ExternalWeight] = {w.key: w for w in [
    ExternalWeight(
        "teacher.weights", "the MaskGIT-VQGAN f16 teacher (proxy codes for stages 1-2, pixel head init for stage 3)",
        "maskgit-vqgan-imagenet-f16-256.bin",
        "the Hugging Face repo fun-research/TiTok (or leave teacher.weights empty to train a teacher on your "
        "data in stage 0)"),
    ExternalWeight(
        "losses.vgg16_weights", "torchvision VGG16 IMAGENET1K_V1 state_dict (LPIPS backbone, stage-3 perceptual loss)",
        "vgg16-397923af.pth",
        "torchvision: torchvision.models.VGG16_Weights.IMAGENET1K_V1 "
        "(https://download.pytorch.org/models/vgg16-397923af.pth); save it with torch.save(state_dict)"),
    ExternalWeight(
        "losses.lpips_heads", "the LPIPS-VGG linear heads lin0..lin4 (stage-3 perceptual loss)",
        "vgg.pth",
        "the lpips package (lpips/weights/v0.1/vgg.pth) or taming-transformers / TiTok "
        "(modeling/modules/vgg_lpips.pth/vgg.pth)"),
    ExternalWeight(
        "losses.dino_weights", "a DINO ViT-S/16 backbone in the original DINO/DeiT key layout (stage-3 discriminator)",
        "dino_deitsmall16_pretrain.pth",
        "facebookresearch/dino (https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/"
        "dino_deitsmall16_pretrain.pth)"),
    ExternalWeight(
        "eval.inception_weights", "the FID Inception-v3 network (rFID / IS)",
        "pt_inception-2015-12-05-6726825d.pth",
        "torch-fidelity / pytorch-fid releases (pt_inception-2015-12-05-6726825d.pth)"),
]}


class MissingWeightsError(FileNotFoundError):
    """An external weight file is not configured or not on disk. The message says how to fix it."""


def _describe(key: str) -> str:
    w = KNOWN_WEIGHTS.get(key)
    if w is None:
        return f"Set the config key {key!r} to its local path."
    return (f"It is {w.what}; the usual file is {w.filename!r}, from {w.source}. Download it yourself (nothing "
            f"is downloaded at run time) and set {key}=/path/to/{w.filename}, or {key}={RANDOM} for a "
            f"randomly initialised network (tests and smoke runs only: the results are meaningless).")


def is_random(value: Optional[str]) -> bool:
    return isinstance(value, str) and value.strip().lower() == RANDOM


def resolve_weight(value: Optional[str], key: str, *, allow_random: bool = False) -> Optional[Path]:
    """Config value -> absolute path of an existing file, or ``None`` meaning "random init".

    Args:
        value: the config value (a path, ``""``, or ``"random"``).
        key: the config key it came from (e.g. ``"losses.dino_weights"``); used in the error message.
        allow_random: treat an empty value as random init too (explicit opt-in from code, e.g. tests).

    Raises:
        MissingWeightsError: the value is empty (and ``allow_random`` is false) or the file does not exist.
    """
    if is_random(value):
        return None
    if not value:
        if allow_random:
            return None
        raise MissingWeightsError(f"{key} is not set. {_describe(key)}")
    path = Path(os.path.expanduser(str(value))).resolve()
    if not path.is_file():
        raise MissingWeightsError(f"{key}={value!r}: no such file ({path}). {_describe(key)}")
    return path


class WeightsFileError(ValueError):
    """A weights or checkpoint file that cannot be read safely (corrupt, truncated, pickled objects)."""


def read_state_dict(path: str | os.PathLike, key: str = "") -> dict[str, torch.Tensor]:
    """The one safe reader of weight files: tensors of a ``.safetensors`` or torch ``.bin/.pt/.pth`` file.

    Torch files are read with ``weights_only=True``, so nothing but tensors and plain containers is ever
    unpickled. A file that holds a single nested state (``{"state_dict": ...}``, ``{"model": ...}``,
    ``{"module": ...}``, DINO's ``{"teacher": ...}``) is unwrapped. ``key`` names the config key the path
    came from, so the error can say where to get the right file.
    """
    path = Path(path)
    where = f"{key}={str(path)!r}" if key else repr(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"weights file {where} does not exist. {_describe(key) if key else ''}".strip())
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every reader error means the same thing to the user
        raise WeightsFileError(
            f"cannot read the weights in {where} ({type(e).__name__}: {str(e)[:200]}). The file is corrupt, "
            "truncated or not a plain state dict (pickled objects other than tensors are refused on purpose): "
            f"re-download or re-save it. {_describe(key) if key else ''}".strip()) from None
    for wrapper in ("state_dict", "model", "module", "teacher"):   # common training-script wrappers
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsFileError(f"{where} does not hold a flat mapping of parameter names to tensors.")
    return dict(sd)


def strip_prefixes(sd: Mapping[str, torch.Tensor], prefixes=("module.", "backbone.")) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (DDP ``module.``, DINO training ``backbone.``) from every key that has them."""
    out = dict(sd)
    for p in prefixes:
        if out and all(k.startswith(p) for k in out):
            out = {k[len(p):]: v for k, v in out.items()}
    return out


def missing_weights(cfg, stages=None) -> list[str]:
    """Messages for every external file the given stages need but cannot find (empty list = all good).

    Call this before a pipeline starts, so a missing VGG or DINO file fails in seconds rather than after
    hours of stages 0-2. ``cfg`` is a run config (:class:`sftok_platform.config.Config`, duck-typed); ``stages`` defaults to
    ``cfg.run.stages``. An empty ``teacher.weights`` is fine (stage 0 trains a teacher); a set but
    missing one is reported.
    """
    stages = list(cfg.run.stages if stages is None else stages)
    needed: list[str] = []
    if cfg.teacher.weights and any(s in stages for s in ("stage1", "stage2", "stage3")):
        needed.append("teacher.weights")
    if "stage3" in stages:
        lc = cfg.losses
        if lc.perceptual_weight > 0:
            needed += ["losses.vgg16_weights", "losses.lpips_heads"]
        if lc.discriminator_weight > 0 and lc.discriminator_factor > 0:
            needed.append("losses.dino_weights")
    problems = []
    for key in needed:
        section, name = key.split(".")
        try:
            resolve_weight(getattr(getattr(cfg, section), name), key)
        except MissingWeightsError as e:
            problems.append(str(e))
    return problems


__all__ = ["RANDOM", "ExternalWeight", "KNOWN_WEIGHTS", "MissingWeightsError", "is_random", "resolve_weight",
           "read_state_dict", "WeightsFileError", "strip_prefixes", "missing_weights"]


def exclude_from_state_dict(module: "torch.nn.Module", child: str) -> None:
    """Keep the frozen external sub-network ``module.<child>`` out of ``module.state_dict()``.

    External networks (VGG for LPIPS, the DINO backbone) come from their own files; saving them in every
    checkpoint would only waste space and could silently replace the configured weights. Loading a state
    without them still works with ``strict=True``: the current values are filled in.
    """
    key = child + "."

    def drop(mod, state_dict, prefix, local_metadata):
        for k in [k for k in state_dict if k.startswith(prefix + key)]:
            del state_dict[k]

    def fill(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for k, v in getattr(mod, child).state_dict().items():
            state_dict.setdefault(prefix + key + k, v)

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_pre_hook(fill)


__all__.append("exclude_from_state_dict")
