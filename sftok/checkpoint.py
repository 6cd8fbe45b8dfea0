"""Checkpoint I/O: this project's format and the official SFTok formats.

This project's format is a directory with ``model.safetensors`` (the state dict, official key names) and
``config.json`` (``{"format": "sftok", "version": 1, "model": <ModelConfig>}``).

Official formats read here: ``pytorch_model.bin`` (``torch.save(state_dict)``, loaded with
``weights_only=True``), the Hugging Face ``PyTorchModelHubMixin`` layout (``model.safetensors`` +
``config.json`` holding the OmegaConf config), official YAML configs (``configs/infer_sftok.yaml``,
``sftok_b64_stage*.yaml``), stage-1/2 checkpoints without ``pixel_*``, and the old key
``decoder.embedding_positional_embedding``. Nothing is unpickled beyond plain tensors.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from sftok.blocks import VIT_SIZES
from sftok.config import ConfigError, ModelConfig
from sftok.model import SFTok
from sftok.weights import WeightsFileError, read_state_dict  # noqa: F401 - re-exported

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_NAME = "sftok"
FORMAT_VERSION = 1

_OLD_KEYS = {"decoder.embedding_positional_embedding": "decoder.learnable_embedding_positional_embedding"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model. The message says how to fix it."""


# ######################################################################################################
# Reading raw state dicts
# ######################################################################################################

def normalize_official_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old official keys and strip DDP/compile prefixes (``module.``, ``_orig_mod.``)."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[_OLD_KEYS.get(k, k)] = v
    return out


# ######################################################################################################
# Configs: official YAML / config.json <-> ModelConfig, and inference from weights
# ######################################################################################################

def _size_name(width: int, layers: int, where: str) -> str:
    for name, (w, l, _) in VIT_SIZES.items():
        if (w, l) == (width, layers):
            return name
    raise CheckpointError(f"{where}: no known ViT size has width {width} and {layers} layers "
                          f"(known: {VIT_SIZES}); pass the matching official config.")


