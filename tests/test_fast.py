"""The opt-in fast inference path (sftok.fast): int8 transformer matmuls, bf16 pixel decoder.

What is asserted is behaviour, not speed (bench/bench_official.py prints the speed): the int8 layers compute
the same function as the fp32 ones to int8 rounding, the fast copy leaves the original model untouched, and
a fast encode/decode has the exact path's shapes and dtypes and stays close to its logits and images.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sftok
from sftok.blocks import Attention
from sftok.fast import Int8Attention, Int8Linear, fast_inference


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_the_fp32_linear_to_int8_rounding(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    x = torch.randn(3, 17, 96)
    q = Int8Linear.from_linear(linear)
    with torch.no_grad():
        exact, approx = linear(x), q(x)
    assert approx.shape == exact.shape and approx.dtype == torch.float32
    # per-row activation and per-channel weight scales: ~0.5% rms error for Gaussian data
    assert _relative_error(approx, exact) < 0.02
    # a zero row stays exactly the bias (no division by a zero scale)
    zero = torch.zeros(1, 96)
    with torch.no_grad():
        assert torch.equal(q(zero), linear(zero)) if bias else torch.equal(q(zero), torch.zeros(1, 200))


def test_int8_attention_matches_the_fp32_block():
    torch.manual_seed(0)
    attn = Attention(64, 4)
    nn.init.normal_(attn.in_proj_bias, std=0.1)
    x = torch.randn(2, 33, 64)
    with torch.no_grad():
        assert _relative_error(Int8Attention(attn)(x), attn(x)) < 0.03


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return sftok.create_model("sftok_tiny").eval()


def test_fast_inference_is_a_converted_copy(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    fast = fast_inference(tiny, bf16_pixel=True)
    # the original is untouched: same modules, same weights
    assert all(isinstance(b.attn, Attention) and isinstance(b.mlp.c_fc, nn.Linear) for b in tiny.decoder.transformer)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert tiny.pixel_decoder.conv_in.weight.dtype == torch.float32
    # the copy: int8 blocks in encoder and decoder, bf16 pixel decoder, nothing trainable
    for module in (fast.encoder, fast.decoder):
        for block in module.transformer:
            assert isinstance(block.attn, Int8Attention)
            assert isinstance(block.mlp.c_fc, Int8Linear) and isinstance(block.mlp.c_proj, Int8Linear)
    assert fast.pixel_decoder.conv_in.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in fast.parameters())


def test_fast_decode_has_the_exact_paths_shapes_and_stays_close(tiny):
    fast = fast_inference(tiny, bf16_pixel=True)
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        tokens = tiny.encode(images)
        fast_tokens = fast.encode(images)
        assert fast_tokens.shape == tokens.shape and fast_tokens.dtype == torch.long
        z = tiny.tokens_to_latents(tokens)
        ids = torch.full((2, tiny.cfg.num_proxy_codes), tiny.mask_id)
        # one decoder pass on the same input: logits to int8 rounding
        assert _relative_error(fast.decoder(ids, z), tiny.decoder(ids, z)) < 0.05
        exact = tiny.decode_tokens(tokens, 8, 0.0)
        approx = fast.decode_tokens(tokens, 8, 0.0)
    assert approx.shape == exact.shape and approx.dtype == torch.float32
    mse = (approx.clamp(0, 1) - exact.clamp(0, 1)).pow(2).mean().item()
    assert 10 * torch.log10(torch.tensor(1.0 / mse)).item() > 30        # bf16 pixel decoder + int8 logits
