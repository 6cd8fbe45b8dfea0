"""Exponential moving average of model weights, as the official training does it (SPEC C.3).

One :meth:`EMA.update` per optimiser step. The k-th update (n = k - 1 updates before it) uses
decay 0 for the first update (a plain copy) and ``min((1 + n) / (10 + n), decay)`` afterwards, so early
averages are not dominated by the random init. Parameters that do not require grad (the frozen encoder
and quantizer of stage 3) are copied, not averaged. Buffers are not averaged: :meth:`EMA.state_dict_for`
takes them from the online model. The EMA weights are what evaluation, the final save and the next stage's
init use.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def ema_decay_at(num_updates_before: int, max_decay: float = 0.999) -> float:
    """Decay of the update that follows ``num_updates_before`` earlier updates (official warm-up rule)."""
    n = num_updates_before
    if n <= 0:
        return 0.0
    return min((1.0 + n) / (10.0 + n), max_decay)


class EMA:
    """Shadow copy of a model's parameters (fp32, same device), updated after each optimiser step.

    Usage::

        ema = EMA(model, decay=0.999)
        ...; optimizer.step(); ema.update(model)
        torch.save(ema.state_dict(), ...)                # resumable
        ema_model.load_state_dict(ema.state_dict_for(model))   # full model state with EMA weights
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay} must lie in [0, 1).")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in unwrap_model(model).named_parameters()}

    def _pairs(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        params = dict(unwrap_model(model).named_parameters())
        if params.keys() != self.shadow.keys():
            extra, missing = params.keys() - self.shadow.keys(), self.shadow.keys() - params.keys()
            raise KeyError(f"EMA was built for another model: parameters not tracked {sorted(extra)[:5]}, "
                           f"tracked but absent {sorted(missing)[:5]}.")
        for name, p in params.items():
            yield name, self.shadow[name], p

    def current_decay(self) -> float:
        """Decay the next :meth:`update` will use."""
        return ema_decay_at(self.num_updates, self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold the model's current weights in; returns the decay used."""
        decay = self.current_decay()
        avg_s, avg_p, copy_s, copy_p = [], [], [], []
        for _, s, p in self._pairs(model):
            if p.requires_grad and decay > 0.0:
                avg_s.append(s)
                avg_p.append(p.detach().to(s.dtype))
            else:
                copy_s.append(s)
                copy_p.append(p.detach().to(s.dtype))
        if avg_s:
            torch._foreach_lerp_(avg_s, avg_p, 1.0 - decay)    # s <- s + (1 - decay) * (p - s)
        if copy_s:
            torch._foreach_copy_(copy_s, copy_p)
        self.num_updates += 1
        return decay

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into ``model`` (same architecture), e.g. an evaluation copy."""
        for _, s, p in self._pairs(model):
            p.copy_(s.to(p.dtype))

    def state_dict_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with every parameter replaced by its EMA value (buffers from ``model``)."""
        sd = unwrap_model(model).state_dict()
        for name, s in self.shadow.items():
            sd[name] = s.to(sd[name].dtype).clone()
        return sd

    @torch.no_grad()
    def reset_rows(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Set rows ``rows`` of parameter ``name``'s average to ``values`` (e.g. codebook rows that were just
        re-initialised: averaging them with the dead rows they replace would export neither)."""
        if name not in self.shadow:
            raise KeyError(f"{name!r} is not an averaged parameter of this EMA.")
        self.shadow[name][rows] = values.detach().to(self.shadow[name].dtype)

    def to(self, device) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        if state["shadow"].keys() != self.shadow.keys():
            raise KeyError("EMA state was saved for a model with different parameter names.")
        for k, v in state["shadow"].items():
            if v.shape != self.shadow[k].shape:
                raise ValueError(f"EMA state for {k!r} has shape {tuple(v.shape)}, model has "
                                 f"{tuple(self.shadow[k].shape)}.")
            self.shadow[k].copy_(v)
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])


__all__ = ["EMA", "ema_decay_at", "unwrap_model"]
