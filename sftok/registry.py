"""Name -> architecture registry (timm/DiT style): ``sftok.create_model("sftok_b64")``.

The ViT size table is shared by the encoder and the multi-step decoder (SPEC B.1). ``tiny`` is the size
of the official reference bundle in ``shared/reference`` (width 128, 2 layers, 4 heads) and is what the
tests and the CPU default pipeline use.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from sftok.blocks import VIT_SIZES  # noqa: F401 - re-exported: sizes are named here
from sftok.config import ConfigError, ModelConfig
from sftok.model import SFTok


MODEL_CONFIGS: dict[str, Callable[[], ModelConfig]] = {
    # tiny: the reference bundle (codebook 1024, pixel decoder hidden 32)
    "sftok_tiny": lambda: ModelConfig(encoder_size="tiny", decoder_size="tiny", codebook_size=1024,
                                      pixel_hidden_channels=32),
    "sftok_b64": lambda: ModelConfig(encoder_size="base", decoder_size="base"),
    "sftok_l64": lambda: ModelConfig(encoder_size="base", decoder_size="large"),
}
# stage-1/2 layouts: same tokenizer without the pixel head (official finetune_decoder=False)
for _name in list(MODEL_CONFIGS):
    MODEL_CONFIGS[f"{_name}_stage12"] = (lambda f: lambda: dataclasses.replace(f(), pixel_head=False))(
        MODEL_CONFIGS[_name])


def list_models() -> list[str]:
    return sorted(MODEL_CONFIGS)


def model_config(name: str, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` registered under ``name``, with keyword overrides."""
    if name not in MODEL_CONFIGS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}.")
    cfg = MODEL_CONFIGS[name]()
    names = {f.name for f in dataclasses.fields(cfg)}
    bad = set(overrides) - names
    if bad:
        raise ConfigError(f"unknown ModelConfig fields {sorted(bad)}; valid: {sorted(names)}.")
    return dataclasses.replace(cfg, **overrides)


def create_model(name: str, device: "str | None" = None, **overrides):
    """Build ``SFTok`` from a registered name (``sftok_tiny``, ``sftok_b64``, ``sftok_l64``, ``*_stage12``).

    Keyword overrides change single :class:`ModelConfig` fields (e.g. ``assignment="per_image"``).
    ``device="meta"`` builds the module without allocating weights (parameter counts, key listings).
    """
    import contextlib

    import torch

    cfg = model_config(name, **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return SFTok(cfg)