def infer_model_config(state: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Read the architecture off the tensor shapes of an official-layout state dict."""
    need = ["latent_tokens", "encoder.positional_embedding", "encoder.patch_embed.weight",
            "quantize.embedding", "decoder.learnable_embedding.weight",
            "decoder.learnable_embedding_positional_embedding"]
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"not an SFTok state dict: missing {missing}. Expected the official key layout "
                              f"(latent_tokens, encoder.*, quantize.*, decoder.*[, pixel_*]).")

    def layers(prefix):
        return len({k.split(".")[2] for k in state if k.startswith(prefix + ".transformer.")})

    ew = state["latent_tokens"].shape[1]
    dw = state["decoder.learnable_embedding.weight"].shape[1]
    patch = state["encoder.patch_embed.weight"].shape[-1]
    grid = int(round((state["encoder.positional_embedding"].shape[0] - 1) ** 0.5))
    _, K, D = state["quantize.embedding"].shape
    pixel = any(k.startswith("pixel_") for k in state)
    kw = dict(
        encoder_size=_size_name(ew, layers("encoder"), "encoder"),
        decoder_size=_size_name(dw, layers("decoder"), "decoder"),
        image_size=grid * patch, patch_size=patch,
        num_latent_tokens=state["latent_tokens"].shape[0], token_size=D, codebook_size=K,
        teacher_codebook_size=state["decoder.learnable_embedding.weight"].shape[0] - 1,
        num_proxy_codes=state["decoder.learnable_embedding_positional_embedding"].shape[0] - 1,
        pixel_head=pixel,
    )
    if pixel:
        kw["pixel_hidden_channels"] = state["pixel_decoder.conv_out.weight"].shape[1]
        kw["pixel_z_channels"] = state["pixel_quantize.embedding.weight"].shape[1]
    return ModelConfig(**kw)


def read_config_file(path: str | os.PathLike) -> dict:
    """A YAML or JSON config as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist.")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"could not parse {str(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r}: expected a mapping at the top level.")
    return data


def official_to_model_config(official: Mapping[str, Any] | str | os.PathLike,
                             state: Mapping[str, torch.Tensor] | None = None) -> ModelConfig:
    """Map an official OmegaConf config (YAML path or dict, e.g. ``infer_sftok.yaml``) to a ModelConfig.

    ``finetune_decoder`` (default True, as in ``SFTok.__init__``) selects the pixel head. The official
    code hard-codes the pixel decoder width 128; when ``state`` is given its width is read from the
    weights instead (the reference tiny bundle uses 32).
    """
    data = read_config_file(official) if not isinstance(official, Mapping) else official
    try:
        vq, dec = data["model"]["vq_model"], data["model"]["decoder"]
    except (KeyError, TypeError):
        raise ConfigError("not an official SFTok config: expected model.vq_model and model.decoder sections "
                          "(as in configs/infer_sftok.yaml).") from None
    if vq.get("num_group", 1) != 1:
        raise ConfigError(f"model.vq_model.num_group={vq['num_group']}: only 1 group is supported (all "
                          "released configs use 1).")
    if not vq.get("use_l2_norm", True):
        raise ConfigError("model.vq_model.use_l2_norm=false is not supported (all released configs use true).")
    if vq.get("quantize_mode", "vq") != "vq":
        raise ConfigError(f"model.vq_model.quantize_mode={vq['quantize_mode']!r}: only 'vq' is supported.")
    crop = (data.get("dataset") or {}).get("preprocessing", {}).get("crop_size", 256)
    kw = dict(
        encoder_size=vq.get("vit_enc_model_size", "base"),
        decoder_size=dec.get("vit_dec_model_size", "base"),
        image_size=crop,
        patch_size=vq.get("vit_enc_patch_size", 16),
        num_latent_tokens=vq.get("num_latent_tokens", 64),
        token_size=vq.get("token_size", 32),
        codebook_size=vq.get("codebook_size", 8192),
        commitment_cost=float(vq.get("commitment_cost", 0.25)),
        teacher_codebook_size=dec.get("codebook_size", 1024),
        num_proxy_codes=dec.get("num_proxy_codes", 256),
        pixel_head=bool(vq.get("finetune_decoder", True)),
        pixel_hidden_channels=128,
    )
    if state is not None and "pixel_decoder.conv_out.weight" in state:
        kw["pixel_hidden_channels"] = state["pixel_decoder.conv_out.weight"].shape[1]
    for key in ("encoder_size", "decoder_size"):
        if kw[key] not in VIT_SIZES:
            raise ConfigError(f"official config size {kw[key]!r} is unknown; known: {sorted(VIT_SIZES)}.")
    return ModelConfig(**kw)


def model_to_official_config(cfg: ModelConfig) -> dict:
    """An official-style config dict (what ``PyTorchModelHubMixin`` writes as config.json) for ``cfg``."""
    return {
        "model": {
            "model_type": "sftok",
            "vq_model": {
                "codebook_size": cfg.codebook_size, "token_size": cfg.token_size, "use_l2_norm": True,
                "commitment_cost": cfg.commitment_cost, "vit_enc_model_size": cfg.encoder_size,
                "vit_enc_patch_size": cfg.patch_size, "num_latent_tokens": cfg.num_latent_tokens,
                "num_group": 1, "finetune_decoder": cfg.pixel_head,
            },
            "decoder": {
                "vit_dec_model_size": cfg.decoder_size, "vit_dec_patch_size": cfg.patch_size,
                "num_latent_tokens": cfg.num_latent_tokens, "token_size": cfg.token_size,
                "num_proxy_codes": cfg.num_proxy_codes, "codebook_size": cfg.teacher_codebook_size,
                "randomize_temperature": 1.0, "guidance_scale": 0.0, "guidance_decay": "constant",
            },
            # the block the official decode path reads (missing from the released YAMLs, SPEC I.1)
            "generator": {"num_steps": 8, "randomize_temperature": 1.0, "guidance_scale": 0.0,
                          "guidance_decay": "constant", "class_label_dropout": 0.1},
        },
        "dataset": {"preprocessing": {"crop_size": cfg.image_size}},
    }


# ######################################################################################################
# Loading into a model with clear mismatch messages
# ######################################################################################################

def describe_mismatch(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """None if ``state`` fits ``model`` exactly, else a short report of missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensors differ in shape, e.g. " + "; ".join(shapes[:3]))
    if missing:
        parts.append(f"{len(missing)} keys missing from the checkpoint, e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    return ". ".join(parts)


def load_into(model, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly load ``state`` into ``model`` or raise :class:`CheckpointError` naming the mismatch and the fix."""
    problem = describe_mismatch(model, state)
    if problem:
        hint = ""
        try:
            found = infer_model_config(state)
            diffs = {f.name: (getattr(found, f.name), getattr(model.cfg, f.name))
                     for f in dataclasses.fields(ModelConfig)
                     if getattr(found, f.name) != getattr(model.cfg, f.name)
                     and f.name in {"encoder_size", "decoder_size", "codebook_size", "token_size", "pixel_head",
                                    "num_latent_tokens", "pixel_hidden_channels", "image_size", "patch_size",
                                    "teacher_codebook_size"}}
            if diffs:
                hint = (" The checkpoint was made with " +
                        ", ".join(f"{k}={v[0]!r}" for k, v in diffs.items()) + " but the model has " +
                        ", ".join(f"{k}={v[1]!r}" for k, v in diffs.items()) +
                        ": build the model from the checkpoint's own config (sftok.load_model / from_official "
                        "without a config infers it) or pick the matching registry name.")
            if found.pixel_head is False and model.cfg.pixel_head:
                hint += (" This is a stage-1/2 checkpoint (no pixel_* keys): use a '*_stage12' model or a "
                         "config with finetune_decoder: false.")
        except CheckpointError:
            pass
        raise CheckpointError(f"{source} does not fit the model: {problem}.{hint}")
    model.load_state_dict(state, strict=True)


def from_official(weights: str | os.PathLike | Mapping[str, torch.Tensor],
                  config: str | os.PathLike | Mapping | ModelConfig | None = None):
    """Official weights (``pytorch_model.bin``, ``model.safetensors``, an HF dir, or a state dict) -> SFTok.

    ``config``: an official YAML/``config.json`` (path or dict), a :class:`ModelConfig`, or None to read the
    architecture from the weights (a ``config.json`` next to the weights is used when present).
    """
    source = "state dict"
    if isinstance(weights, Mapping):
        state = normalize_official_keys(weights)
    else:
        path = Path(weights)
        if path.is_dir():
            files = [path / n for n in (WEIGHTS_FILE, "pytorch_model.bin") if (path / n).is_file()]
            if not files:
                raise FileNotFoundError(f"{str(path)!r} has neither {WEIGHTS_FILE} nor pytorch_model.bin.")
            if config is None and (path / CONFIG_FILE).is_file():
                config = path / CONFIG_FILE
            path = files[0]
        elif config is None and (path.parent / CONFIG_FILE).is_file():
            config = path.parent / CONFIG_FILE
        source = str(path)
        state = normalize_official_keys(read_state_dict(path))
    if config is None:
        cfg = infer_model_config(state)
    elif isinstance(config, ModelConfig):
        cfg = config
    else:
        data = config if isinstance(config, Mapping) else read_config_file(config)
        if data.get("format") == FORMAT_NAME:
            cfg = ModelConfig(**data["model"])
        else:
            cfg = official_to_model_config(data, state)
    model = SFTok(cfg)
    load_into(model, state, source)
    return model.eval()


# ######################################################################################################
# This project's format
# ######################################################################################################

def save_model(model, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (the ModelConfig) into ``directory``."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": dataclasses.asdict(model.cfg)}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def read_model_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig saved next to a checkpoint by :func:`save_model`."""
    data = read_config_file(Path(directory) / CONFIG_FILE)
    if data.get("format") != FORMAT_NAME:
        raise ConfigError(f"{directory}/config.json is not an sftok config; for official checkpoints use "
                          "sftok.from_official or `python -m sftok.convert to-sftok`.")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(data["model"]) - names
    if unknown:
        raise ConfigError(f"{directory}/config.json has unknown model fields {sorted(unknown)} (written by a "
                          "newer version?); remove them or upgrade sftok.")
    return ModelConfig(**data["model"])


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Load a checkpoint written by :func:`save_model` (a directory, or its ``model.safetensors``).

    Official checkpoints (a ``pytorch_model.bin``, or an HF directory whose config.json is the official
    OmegaConf dict) are recognised and routed through :func:`from_official`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    directory = path if path.is_dir() else path.parent
    cfg_file = directory / CONFIG_FILE
    official = path.suffix in (".bin", ".pt", ".pth") or not cfg_file.is_file() or \
        read_config_file(cfg_file).get("format") != FORMAT_NAME
    if official:
        return from_official(path).to(map_location)
    weights = path if path.is_file() else directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has config.json but no {WEIGHTS_FILE}.")
    model = SFTok(read_model_config(directory))
    load_into(model, read_state_dict(weights), str(weights))
    return model.to(map_location).eval()


def save_official(model, directory: str | os.PathLike, fmt: str = "bin") -> Path:
    """Write the official layout: ``pytorch_model.bin`` (fmt "bin") or ``model.safetensors`` (fmt
    "safetensors", the HF Hub layout), plus ``config.json`` with the official config dict."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(state, str(directory / WEIGHTS_FILE))
    else:
        raise ValueError(f"fmt={fmt!r}: use 'bin' or 'safetensors'.")
    (directory / CONFIG_FILE).write_text(json.dumps(model_to_official_config(model.cfg), indent=4))
    return directory
