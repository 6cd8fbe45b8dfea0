"""Opt-in fast CPU inference: int8 transformer matmuls (VNNI) and a bf16 pixel decoder.

The exact fp32 path already runs its matmuls at the machine's SGEMM rate (BENCHMARKS.md, "Against the
official code"), so a large CPU speed-up has to come from cheaper arithmetic, not from a better kernel:

* every ``nn.Linear`` and packed attention projection of the ViT decoder (and encoder) becomes an
  :class:`Int8Linear`: per-output-channel symmetric int8 weights, activations quantised per token at run
  time, ``torch._int_mm`` (int8 x int8 -> int32; VNNI on x86) and one fp32 rescale. That is ~4x the fp32
  matmul rate on an AVX-512 VNNI CPU (751 vs 186 GOP/s measured for a 321x768x3072 product).
* the pixel decoder (MaskGIT-VQGAN, the 256x256 convolutions) runs in bf16 with channels-last weights
  where the CPU has native bf16 (``avx512_bf16`` / AMX); elsewhere it stays fp32.

Outputs are not bit-equal to the exact path: BENCHMARKS.md gives the measured id agreement and the image
PSNR against the exact path. Use :func:`fast_inference`; the original model is left untouched.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from sftok.blocks import Attention, attention_kernel

__all__ = ["Int8Linear", "fast_inference", "native_bf16"]


def native_bf16() -> bool:
    """True where oneDNN has native bf16 kernels on this CPU (AVX-512 BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with int8 W (per output channel) and x quantised per row at call time.

    Weights are stored transposed ([in, out], int8, contiguous): the layout ``torch._int_mm`` runs fastest
    on CPU. An all-zero row of x gives exactly the bias (its scale is clamped above 0). Inference only.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0                   # [out]
        self.register_buffer("weight_t", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        x_scale = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127.0)     # [rows, 1]
        xq = (x2 / x_scale).round_().to(torch.int8)
        y = torch.mul(torch._int_mm(xq, self.weight_t), self.weight_scale)      # int32 [rows, out] -> fp32
        y.mul_(x_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Attention(nn.Module):
    """:class:`sftok.blocks.Attention` with both projections in :class:`Int8Linear`."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.heads = attn.heads
        self.in_proj = Int8Linear(attn.in_proj_weight, attn.in_proj_bias)
        self.out_proj = Int8Linear.from_linear(attn.out_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        q, k, v = self.in_proj(x).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention_kernel(q, k, v)      # fp32: the bf16 CPU flash kernel measured no faster here
        return self.out_proj(out.transpose(1, 2).reshape(B, L, W))


def quantize_transformer_int8(module: nn.Module) -> nn.Module:
    """In place: every :class:`Attention` and every ``nn.Linear`` inside ``module``'s transformer blocks
    becomes its int8 counterpart (embeddings, heads and 1x1 convs keep fp32)."""
    for block in module.transformer:
        block.attn = Int8Attention(block.attn)
        block.mlp.c_fc = Int8Linear.from_linear(block.mlp.c_fc)
        block.mlp.c_proj = Int8Linear.from_linear(block.mlp.c_proj)
    return module


def _float32_output(_module, _args, output: torch.Tensor) -> torch.Tensor:
    return output.float()


@torch.no_grad()
def fast_inference(model, *, int8: bool = True, bf16_pixel: bool | None = None):
    """A copy of ``model`` (an :class:`sftok.SFTok`) for fast CPU inference; ``model`` is not changed.

    ``int8``: the encoder and decoder transformer blocks in :class:`Int8Linear` (needs a CPU build of torch
    with ``torch._int_mm``; x86 with VNNI is where it pays). ``bf16_pixel``: the pixel decoder in bf16,
    channels-last (default: where :func:`native_bf16`). Decoding still samples from fp32 logits.
    """
    if int8 and not hasattr(torch, "_int_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no torch._int_mm (int8 matmul); use "
                           "fast_inference(model, int8=False) for the bf16 pixel decoder alone.")
    fast = copy.deepcopy(model).eval()
    bf16_pixel = native_bf16() if bf16_pixel is None else bf16_pixel
    if int8:
        quantize_transformer_int8(fast.encoder)
        quantize_transformer_int8(fast.decoder)
    if bf16_pixel and getattr(fast.cfg, "pixel_head", False):
        fast.pixel_decoder.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
        fast.pixel_decoder.register_forward_hook(_float32_output)     # callers get fp32 images, as before
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast
