"""The stage-3 DINO discriminator (official ``discriminator_dino.py``, from StyleGAN-T's projected D).

A frozen self-supervised ViT (DINO ViT-S/16: width 384, 12 blocks, 6 heads, 224x224, 196 patches) reads
the image; token features are taken before the first block and after blocks 2, 5, 8 and 11, the CLS
feature is added to every patch token, and five small trainable heads turn each [B, C, 196] map into
per-token logits. Output: [B, 5 * 196] logits (positive = "real").

Head: [1x1 spectral-norm Conv1d -> BatchNormLocal(virtual batch 8) -> LeakyReLU(0.2)] -> residual
[circular kernel-9 spectral-norm Conv1d -> BatchNormLocal -> LeakyReLU(0.2)] / sqrt(2) -> 1x1 spectral-norm
Conv1d to one channel.

The backbone is a timm ``VisionTransformer`` loaded strictly from the original DINO/DeiT key layout
(``cls_token``, ``pos_embed`` [1,197,C], ``patch_embed.proj``, ``blocks.N.attn.qkv``, ``norm``), e.g.
``dino_deitsmall16_pretrain.pth`` (config key ``losses.dino_weights``). It is never trained and never saved
with the discriminator (only the heads are). Like the official code, the key part of every qkv bias is
zeroed after loading; this changes nothing (a constant added to all keys cancels in the softmax) but keeps
the weights identical to the official ones.

``arch="tiny"`` is a narrow 12-block ViT with the same structure, for fast tests and CPU smoke runs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from sftok.weights import exclude_from_state_dict, read_state_dict, resolve_weight, strip_prefixes

DINO_ARCHS: dict[str, dict] = {
    "vit_s16": dict(embed_dim=384, depth=12, num_heads=6),   # DINO ViT-S/16 (the official discriminator)
    "tiny": dict(embed_dim=32, depth=12, num_heads=2),       # tests / CPU smoke runs only
}
FEATURE_BLOCKS = (2, 5, 8, 11)     # features after these blocks, plus the tokens before block 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BatchNormLocal(nn.Module):
    """Batch norm over "virtual batches" of ``virtual_bs`` samples (statistics per group, no running stats).

    Input [B, C, L]; the mean/variance of each channel are taken over the group's samples and the L
    tokens. Groups as in the official code: ceil(B / virtual_bs) equal groups; when B does not divide
    evenly (where the official reshape would fail), consecutive chunks of ``virtual_bs``.
    """

    def __init__(self, num_features: int, virtual_bs: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual_bs = virtual_bs
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:        # x: [G, n, C, L]
        mean = x.mean(dim=(1, 3), keepdim=True)
        var = x.var(dim=(1, 3), keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, L = x.shape
        groups = math.ceil(B / self.virtual_bs)
        if B % groups == 0:
            x = self._normalise(x.view(groups, B // groups, C, L)).view(B, C, L)
        else:
            x = torch.cat([self._normalise(c.unsqueeze(0)).squeeze(0) for c in x.split(self.virtual_bs)])
        return x * self.weight[None, :, None] + self.bias[None, :, None]


def _sn_conv(c_in: int, c_out: int, kernel: int) -> nn.Module:
    conv = nn.Conv1d(c_in, c_out, kernel_size=kernel, padding=kernel // 2, padding_mode="circular")
    return spectral_norm(conv, n_power_iterations=1, eps=1e-12, dim=0)


def _block(channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(_sn_conv(channels, channels, kernel), BatchNormLocal(channels), nn.LeakyReLU(0.2))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) * (1.0 / math.sqrt(2.0))


class DiscHead(nn.Module):
    """[B, C, L] token features -> [B, 1, L] logits."""

    def __init__(self, channels: int):
        super().__init__()
        self.main = nn.Sequential(_block(channels, 1), _Residual(_block(channels, 9)))
        self.cls = _sn_conv(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.main(x))


def build_dino_backbone(arch: str = "vit_s16") -> nn.Module:
    """A timm ViT with the DINO key layout (no classifier head)."""
    from timm.models.vision_transformer import VisionTransformer
    if arch not in DINO_ARCHS:
        raise ValueError(f"unknown DINO arch {arch!r}; use one of {sorted(DINO_ARCHS)} (losses.dino_arch).")
    return VisionTransformer(img_size=224, patch_size=16, num_classes=0, qkv_bias=True, **DINO_ARCHS[arch])


def load_dino_backbone(backbone: nn.Module, path, key: str = "losses.dino_weights") -> None:
    """Strict load of a DINO/DeiT-layout state_dict (``module.``/``backbone.`` prefixes and heads dropped)."""
    sd = strip_prefixes(read_state_dict(path, key), ("module.",))
    if any(k.startswith("backbone.") for k in sd):       # DINO training checkpoint: backbone.* + head.*
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}     # DINO projection / DeiT classifier
    own = backbone.state_dict()
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    bad_shape = [k for k in own.keys() & sd.keys() if own[k].shape != sd[k].shape]
    if missing or unexpected or bad_shape:
        shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in bad_shape[:3]]
        raise ValueError(
            f"{key}={str(path)!r} does not match the DINO ViT ({len(own)} tensors, e.g. cls_token, pos_embed "
            f"{tuple(own['pos_embed'].shape)}, blocks.N.attn.qkv): missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, shape mismatches {shapes}. Use a DINO ViT-S/16 checkpoint "
            f"(dino_deitsmall16_pretrain.pth) with losses.dino_arch=vit_s16.")
    backbone.load_state_dict(sd, strict=True)


class DinoDiscriminator(nn.Module):
    """``D(x in [0,1], generator=None) -> [B, 5 * 196]`` logits. Trainable: the five heads only."""

    def __init__(self, weights: Optional[str] = "", *, arch: str = "vit_s16", allow_random: bool = False,
                 crop_prob: float = 0.5, virtual_bs: int = 8):
        super().__init__()
        self.backbone = build_dino_backbone(arch)
        path = resolve_weight(weights, "losses.dino_weights", allow_random=allow_random)
        if path is not None:
            load_dino_backbone(self.backbone, path)
        self.random_backbone = path is None
        dim = self.backbone.embed_dim
        with torch.no_grad():
            for blk in self.backbone.blocks:            # official: zero the k-part of the qkv bias (a no-op)
                blk.attn.qkv.bias[dim:2 * dim].zero_()
        self.backbone.requires_grad_(False).eval()
        exclude_from_state_dict(self, "backbone")
        self.crop_prob = crop_prob
        self.resolution = 224
        self.heads = nn.ModuleList(DiscHead(dim) for _ in range(len(FEATURE_BLOCKS) + 1))
        if virtual_bs != 8:
            for m in self.heads.modules():
                if isinstance(m, BatchNormLocal):
                    m.virtual_bs = virtual_bs
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "DinoDiscriminator":
        super().train(mode)
        self.backbone.eval()            # frozen backbone: always eval
        return self

    def _to_224(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Random 224 crop with probability ``crop_prob`` (same crop for the batch), else area resize."""
        H, W = x.shape[-2:]
        if (H, W) == (self.resolution, self.resolution):
            return x
        u = torch.rand(3, generator=generator,
                       device=generator.device if generator is not None else "cpu").tolist()
        if H > self.resolution and W > self.resolution and u[0] < self.crop_prob:
            top = int(u[1] * (H - self.resolution + 1))
            left = int(u[2] * (W - self.resolution + 1))
            return x[..., top:top + self.resolution, left:left + self.resolution]
        return F.interpolate(x, size=(self.resolution, self.resolution), mode="area")

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Token features [B, C, 196] after blocks 2, 5, 8, 11 and before block 0 (CLS added to each token)."""
        vit = self.backbone
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        taps = {-1: h}
        for i, blk in enumerate(vit.blocks):
            h = blk(h)
            if i in FEATURE_BLOCKS:
                taps[i] = h
            if i >= FEATURE_BLOCKS[-1]:
                break
        order = list(FEATURE_BLOCKS) + [-1]                  # official head order: hooks, then the patch tap
        n_prefix = vit.num_prefix_tokens
        return [(taps[i][:, n_prefix:] + taps[i][:, :1]).transpose(1, 2) for i in order]

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DinoDiscriminator expects images [B,3,H,W] in [0,1], got {tuple(x.shape)}.")
        x = self._to_224(x, generator)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        B = x.shape[0]
        return torch.cat([head(f).view(B, -1) for head, f in zip(self.heads, self.features(x))], dim=1)


__all__ = ["DinoDiscriminator", "DiscHead", "BatchNormLocal", "DINO_ARCHS", "FEATURE_BLOCKS",
           "build_dino_backbone", "load_dino_backbone"]
