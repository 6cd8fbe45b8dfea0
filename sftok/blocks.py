"""Transformer blocks shared by the encoder and the multi-step decoder (SPEC B.1).

The official code uses ``torch.nn.MultiheadAttention`` in sequence-first layout. We keep its state-dict
names (``ln_1``, ``attn.in_proj_weight``, ``attn.in_proj_bias``, ``attn.out_proj``, ``ln_2``,
``mlp.c_fc``, ``mlp.c_proj``) so official checkpoints load unchanged, but compute batch-first with
``F.scaled_dot_product_attention`` (the fused kernel; the official MHA also ends in SDPA when
``need_weights=False``, so the numbers agree to float rounding).

``attention_impl("math")`` switches every block to a plain matmul-softmax attention: the eager baseline
that ``bench/bench_core.py`` measures the fused path against.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# ViT sizes shared by the encoder and the multi-step decoder (SPEC B.1); sftok.registry names models by them.
# name: (width, layers, heads)
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 2, 4),
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}

_ATTENTION_IMPL = "sdpa"


@contextlib.contextmanager
def attention_impl(name: str):
    """Temporarily select the attention kernel: ``"sdpa"`` (default, fused) or ``"math"`` (naive)."""
    global _ATTENTION_IMPL
    if name not in ("sdpa", "math"):
        raise ValueError(f"attention impl {name!r}: use 'sdpa' or 'math'.")
    old, _ATTENTION_IMPL = _ATTENTION_IMPL, name
    try:
        yield
    finally:
        _ATTENTION_IMPL = old


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention, softmax(q k^T / sqrt(d)) v, materialising the full score matrix."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


def attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention over [B, heads, L, d] with the kernel :func:`attention_impl` selected."""
    if _ATTENTION_IMPL == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    return _math_attention(q, k, v)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with ``nn.MultiheadAttention``'s parameter layout.

    ``in_proj_weight`` is [Wq; Wk; Wv] stacked by rows (3W x W); heads are contiguous slices of each.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}.")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's own init (xavier on the packed projection, zero biases)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, L, W]
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention_kernel(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, W))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x += Attn(LN(x)); x += MLP(LN(x)). Exact GELU, LayerNorm eps 1e-5."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", nn.GELU()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def init_official_(module: nn.Module, std: float = 0.02) -> None:
    """``SFTok._init_weights``: trunc-normal(0.02) Linear/Conv/Embedding weights, zero biases, LN = 1/0.

    ``std`` is 0.02 officially. At width 128 (the tiny preset) 0.02 makes the residual branches so small
    that stage 1 barely moves in hundreds of steps; the tiny preset uses ~width^-0.5 (model.init_std).

    Applied (like the official code) to the encoder, decoder and latent queries before the quantizer and
    the pixel head exist. The packed attention projection is a raw parameter and keeps its xavier init.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
