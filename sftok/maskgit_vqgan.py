"""MaskGIT-VQGAN f16 (the open-muse port TiTok and SFTok use): the teacher and the stage-3 pixel head (SPEC B.4).

Convolutions use TensorFlow "same" padding, which for the stride-1, odd-kernel convs used here is a static
symmetric pad: the plain ``nn.Conv2d`` that timm's ``create_conv2d(padding="same")`` builds for them, made
directly (importing ``timm.layers`` pulls in torchvision and ``torch._dynamo``, ~1 s in every process).
GroupNorm(32, eps 1e-6) + SiLU, no attention. Quirk kept on purpose: in a ResNet block whose channel count changes, the 1x1 ``nin_shortcut``
is applied to the block's *output* (out = h + nin(h)); the released weights depend on it.

Modules are constructed in the official order so that ``torch.manual_seed(s)`` + construction draws the
same random weights as the official classes.

:class:`VQGANArch` holds the architecture knobs beyond the widths. Its defaults are the released teacher and
are what ``b64``/``l64`` and the reference tests use. The CPU ``tiny`` preset changes them (fewer levels,
no GroupNorm, the standard input shortcut, :func:`init_scaled_`) because the official f16 layout at width 32
stays at the mean image for hundreds of steps on small data (README, "Why the tiny teacher differs").
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sftok.weights import read_state_dict

CHANNEL_MULT = (1, 1, 2, 2, 4)
TEACHER_FILE = "maskgit-vqgan-imagenet-f16-256.bin"
TEACHER_SOURCE = "the Hugging Face repo fun-research/TiTok"


SHORTCUTS = ("output", "input")


@dataclass(frozen=True)
class VQGANArch:
    """Layout of a MaskGIT-VQGAN beyond its widths; the defaults are the released f16 teacher.

    ``channel_mult``: width multiplier per level; ``len - 1`` average-pool halvings (5 levels = f16).
    ``norm_groups``: GroupNorm groups (32 official; 0 = no normalisation, the tiny preset's choice).
    ``shortcut``: where a width-changing block's 1x1 ``nin_shortcut`` acts: ``"output"`` is the port's quirk
    (out = h + nin(h), needed by the released weights); ``"input"`` is the standard residual (out = h + nin(x)).
    """
    channel_mult: tuple[int, ...] = CHANNEL_MULT
    num_res_blocks: int = 2
    norm_groups: int = 32
    shortcut: str = "output"

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult={self.channel_mult}: need at least one level, multipliers >= 1.")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks={self.num_res_blocks}: need at least 1.")
        if self.norm_groups < 0:
            raise ValueError(f"norm_groups={self.norm_groups}: use a positive group count or 0 (no norm).")
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut={self.shortcut!r}: use one of {SHORTCUTS}.")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d


OFFICIAL_ARCH = VQGANArch()


def _conv(cin: int, cout: int, k: int, bias: bool = True) -> nn.Conv2d:
    if k % 2 != 1:
        raise ValueError(f"kernel size {k}: TF 'same' padding is a static symmetric pad only for odd kernels")
    return nn.Conv2d(cin, cout, k, padding=(k - 1) // 2, bias=bias)


def _norm(c: int, groups: int = 32) -> nn.Module:
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True) if groups else nn.Identity()


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, arch: VQGANArch = OFFICIAL_ARCH):
        super().__init__()
        self.norm1 = _norm(cin, arch.norm_groups)
        self.conv1 = _conv(cin, cout, 3, bias=False)
        self.norm2 = _norm(cout, arch.norm_groups)
        self.conv2 = _conv(cout, cout, 3, bias=False)
        self.shortcut_on_input = arch.shortcut == "input"
        if cin != cout:   # official: acts on the output (port quirk); "input": the standard residual
            self.nin_shortcut = _conv(cin if self.shortcut_on_input else cout, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if not hasattr(self, "nin_shortcut"):
            return h + x
        return h + self.nin_shortcut(x if self.shortcut_on_input else h)


class DownsamplingBlock(nn.Module):
    def __init__(self, hidden: int, level: int, arch: VQGANArch = OFFICIAL_ARCH):
        super().__init__()
        mult = arch.channel_mult
        mult_in = (1,) + mult
        cin, cout = hidden * mult_in[level], hidden * mult[level]
        self.block = nn.ModuleList()
        for _ in range(arch.num_res_blocks):
            self.block.append(ResnetBlock(cin, cout, arch))
            cin = cout
        self.downsample = level != len(mult) - 1

    def forward(self, x):
        for b in self.block:
            x = b(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2) if self.downsample else x


class UpsamplingBlock(nn.Module):
    def __init__(self, hidden: int, level: int, arch: VQGANArch = OFFICIAL_ARCH):
        super().__init__()
        mult = arch.channel_mult
        last = level == len(mult) - 1
        cin = hidden * (mult[-1] if last else mult[level + 1])
        cout = hidden * mult[level]
        self.block = nn.ModuleList()
        for _ in range(arch.num_res_blocks):
            self.block.append(ResnetBlock(cin, cout, arch))
            cin = cout
        self.add_upsample = level != 0
        if self.add_upsample:
            self.upsample_conv = _conv(cout, cout, 3)

    def forward(self, x):
        for b in self.block:
            x = b(x)
        if self.add_upsample:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    """[B,3,256,256] in [0,1] -> [B, z_channels, 16, 16] (official arch; /arch.downsample_factor in general)."""

    def __init__(self, hidden_channels: int = 128, z_channels: int = 256, arch: VQGANArch = OFFICIAL_ARCH):
        super().__init__()
        self.conv_in = _conv(3, hidden_channels, 3, bias=False)
        self.down = nn.ModuleList([DownsamplingBlock(hidden_channels, i, arch)
                                   for i in range(len(arch.channel_mult))])
        mid = hidden_channels * arch.channel_mult[-1]
        self.mid = nn.ModuleList([ResnetBlock(mid, mid, arch) for _ in range(arch.num_res_blocks)])
        self.norm_out = _norm(mid, arch.norm_groups)
        self.conv_out = _conv(mid, z_channels, 1)

    def forward(self, x):
        x = self.conv_in(x)
        for b in self.down:
            x = b(x)
        for b in self.mid:
            x = b(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """[B, z_channels, 16, 16] -> [B, 3, 256, 256] (unclamped). Levels run up.4 -> up.0."""

    def __init__(self, hidden_channels: int = 128, z_channels: int = 256, arch: VQGANArch = OFFICIAL_ARCH):
        super().__init__()
        mult = arch.channel_mult
        block_in = hidden_channels * mult[-1]
        self.conv_in = _conv(z_channels, block_in, 3)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, arch) for _ in range(arch.num_res_blocks)])
        # built lowest resolution first (official construction order), stored as up.0 .. up.4
        ups = [UpsamplingBlock(hidden_channels, i, arch) for i in reversed(range(len(mult)))]
        self.up = nn.ModuleList(list(reversed(ups)))
        self.norm_out = _norm(hidden_channels * mult[0], arch.norm_groups)
        self.conv_out = _conv(hidden_channels * mult[0], 3, 3)

    def forward(self, x):
        x = self.conv_in(x)
        for b in self.mid:
            x = b(x)
        for b in reversed(self.up):
            x = b(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    """Plain squared-L2 argmin over an Embedding(codebook_size, dim) codebook (no normalisation)."""

    def __init__(self, num_embeddings: int = 1024, embedding_dim: int = 256, commitment_cost: float = 0.25):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.commitment_cost = num_embeddings, embedding_dim, commitment_cost
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.embedding.weight.data.uniform_(-1.0 / num_embeddings, 1.0 / num_embeddings)

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> argmin code ids [B, H*W] (row-major), same arithmetic as the port (addmm)."""
        flat = h.permute(0, 2, 3, 1).reshape(-1, self.embedding_dim)
        e = self.embedding.weight.t()
        d = torch.addmm(flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(0, keepdim=True), flat, e, alpha=-2.0)
        return d.argmin(dim=1).view(h.shape[0], -1)

    def get_codebook_entry(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, N] (N a square) -> [B, dim, sqrt(N), sqrt(N)]."""
        B, N = ids.shape
        side = math.isqrt(N)
        return self.embedding(ids).view(B, side, side, -1).permute(0, 3, 1, 2)

    def forward(self, h: torch.Tensor):
        """Straight-through quantization with the port's loss (codebook + commitment-weighted term)."""
        ids = self.codes(h)
        z_q = self.get_codebook_entry(ids)
        # the port weights the *codebook* term with commitment_cost (its naming is swapped); kept as is
        loss = torch.mean((z_q.detach() - h) ** 2) + self.commitment_cost * torch.mean((z_q - h.detach()) ** 2)
        return h + (z_q - h).detach(), ids, loss


class MaskGITVQGAN(nn.Module):
    """The teacher: ``encoder``, ``decoder``, ``quantize`` with the official checkpoint keys."""

    def __init__(self, hidden_channels: int = 128, codebook_size: int = 1024, z_channels: int = 256,
                 arch: VQGANArch = OFFICIAL_ARCH):
        super().__init__()
        self.hidden_channels, self.arch = hidden_channels, arch
        self.encoder = Encoder(hidden_channels, z_channels, arch)
        self.decoder = Decoder(hidden_channels, z_channels, arch)
        self.quantize = VectorQuantizer(codebook_size, z_channels)

    @torch.no_grad()
    def encode_codes(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [0,1] -> proxy codes [B, (H/f)*(W/f)] (row-major; f = 16 official).

        Always at the weights' precision with autocast off: the codes are the training targets, and under a
        caller's bf16 autocast near-tie argmins flip, so training and the end-of-stage validation (outside
        autocast) would see different targets for the same image."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.quantize.codes(self.encoder(images.to(self.quantize.embedding.weight.dtype)))

    @torch.no_grad()
    def decode_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Proxy codes [B, N] (official: 256) -> images [B,3,H,W] clamped to [0,1]."""
        return self.decoder(self.quantize.get_codebook_entry(ids)).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor):
        """Trainable path (stage 0): (unclamped reconstruction, {"quantizer_loss", "codes", "latents"}), where
        ``latents`` is the encoder output the quantizer saw (stage 0's dead-code restarts re-seed from it)."""
        z = self.encoder(images)
        z_q, ids, loss = self.quantize(z)
        return self.decoder(z_q), {"quantizer_loss": loss, "codes": ids, "latents": z}


def init_scaled_(model: nn.Module) -> nn.Module:
    """Stage-0 init for small from-scratch teachers: He-normal convs, zero biases, and a zeroed last conv
    in every ResNet block, so each block starts as its shortcut (the "zero-init residual" of Goyal et al.).

    Why: with torch's default conv init the narrow official layout sits at the mean image for hundreds
    of steps; with this init the network starts as a shallow linear-ish autoencoder and learns at once.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, ResnetBlock):
            nn.init.zeros_(m.conv2.weight)
    return model


def load_teacher(path: str | os.PathLike, hidden_channels: int = 128, codebook_size: int = 1024,
                 z_channels: int = 256, arch: VQGANArch | dict | None = None) -> MaskGITVQGAN:
    """Strictly load the official teacher weights (``.bin`` via weights_only, or ``.safetensors``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher weights not found at {str(path)!r}. Download {TEACHER_FILE} from {TEACHER_SOURCE} "
            f"and set teacher.weights to its local path (nothing is downloaded at run time), or leave it "
            f"empty to train a teacher on your data first (stage 0).")
    state = read_state_dict(path)
    arch = VQGANArch(**arch) if isinstance(arch, dict) else (arch or OFFICIAL_ARCH)
    teacher = MaskGITVQGAN(hidden_channels, codebook_size, z_channels, arch)
    try:
        teacher.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not a MaskGIT-VQGAN checkpoint with hidden_channels={hidden_channels}, "
                         f"{arch}: {_short(e)} Check teacher.hidden_channels (official: 128) and the teacher "
                         f"layout keys (official: channel_mult [1,1,2,2,4], 2 res blocks).") from None
    teacher.eval().requires_grad_(False)
    return teacher


def _short(e: Exception, limit: int = 600) -> str:
    s = str(e)
    return s if len(s) <= limit else s[:limit] + " ..."
