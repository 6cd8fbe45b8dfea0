"""The tokenizer's typed configuration: model, teacher, losses, one training stage, the generator.

These sections are what ``sftok`` itself reads (``create_model``, the objectives, the teacher, the generator).
The run-level sections (data, Ray Train, evaluation, MLflow, the run's name and stages), the composite
``Config`` a run resolves, the presets and their loading live in :mod:`sftok_platform.config`: the pure
PyTorch library does not know about the cluster.

The generic machinery is here too, because both packages use it: :func:`apply_override` sets a dotted key on
any tree of these dataclasses with type checking (unknown keys are refused with the closest valid key), and
:func:`check_ranges` refuses out-of-range numbers with a message that says what the value must be.

This module is plain Python (dataclasses + PyYAML).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable

import yaml


class ConfigError(ValueError):
    """A configuration that cannot work. The message always says how to fix it."""


# ######################################################################################################
# Sections
# ######################################################################################################

@dataclass
class ModelConfig:
    """Tokenizer architecture (SPEC A/B). Sizes name rows of ``sftok.blocks.VIT_SIZES``."""
    encoder_size: str = "base"          # tiny | small | base | large (width/layers/heads table)
    decoder_size: str = "base"          # SFTok-B: base, SFTok-L: large
    image_size: int = 256
    patch_size: int = 16
    num_latent_tokens: int = 64
    token_size: int = 32                # dimension of one latent token / OptVQ code
    codebook_size: int = 8192           # OptVQ codes (the 64 tokens index this)
    commitment_cost: float = 0.25
    sinkhorn_iters: int = 5
    sinkhorn_epsilon: float = 10.0
    # "batch": official Sinkhorn over the whole batch (tokens depend on the other images);
    # "per_image": Sinkhorn per image, so a token never depends on its batch neighbours.
    assignment: str = "batch"
    teacher_codebook_size: int = 1024   # proxy-code vocabulary (MaskGIT-VQGAN); mask id = this value
    num_proxy_codes: int = 256          # 16 x 16 teacher code grid
    pixel_head: bool = True             # stage 3 / inference layout: pixel_quantize + pixel_decoder
    pixel_hidden_channels: int = 128    # MaskGIT-VQGAN decoder width (tiny reference: 32)
    pixel_z_channels: int = 256
    # pixel-head layout (sftok.maskgit_vqgan.VQGANArch); must equal the teacher's (teacher.* of the same name)
    pixel_channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    pixel_num_res_blocks: int = 2
    pixel_norm_groups: int = 32
    pixel_shortcut: str = "output"
    # std of the official trunc-normal init of the ViTs (0.02); the tiny preset uses width^-0.5 (README)
    init_std: float = 0.02


@dataclass
class TeacherConfig:
    """The frozen MaskGIT-VQGAN that provides proxy codes (stages 1-2) and initialises ``pixel_*`` (stage 3).

    ``weights``: path to ``maskgit-vqgan-imagenet-f16-256.bin`` (HF ``fun-research/TiTok``). When it is
    empty the pipeline trains a teacher of the same architecture on the data first (stage 0).
    """
    weights: str = ""
    hidden_channels: int = 128
    codebook_size: int = 1024
    z_channels: int = 256
    # layout (sftok.maskgit_vqgan.VQGANArch): official f16 = 5 levels, 2 res blocks, GroupNorm(32), "output"
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    norm_groups: int = 32               # 0 = no normalisation
    shortcut: str = "output"            # "output": the port's quirk (released weights) | "input": standard
    init: str = "torch"                 # stage 0: "torch" default init | "scaled" (He + zero-init residual)
    # stage 0 only: restart unused codes during this fraction of the steps (0 = never; sftok.dead_codes)
    dead_code_restart_until: float = 0.8


@dataclass
class StageConfig:
    """Optimisation of one training stage (stages 0 and 3 read exactly these). ``steps`` counts optimiser
    updates.

    Each stage has only the knobs it reads: ``stage1`` is a :class:`TokenStageConfig` (+ label smoothing),
    ``stage2`` an :class:`SFVRStageConfig` (+ the SFVR replacement ratio and visible-slot weight), so
    ``stage1.replace_prob=0.5`` is refused as an unknown key instead of being accepted and ignored."""
    steps: int = 200_000
    global_batch_size: int = 256        # images per optimiser update, independent of the worker count
    grad_accum: int = 1                 # micro-batches per update on each worker
    lr: float = 1e-4
    end_lr: float = 1e-5
    warmup_steps: int = 10_000
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 1e-4
    quantizer_weight: float = 1.0       # stage 0: the teacher's VQ loss; 1-3: OptVQ's (a constant in stage 3)
    # "adamw" (official) or "muon": Muon on the transformer blocks' weight matrices at lr x muon_lr_scale,
    # AdamW on the rest (sftok.optim.MuonWithAdamW). Stage 0 (a CNN teacher) has no transformer: AdamW only.
    optimizer: str = "adamw"
    muon_lr_scale: float = 20.0


@dataclass
class TokenStageConfig(StageConfig):
    """Stage 1: cross-entropy on the teacher's codes with every slot masked."""
    label_smoothing: float = 0.0


