"""Learning tests: short CPU training runs that must beat a stated baseline, so a change that breaks a
gradient path (a detached tensor, a wrong init, a dead quantizer) fails CI rather than shipping a platform
that trains nothing. They use the ``tiny`` preset's architecture and init, on synthetic images made here,
and assert quality against the best constant prediction (the mean image) or the majority code; nothing is
timed (each run takes seconds).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sftok_platform.config import load_config
from sftok.maskgit_vqgan import MaskGITVQGAN, init_scaled_
from sftok.model import SFTok
from sftok.objectives import stage0_loss, stage1_loss
from sftok_platform.data.synthetic import render


def _images(n: int, size: int, split: str = "train") -> torch.Tensor:
    """``n`` synthetic images (all ten classes) resized to ``size`` px, [n,3,size,size] in [0,1]."""
    out = []
    for i in range(n):
        arr, _ = render(i, seed=0, split=split, size=128)
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(255)[None]
        out.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(out).clamp(0, 1)


def _psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    mse = ((x.clamp(0, 1) - y) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()


def _mean_image_psnr(images: torch.Tensor) -> float:
    return _psnr(images.mean(0, keepdim=True).expand_as(images), images)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


def _teacher(cfg) -> MaskGITVQGAN:
    t = cfg.teacher
    return init_scaled_(MaskGITVQGAN(t.hidden_channels, t.codebook_size, t.z_channels, cfg.teacher_arch()))


def _adam(params, lr=1e-3):
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))


def test_tiny_teacher_learns_beyond_the_mean_image(cfg):
    """Stage 0 with the tiny preset's teacher: 80 steps on 16 images must clear the mean image by 3 dB."""
    torch.manual_seed(0)
    images = _images(16, cfg.model.image_size)
    teacher = _teacher(cfg)
    opt = _adam(teacher.parameters())
    before = _psnr(teacher.decode_codes(teacher.encode_codes(images)), images)
    for _ in range(80):
        loss, _ = stage0_loss(teacher, images)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = _psnr(teacher.decode_codes(teacher.encode_codes(images)), images)
    baseline = _mean_image_psnr(images)
    assert after > baseline + 3.0, (before, after, baseline)


def test_official_teacher_layout_is_kept_for_b64(cfg):
    """The tiny layout is a preset choice: the default (b64/l64) config keeps the released f16 layout."""
    b64 = load_config("b64")
    arch = b64.teacher_arch()
    assert arch.channel_mult == (1, 1, 2, 2, 4) and arch.num_res_blocks == 2 and arch.norm_groups == 32
    assert arch.shortcut == "output" and b64.teacher.init == "torch" and b64.model.init_std == 0.02
    factor = cfg.teacher_arch().downsample_factor
    assert factor == 4 and cfg.model.num_proxy_codes == (cfg.model.image_size // factor) ** 2 == 64


def test_tiny_stage1_learns_teacher_codes_beyond_the_majority_code(cfg):
    """Stage 1 with the tiny preset's ViTs and init: 60 steps on 8 images must beat the majority-code rate
    by 30 points of token accuracy (the gradient reaches the decoder, the encoder and the latent tokens)."""
    torch.manual_seed(0)
    images = _images(8, cfg.model.image_size)
    # target codes: each f x f patch's mean colour quantised to 4 levels per channel (64 of the 256 codes),
    # a fixed, learnable function of the image standing in for a trained teacher's codes
    f = cfg.model.image_size // int(cfg.model.num_proxy_codes ** 0.5)
    level = (F.avg_pool2d(images, f) * 3.999).floor().long()                    # [8,3,8,8] in 0..3
    codes = (level[:, 0] * 16 + level[:, 1] * 4 + level[:, 2]).flatten(1)      # [8,64] row-major
    model = SFTok(dataclasses.replace(cfg.model, pixel_head=False))
    opt = _adam([p for p in model.parameters() if p.requires_grad])
    encoder_before = model.encoder.patch_embed.weight.detach().clone()
    for _ in range(60):
        loss, _ = stage1_loss(model, images, codes)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        ids = torch.full_like(codes, model.mask_id)
        logits, _ = model(images, ids)
    accuracy = (logits.argmax(-1) == codes).float().mean().item()
    majority = (codes == codes.flatten().mode().values).float().mean().item()
    assert accuracy > majority + 0.30, (accuracy, majority)
    assert not torch.equal(model.encoder.patch_embed.weight, encoder_before)   # the encoder is trained too
