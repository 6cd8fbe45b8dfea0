"""sftok: the SFTok image tokenizer (arXiv 2512.16910) in pure PyTorch.

    import sftok
    model = sftok.create_model("sftok_b64")
    tokens = model.encode(images)                  # [B,3,256,256] in [0,1] -> LongTensor [B,64]
    recon = model.decode_tokens(tokens, num_steps=8)
    model = sftok.from_official("pytorch_model.bin", "infer_sftok.yaml")
    fast = sftok.fast_inference(model)             # opt-in: int8 matmuls + bf16 pixel decoder (CPU)
"""
from sftok.checkpoint import from_official, load_model, save_model
from sftok.config import ConfigError, ModelConfig
from sftok.fast import fast_inference
from sftok.maskgit_vqgan import MaskGITVQGAN, load_teacher
from sftok.model import SFTok
from sftok.registry import create_model, list_models

__all__ = [
    "SFTok", "MaskGITVQGAN", "create_model", "list_models", "from_official", "load_model", "save_model",
    "load_teacher", "ConfigError", "ModelConfig", "fast_inference",
]
