"""AdamW parameter groups and the learning-rate schedule of the official training (SPEC C.3).

* No weight decay for tensors with ndim < 2 or whose name contains ``ln``, ``bias``, ``latent_tokens``,
  ``mask_token``, ``embedding``, ``norm``, ``gamma`` or ``embed`` (a name rule, so it also exempts the 4-D
  ``encoder.patch_embed.weight`` and ``decoder.decoder_embed.weight``). The same rule is used for the
  stage-3 discriminator.
* LR: linear warm-up from 0 to the base LR over ``warmup_steps`` optimiser updates, then a half cosine
  down to ``end_lr`` at ``steps``. ``step`` is the index of the update about to be made (0 for the first,
  which therefore runs at LR 0, as in the official LambdaLR). Past the horizon the LR stays at ``end_lr``
  (the official formula would rise again).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

NO_DECAY_KEYWORDS = ("ln", "bias", "latent_tokens", "mask_token", "embedding", "norm", "gamma", "embed")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """The official exclusion rule (``utils/train_utils.py: create_optimizer``)."""
    return param.ndim < 2 or any(k in name for k in NO_DECAY_KEYWORDS)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: [no-decay (wd 0), decay (wd ``weight_decay``)].

    Each group also carries ``names`` (for logging and tests); torch optimisers keep extra group keys, so
    the groups can go straight into ``torch.optim.AdamW``.
    """
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(name, p) else decay).append((name, p))
    return [
        {"params": [p for _, p in no_decay], "weight_decay": 0.0, "names": [n for n, _ in no_decay]},
        {"params": [p for _, p in decay], "weight_decay": float(weight_decay), "names": [n for n, _ in decay]},
    ]


def build_adamw(params: nn.Module | Iterable[dict], *, lr: float, betas: tuple[float, float],
                weight_decay: float = 0.0, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` of a module (or over ready-made groups).

    ``fused=None`` picks the fused CUDA kernel when every parameter is on a GPU.
    """
    groups = param_groups(params, weight_decay) if isinstance(params, nn.Module) else list(params)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups if len(g["params"])]
    if not groups:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False.")
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def build_optimizer(model: nn.Module, stage_cfg, *, fused: bool | None = None) -> torch.optim.AdamW:
    """The tokenizer optimiser of one stage from a :class:`sftok.config.StageConfig`."""
    return build_adamw(model, lr=stage_cfg.lr, betas=(stage_cfg.beta1, stage_cfg.beta2),
                       weight_decay=stage_cfg.weight_decay, fused=fused)


def cosine_lr(step: int, base_lr: float, end_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up 0 -> base_lr, then half cosine base_lr -> end_lr at ``total_steps``."""
    step = max(int(step), 0)
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end_lr + (base_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, stage_cfg) -> float:
    """Tokenizer LR for optimiser update ``step`` of a stage (``stage_cfg``: lr, end_lr, warmup_steps, steps)."""
    return cosine_lr(step, stage_cfg.lr, stage_cfg.end_lr, stage_cfg.warmup_steps, stage_cfg.steps)


def discriminator_lr_at(step: int, stage_cfg, loss_cfg) -> float:
    """Stage-3 discriminator LR at *tokenizer* update ``step``.

    The discriminator trains from ``losses.discriminator_start``; its schedule counts its own updates from
    there: warm-up ``stage3.warmup_steps``, cosine to ``stage3.end_lr`` over the remaining
    ``steps - discriminator_start`` updates. (The official scheduler mixes units, ``steps * num_proc -
    20000``; counting D updates is what it evidently meant.) Returns 0 before the start.
    """
    d_step = step - loss_cfg.discriminator_start
    if d_step < 0:
        return 0.0
    total = max(1, stage_cfg.steps - loss_cfg.discriminator_start)
    return cosine_lr(d_step, loss_cfg.discriminator_lr, stage_cfg.end_lr, min(stage_cfg.warmup_steps, total), total)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


__all__ = ["NO_DECAY_KEYWORDS", "no_weight_decay", "param_groups", "build_adamw", "build_optimizer",
           "cosine_lr", "lr_at", "discriminator_lr_at", "set_lr"]
