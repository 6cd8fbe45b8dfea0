"""The FID Inception network (TF "2015-12-05" InceptionV3), from torch-fidelity 0.4.0, loaded from a local file.

What gives paper-comparable numbers (SPEC E): torch-fidelity's ``FeatureExtractorInceptionV3`` (TF1-compatible
bilinear resize of uint8 images to 299, 2048-d pool features, 1008-way ``logits_unbiased`` for IS) with the
FID weights ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release; torch-fidelity publishes the same
tensors as ``weights-inception-2015-12-05-6726825d.pth``). TiTok/SFTok's ``evaluator/inception.py`` does
exactly this.

Why a subclass: torch-fidelity's constructor downloads the weights when no path is given and otherwise
unpickles the file with ``weights_only=False``. Here the layers are built the same way (torch-fidelity's
own blocks, so the ``state_dict`` keys and ``forward`` are torch-fidelity's), the file is read with
``weights_only=True`` and loaded strictly, and nothing is ever downloaded. Without a path the network gets
seeded random weights and says so loudly: such FIDs are self-consistent (good for tests and for comparing
runs made with the same seed) but NOT comparable to any paper.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import (
    BasicConv2d, FeatureExtractorInceptionV3, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE_1,
    InceptionE_2,
)

from sftok.weights import read_state_dict

PAPER_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# Full SHA-256 of that file. torch.hub checks the 8-hex prefix in the name; the full digest is the one
# recorded for both pytorch-fid's pt_inception-... and torch-fidelity's weights-inception-... file.
PAPER_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
PAPER_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     "pt_inception-2015-12-05-6726825d.pth")
RANDOM_WEIGHTS_NOTE = "random Inception weights: numbers are NOT comparable to papers"

POOL_DIM = 2048
NUM_LOGITS = 1008


class FIDInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 feature extractor with local-only weights.

    ``forward(uint8 [B,3,H,W]) -> (pool [B,2048], logits_unbiased [B,1008])`` (float32). Any H, W: the
    input is resized to 299 inside with the TF1-compatible bilinear resize.

    Attributes: ``weights_path`` ('' when random), ``weights_sha256``, ``paper_comparable`` (True only for
    the file whose SHA-256 is :data:`PAPER_WEIGHTS_SHA256`), ``note`` (a warning line for reports or '').
    """

    def __init__(self, weights: str | os.PathLike | None = "", *, seed: int = 0, check_hash: bool = True):
        FeatureExtractorBase.__init__(self, "inception-v3-compat", ["2048", "logits_unbiased"])
        self.feature_extractor_internal_dtype = torch.float32
        # Same layers and names as torch_fidelity.FeatureExtractorInceptionV3.__init__ (0.4.0).
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE_1(1280)
        self.Mixed_7c = InceptionE_2(2048)
        self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)

        self.weights_path = str(weights) if weights else ""
        self.weights_sha256 = ""
        if self.weights_path:
            state, self.weights_sha256 = load_inception_state_dict(self.weights_path)
            try:
                self.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise ValueError(f"{self.weights_path} is not an FID InceptionV3 state_dict (expected the keys of "
                                 f"{PAPER_WEIGHTS_FILE}): {e}") from None
        else:
            _random_init(self, seed)
        self.paper_comparable = self.weights_sha256 == PAPER_WEIGHTS_SHA256
        if not self.weights_path:
            self.note = RANDOM_WEIGHTS_NOTE
        elif not self.paper_comparable:
            self.note = (f"Inception weights {Path(self.weights_path).name} (sha256 {self.weights_sha256[:12]}...) "
                         f"are not {PAPER_WEIGHTS_FILE}: numbers may not be comparable to papers")
            if check_hash:
                warnings.warn(self.note, stacklevel=2)
        else:
            self.note = ""
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def features(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pool [B,2048], logits_unbiased [B,1008])`` of uint8 images ``[B,3,H,W]``."""
        if not torch.is_tensor(images_uint8) or images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 \
                or images_uint8.shape[1] != 3:
            raise ValueError("Inception input must be uint8 images [B, 3, H, W] (use sftok.metrics.to_uint8).")
        pool, logits = self(images_uint8.to(next(self.parameters()).device))
        return pool, logits

    def describe(self) -> dict:
        """What a report should say about the network (weights file, checksum, comparability)."""
        return {"weights": self.weights_path, "sha256": self.weights_sha256,
                "paper_comparable": self.paper_comparable, "note": self.note}


def load_inception_state_dict(path: str | os.PathLike) -> tuple[dict, str]:
    """Read the FID Inception weights safely (``weights_only=True``); returns ``(state_dict, sha256)``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"Inception weights not found: {p}. Use the FID weights {PAPER_WEIGHTS_FILE} "
            f"(sha256 {PAPER_WEIGHTS_SHA256}), published by pytorch-fid at {PAPER_WEIGHTS_URL} "
            f"(torch-fidelity's weights-inception-2015-12-05-6726825d.pth is the same file). Download it once "
            f"and pass its path; nothing is downloaded at run time. Pass '' for random weights (not comparable).")
    sha = sha256_file(p)
    return read_state_dict(p, "eval.inception_weights"), sha


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _random_init(model: nn.Module, seed: int) -> None:
    """Seeded, variance-preserving random weights (He init), so features neither vanish nor explode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        elif isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / m.in_features) ** 0.5)
                m.bias.zero_()


def load_inception(weights: str | os.PathLike | None = "", device: str | torch.device = "cpu",
                   seed: int = 0) -> FIDInceptionV3:
    """The FID Inception on ``device``; ``weights=''`` gives seeded random weights (warns: not comparable)."""
    net = FIDInceptionV3(weights, seed=seed)
    if not net.weights_path:
        warnings.warn(RANDOM_WEIGHTS_NOTE, stacklevel=2)
    return net.to(device)
