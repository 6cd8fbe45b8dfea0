"""LPIPS-VGG perceptual distance, as the official stage 3 uses it (taming-transformers / TiTok flavour).

VGG16 features (torchvision layout) at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; each map is unit-normalised
over channels, the squared difference goes through a learned 1x1 "linear head" (lin0..lin4, no bias), is
averaged over space and summed over the five layers. Inputs are images in [0, 1], mapped to [-1, 1] and
then through LPIPS' fixed scaling layer. The network is frozen (eval, no parameter gradients); the gradient
flows to the images.

Weights are two local files (nothing is downloaded): ``losses.vgg16_weights`` (the torchvision VGG16
ImageNet state_dict, keys ``features.N.*``; ``classifier.*`` is ignored) and ``losses.lpips_heads``
(``lin{k}.model.1.weight``, as in the lpips package / taming ``vgg.pth``). Random weights only when asked
(see :mod:`sftok.weights`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sftok.weights import read_state_dict, resolve_weight

# torchvision vgg16.features index ranges ending at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 ``features[:30]`` (its init), without building the 100M-parameter classifier."""
    from torchvision.models.vgg import cfgs, make_layers
    features = make_layers(cfgs["D"], batch_norm=False)[:30]
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return features


class LPIPS(nn.Module):
    """``LPIPS(vgg16_weights, heads_weights)(x, y) -> [B]`` distance per image pair (x, y in [0, 1])."""

    def __init__(self, vgg16_weights: Optional[str] = "", heads_weights: Optional[str] = "", *,
                 allow_random: bool = False):
        super().__init__()
        features = _vgg16_features()
        self.slices = nn.ModuleList(nn.Sequential(*features[a:b]) for a, b in _SLICES)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

        vgg_path = resolve_weight(vgg16_weights, "losses.vgg16_weights", allow_random=allow_random)
        heads_path = resolve_weight(heads_weights, "losses.lpips_heads", allow_random=allow_random)
        if vgg_path is not None:
            self._load_vgg(read_state_dict(vgg_path, "losses.vgg16_weights"), str(vgg_path))
        if heads_path is not None:
            self._load_heads(read_state_dict(heads_path, "losses.lpips_heads"), str(heads_path))
        else:   # random heads: positive, so the distance stays a (meaningless but) non-negative sum
            for head, c in zip(self.heads, _CHANNELS):
                nn.init.constant_(head.weight, 1.0 / c)
        self.random_backbone = vgg_path is None or heads_path is None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)      # frozen network: always eval

    def _load_vgg(self, sd: dict, where: str) -> None:
        feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        target = _vgg16_features()
        missing = set(target.state_dict()) - set(feats)
        if missing:
            raise ValueError(f"losses.vgg16_weights={where!r} is not a torchvision VGG16 state_dict: missing "
                             f"{sorted('features.' + m for m in missing)[:4]}... (expected keys features.N.weight/bias).")
        feats = {k: v for k, v in feats.items() if k in target.state_dict()}
        target.load_state_dict(feats, strict=True)
        for (a, b), sl in zip(_SLICES, self.slices):
            for i, layer in enumerate(sl):
                layer.load_state_dict(target[a + i].state_dict())

    def _load_heads(self, sd: dict, where: str) -> None:
        for k, head in enumerate(self.heads):
            w = sd.get(f"lin{k}.model.1.weight", sd.get(f"lin{k}.weight"))
            if w is None or tuple(w.shape) != tuple(head.weight.shape):
                raise ValueError(f"losses.lpips_heads={where!r}: expected lin{k}.model.1.weight of shape "
                                 f"{tuple(head.weight.shape)}, found {None if w is None else tuple(w.shape)}. "
                                 "Use the LPIPS v0.1 'vgg.pth'.")
            head.weight.data.copy_(w)

    def _features(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Channel-normalised fp32 feature maps at the five LPIPS layers."""
        h = img * 2.0 - 1.0
        h = (h - self.shift.to(h.dtype)) / self.scale.to(h.dtype)
        out = []
        for sl in self.slices:
            h = sl(h)
            f = h.float()
            out.append(f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two [B,3,H,W] images of equal shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}.")
        total = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
        # two passes, not one concatenated batch: an input without grad (the target) then builds no graph
        for head, fx, fy in zip(self.heads, self._features(x), self._features(y)):
            d = F.conv2d((fx - fy).pow(2), head.weight.float())
            total = total + d.mean(dim=(1, 2, 3))
        return total


__all__ = ["LPIPS"]
