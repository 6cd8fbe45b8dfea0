"""Differentiable augmentation for the stage-3 discriminator (DiffAugment, Zhao et al. 2020).

The official stage 3 uses the StyleGAN-T variant ``DiffAug(prob=1.0, cutout=0.2)`` before every
discriminator call, independently for real and fake images: per image, a translation of up to 1/8 of the
side (zero fill), colour jitter (brightness +[-0.5, 0.5), saturation x[0, 2), contrast x[0.5, 1.5)) and
a cutout square of 20% of the side. All operations are differentiable in the image, so the generator
gets gradients through them.

Randomness: one ``rand(7, B)`` draw per call (translation h/w, brightness, saturation, contrast, cutout
h/w), from ``generator`` if given, else torch's global RNG, made on the CPU and moved to the image's device.
"""
from __future__ import annotations

from typing import Optional

import torch


class DiffAug:
    def __init__(self, translation: float = 0.125, color: bool = True, cutout: float = 0.2):
        if not 0.0 <= translation < 1.0 or not 0.0 <= cutout < 1.0:
            raise ValueError(f"DiffAug translation={translation} and cutout={cutout} must lie in [0, 1).")
        self.translation = translation
        self.color = color
        self.cutout = cutout

    def __repr__(self) -> str:
        return f"DiffAug(translation={self.translation}, color={self.color}, cutout={self.cutout})"

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"DiffAug expects images [B,C,H,W], got shape {tuple(x.shape)}.")
        B, _, H, W = x.shape
        u = torch.rand(7, B, generator=generator,
                       device=generator.device if generator is not None else "cpu").to(x.device)
        if self.translation > 0:
            x = self._translate(x, u[0], u[1])
        if self.color:
            x = x + (u[2] - 0.5).view(B, 1, 1, 1)                          # brightness
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (u[3] * 2.0).view(B, 1, 1, 1) + mean          # saturation
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (u[4] + 0.5).view(B, 1, 1, 1) + mean          # contrast
        if self.cutout > 0:
            x = x * self._cutout_mask(B, H, W, u[5], u[6], x).unsqueeze(1)
        return x

    def _translate(self, x: torch.Tensor, uh: torch.Tensor, uw: torch.Tensor) -> torch.Tensor:
        """out[b, :, i, j] = x[b, :, i + dh_b, j + dw_b], zero outside; |d| <= round(side * ratio)."""
        B, _, H, W = x.shape
        max_h, max_w = round(H * self.translation), round(W * self.translation)
        dh = (uh * (2 * max_h + 1)).floor().long() - max_h
        dw = (uw * (2 * max_w + 1)).floor().long() - max_w
        rows = torch.arange(H, device=x.device)[None, :] + dh[:, None]      # [B, H]
        cols = torch.arange(W, device=x.device)[None, :] + dw[:, None]      # [B, W]
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1))                    # zero border at index 0 / H+1
        rows = (rows + 1).clamp(0, H + 1)
        cols = (cols + 1).clamp(0, W + 1)
        b = torch.arange(B, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def _cutout_mask(self, B: int, H: int, W: int, uh: torch.Tensor, uw: torch.Tensor,
                     like: torch.Tensor) -> torch.Tensor:
        """1 everywhere except a round(side * cutout) square centred at a random offset (clipped at edges)."""
        ch, cw = round(H * self.cutout), round(W * self.cutout)
        top = (uh * (H + (1 - ch % 2))).floor().long() - ch // 2
        left = (uw * (W + (1 - cw % 2))).floor().long() - cw // 2
        r = torch.arange(H, device=like.device)[None, :]
        c = torch.arange(W, device=like.device)[None, :]
        in_r = (r >= top[:, None]) & (r < top[:, None] + ch)                  # [B, H]
        in_c = (c >= left[:, None]) & (c < left[:, None] + cw)                # [B, W]
        return (~(in_r[:, :, None] & in_c[:, None, :])).to(like.dtype)


__all__ = ["DiffAug"]