@dataclass
class SFVRStageConfig(TokenStageConfig):
    """Stage 2: SFVR. Visible slots show the model's own first-step prediction with ``replace_prob``."""
    replace_prob: float = 1.0           # 0 = the vanilla MaskGIT-style baseline (visible = teacher codes)
    unmasked_weight: float = 0.1        # CE weight of visible slots (masked slots weigh 1.0)


@dataclass
class LossConfig:
    """Stage-3 pixel losses and the external weights they need (local paths only; nothing is downloaded).

    A weight path may be ``"random"`` to use a randomly initialised network on purpose (tests, CPU smoke
    runs; the losses are then meaningless). An empty path is an error when the stage runs (sftok.weights).
    """
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    vgg16_weights: str = ""             # torchvision vgg16 IMAGENET1K_V1 state_dict (vgg16-397923af.pth)
    lpips_heads: str = ""               # LPIPS linear heads (taming/lpips 'vgg.pth')
    discriminator_weight: float = 0.5
    discriminator_factor: float = 1.0
    discriminator_start: int = 20_000
    discriminator_lr: float = 1e-4
    lecam_weight: float = 0.001
    dino_weights: str = ""              # DINO ViT-S/16 (dino_deitsmall16_pretrain.pth)
    dino_arch: str = "vit_s16"          # vit_s16 (official) | tiny (tests / CPU smoke runs, random weights)
    diffaug_cutout: float = 0.2


@dataclass
class GeneratorConfig:
    """MaskGIT class-conditional generator over the 64 tokens (SPEC D), the optional stage 4."""
    enabled: bool = False
    width: int = 768
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 3072
    num_classes: int = 1000
    dropout: float = 0.1
    label_smoothing: float = 0.1
    class_dropout: float = 0.1
    steps: int = 1_000_000
    global_batch_size: int = 1024
    lr: float = 2e-4
    end_lr: float = 1e-5
    warmup_steps: int = 10_000
    beta1: float = 0.9
    beta2: float = 0.96
    weight_decay: float = 0.03
    sample_steps: int = 8
    guidance_scale: float = 4.5
    temperature: float = 1.0
    samples_per_class: int = 50
    reference_stats: str = ""           # .npz with mu/sigma (e.g. ADM VIRTUAL_imagenet256_labeled.npz)



# ######################################################################################################
# Dotted overrides and range checks
# ######################################################################################################

def apply_override(cfg: Any, dotted: str, value: Any) -> None:
    """Set ``cfg.a.b.c = value`` with type checking; unknown keys raise :class:`ConfigError`."""
    parts = dotted.split(".")
    target = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(target):
            raise ConfigError(f"{'.'.join(parts[:i])} is a value, not a section: cannot set {dotted}.")
        names = [f.name for f in dataclasses.fields(target)]
        if part not in names:
            prefix = ".".join(parts[:i])
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" Did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}.{hint} Valid keys here: {', '.join(names)}.")
        if i == len(parts) - 1:
            f = next(f for f in dataclasses.fields(target) if f.name == part)
            current = getattr(target, part)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted} is a section; set its keys, e.g. {dotted}.<key>=...")
                merge(current, value, where=dotted)
            else:
                setattr(target, part, _coerce(value, _field_type(target, f), dotted))
        else:
            target = getattr(target, part)


def split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. stage2.replace_prob=0.5).")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def merge(target: Any, data: dict, where: str) -> None:
    for key, value in data.items():
        try:
            apply_override(target, str(key), value)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def _field_type(obj: Any, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(type(obj))
    return hints.get(f.name, f.type)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        elem = args[0] if args else Any
        return [_coerce(v, elem, key) for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key} expects true/false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key} expects an integer, got {value!r}.")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{key} expects a number, got {value!r}.") from None
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} expects a string, got {value!r}.")
        return str(value)
    return value


# rule name -> (predicate, what the message says the value must be)
RANGES = {
    "count": (lambda v: v >= 1, "a whole number >= 1"),
    "positive": (lambda v: v > 0, "> 0"),
    "nonneg": (lambda v: v >= 0, ">= 0"),
    "unit": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "unit_open": (lambda v: 0 <= v < 1, "in [0, 1)"),
}



def check_ranges(rules: Iterable[tuple[str, Any, str]]) -> None:
    """Refuse the first ``(dotted key, value, rule)`` whose value breaks its rule (a :data:`RANGES` name)."""
    for key, value, rule in rules:
        ok, what = RANGES[rule]
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is out of range: it must be {what}.")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


__all__ = [
    "ConfigError", "ModelConfig", "TeacherConfig", "StageConfig", "TokenStageConfig", "SFVRStageConfig", "LossConfig", "GeneratorConfig",
    "apply_override", "split_override", "merge", "check_ranges", "flatten", "RANGES",
]
