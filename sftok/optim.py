"""AdamW parameter groups and the learning-rate schedule of the official training (SPEC C.3).

* No weight decay for tensors with ndim < 2 or whose name contains ``ln``, ``bias``, ``latent_tokens``,
  ``mask_token``, ``embedding``, ``norm``, ``gamma`` or ``embed`` (a name rule, so it also exempts the 4-D
  ``encoder.patch_embed.weight`` and ``decoder.decoder_embed.weight``). The same rule is used for the
  stage-3 discriminator.
* LR: linear warm-up from 0 to the base LR over ``warmup_steps`` optimiser updates, then a half cosine
  down to ``end_lr`` at ``steps``. ``step`` is the index of the update about to be made (0 for the first,
  which therefore runs at LR 0, as in the official LambdaLR). Past the horizon the LR stays at ``end_lr``
  (the official formula would rise again).

Besides the official AdamW, a stage may use **Muon** (``stageN.optimizer: muon``; ``torch.optim.Muon``) for
the hidden weight matrices of the transformer blocks, AdamW keeping everything else (Keller Jordan's
recipe). Muon orthogonalises each matrix's momentum, so every direction of a weight moves at the same
rate; on the tiny CPU preset it learns the teacher's codes in about a third of AdamW's steps (README, "The
laptop default"). The official presets keep AdamW.
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
    return named_param_groups(((n, p) for n, p in model.named_parameters() if p.requires_grad), weight_decay)


def named_param_groups(named: Iterable[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """:func:`param_groups` over given ``(name, parameter)`` pairs."""
    no_decay, decay = [], []
    for name, p in named:
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


def muon_parameter(name: str, param: torch.Tensor) -> bool:
    """Muon's share of a model: the 2-D weight matrices inside transformer blocks (attention in/out
    projections, MLP). Embeddings, position tables, patch and output heads, norms and biases are not
    hidden matrices and stay with AdamW."""
    return param.ndim == 2 and ".transformer." in f".{name}"


class MuonWithAdamW:
    """Muon over :func:`muon_parameter`, AdamW (the official groups) over the rest, driven as one optimiser.

    It offers what the training loop and ``torch.amp.GradScaler`` use of a ``torch.optim.Optimizer``:
    ``param_groups`` (both optimisers' groups; :func:`set_lr` honours each group's ``lr_scale``), ``step``,
    ``zero_grad``, ``state_dict`` and ``load_state_dict``. Muon's groups carry ``lr_scale`` =
    ``muon_lr_scale``, so one schedule drives both and a sweep over ``lr`` moves both.
    """

    def __init__(self, model: nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float,
                 muon_lr_scale: float, muon_momentum: float = 0.95):
        matrices, rest = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (matrices if muon_parameter(name, p) else rest).append((name, p))
        if not matrices:
            raise ValueError("optimizer=muon: the model has no trainable transformer weight matrices; "
                             "use optimizer=adamw for it.")
        self.muon = torch.optim.Muon([p for _, p in matrices], lr=lr * muon_lr_scale,
                                     weight_decay=float(weight_decay), momentum=muon_momentum)
        self.muon.param_groups[0]["lr_scale"] = float(muon_lr_scale)
        self.adamw = build_adamw(named_param_groups(rest, weight_decay), lr=lr, betas=betas) if rest else None
        self._optimizers = [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self._optimizers for g in o.param_groups]

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self._optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), **({"adamw": self.adamw.state_dict()} if self.adamw else {})}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != ({"muon", "adamw"} if self.adamw else {"muon"}):
            raise ValueError(f"not a Muon+AdamW optimizer state (keys {sorted(state)}): the checkpoint was "
                             "written with another stageN.optimizer.")
        self.muon.load_state_dict(state["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state["adamw"])


OPTIMIZERS = ("adamw", "muon")


def build_optimizer(model: nn.Module, stage_cfg, *, fused: bool | None = None):
    """The tokenizer optimiser of one stage from a :class:`sftok.config.StageConfig`: AdamW (official), or
    :class:`MuonWithAdamW` where ``stage_cfg.optimizer == "muon"``."""
    betas = (stage_cfg.beta1, stage_cfg.beta2)
    if stage_cfg.optimizer == "muon":
        return MuonWithAdamW(model, lr=stage_cfg.lr, betas=betas, weight_decay=stage_cfg.weight_decay,
                             muon_lr_scale=stage_cfg.muon_lr_scale)
    return build_adamw(model, lr=stage_cfg.lr, betas=betas, weight_decay=stage_cfg.weight_decay, fused=fused)


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


def set_lr(optimizer, lr: float) -> None:
    """Set every group's LR to ``lr`` times the group's ``lr_scale`` (1 unless the group sets one)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


__all__ = ["NO_DECAY_KEYWORDS", "OPTIMIZERS", "no_weight_decay", "param_groups", "named_param_groups",
           "build_adamw", "muon_parameter", "MuonWithAdamW", "build_optimizer", "cosine_lr", "lr_at",
           "discriminator_lr_at", "set_lr"]
