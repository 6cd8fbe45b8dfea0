"""Input checks with messages that say what was expected and how to fix the call."""
from __future__ import annotations

import math

import torch


def check_images(images, image_size: int) -> torch.Tensor:
    """Images must be a float tensor [B, 3, S, S] with values in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [B,3,{image_size},{image_size}], got {type(images).__name__}.")
    if not images.is_floating_point():
        raise TypeError(f"images must be a float tensor with values in [0, 1], got dtype {images.dtype}; "
                        f"for uint8 pixels use images.float() / 255.")
    if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (image_size, image_size):
        hint = " (add a batch dimension with images.unsqueeze(0))" if images.dim() == 3 else ""
        raise ValueError(f"images must have shape [B, 3, {image_size}, {image_size}], got {list(images.shape)}"
                         f"{hint}; resize/crop to {image_size}x{image_size} first.")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch.")
    # one device sync for the whole check (this runs on every training forward)
    lo, hi = torch.stack(torch.aminmax(images.detach())).float().tolist()
    if math.isnan(lo) or math.isnan(hi) or math.isinf(lo) or math.isinf(hi):
        raise ValueError("images contain NaN or inf values.")
    if lo < -1e-3 or hi > 1 + 1e-3:
        hint = " (they look like [-1, 1]; use (images + 1) / 2)" if lo >= -1 - 1e-3 and hi <= 1 + 1e-3 else \
            " (they look like 0..255 pixels; divide by 255)" if hi > 1.5 else ""
        raise ValueError(f"images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]{hint}.")
    return images


def check_ids(ids, length: int, vocab: int, name: str, allow: int | None = None) -> torch.Tensor:
    """Integer ids [B, length] in [0, vocab) (``allow`` admits one extra id, e.g. the mask id)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B,{length}] of integer ids, got {type(ids).__name__}.")
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"{name} must be an integer tensor (torch.long), got dtype {ids.dtype}; "
                        f"use {name}.long() if the values are whole numbers.")
    if ids.dim() == 3 and ids.shape[1] == 1:      # official [B,1,K] layout
        ids = ids[:, 0]
    if ids.dim() != 2 or ids.shape[1] != length:
        raise ValueError(f"{name} must have shape [B, {length}], got {list(ids.shape)}; this model uses "
                         f"{length} {name} per image.")
    if ids.numel():
        bad = (ids < 0) | (ids >= vocab)
        if allow is not None:
            bad &= ids != allow
        if bad.any():                      # the only device sync on the happy path
            lo, hi = ids.min().item(), ids.max().item()
            top = vocab if allow is None else max(vocab, allow + 1)
            extra = f" or {allow}" if allow is not None else ""
            raise ValueError(f"{name} must lie in [0, {vocab}){extra}, got values in [{lo}, {hi}] "
                             f"(vocabulary size {vocab}, valid up to {top - 1}).")
    return ids.long()
