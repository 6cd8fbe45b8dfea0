"""Training-time masking of the 256 proxy-code slots (SPEC B.3 step 2, C.2).

The official code draws, per sample, t ~ U(0,1), masks n = round(256 * arccos(t) / (pi/2)) slots chosen
uniformly at random, and (stage 2) replaces each visible slot by the model's own step-1 prediction with
probability ``replace_prob``. The draws happen in a fixed order, t, then the permutation, then the
replacement coins, so with the same seed this module replays the official masks bit for bit
(``tests/test_losses_reference.py``).

All draws are made on the CPU (from ``generator`` when given, else from torch's global CPU RNG) and then
moved to ``device``: the result is the same on every device, and ``torch.manual_seed`` alone replays it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def _rand(*shape: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is not None and generator.device.type != "cpu":
        return torch.rand(*shape, generator=generator, device=generator.device).cpu()
    return torch.rand(*shape, generator=generator)


def arccos_num_masked(t: torch.Tensor, num_slots: int = 256) -> torch.Tensor:
    """n = round(num_slots * arccos(t) / (pi/2)) clamped to [0, num_slots] (the mask ratio has mean 2/pi)."""
    ratio = torch.acos(t) / (math.pi * 0.5)
    return torch.round(ratio * num_slots).clamp(0, num_slots).long()


def arccos_mask(batch: int, num_slots: int = 256, generator: Optional[torch.Generator] = None,
                device=None) -> torch.Tensor:
    """BoolTensor [batch, num_slots], True = masked, with the official arccos schedule and RNG order.

    Two draws: ``t = rand(batch)``, then ``rank = rand(batch, num_slots).argsort(-1)``; a slot is masked
    when its value in ``rank`` is below n (the official ``argsort < n`` form, which is a uniformly random
    subset of size n; taking "the first n indices of the argsort" would give a different subset).
    """
    t = _rand(batch, generator=generator)
    n = arccos_num_masked(t, num_slots)
    rank = _rand(batch, num_slots, generator=generator).argsort(dim=-1)
    mask = rank < n[:, None]
    return mask.to(device) if device is not None else mask


def replacement_draw(batch: int, num_slots: int, replace_prob: float,
                     generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """BoolTensor [batch, num_slots]: True where a visible slot takes the model's own prediction.

    One draw ``rand(batch, num_slots) < replace_prob``, made even when replace_prob is 0 or 1 so that the
    masks of later steps do not depend on replace_prob (ablations then see identical masks per seed).
    """
    if not 0.0 <= replace_prob <= 1.0:
        raise ValueError(f"replace_prob={replace_prob} must lie in [0, 1] (1.0 = SFTok default, 0.0 = vanilla).")
    coins = _rand(batch, num_slots, generator=generator) < replace_prob
    return coins.to(device) if device is not None else coins


def decoder_input_ids(teacher_codes: torch.Tensor, guide_ids: Optional[torch.Tensor], mask: torch.Tensor,
                      replace: Optional[torch.Tensor], mask_id: int) -> torch.Tensor:
    """Slot ids the decoder sees: ``mask_id`` where masked, else guide or teacher code.

    ``replace=None`` means every visible slot takes the guide (stage 3); ``guide_ids=None`` means none does.
    """
    if guide_ids is None:
        visible = teacher_codes
    elif replace is None:
        visible = guide_ids
    else:
        visible = torch.where(replace, guide_ids, teacher_codes)
    return torch.where(mask, torch.full_like(visible, mask_id), visible)


def check_mask(mask: torch.Tensor, batch: int, num_slots: int, name: str = "mask") -> torch.Tensor:
    """Validate an explicitly passed mask / replacement tensor ([batch, num_slots], bool or 0/1 ints)."""
    if tuple(mask.shape) != (batch, num_slots):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected ({batch}, {num_slots}).")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{name} must be bool (or 0/1 integers), got {mask.dtype}.")
        mask = mask.bool()
    return mask


__all__ = ["arccos_num_masked", "arccos_mask", "replacement_draw", "decoder_input_ids", "check_mask"]
