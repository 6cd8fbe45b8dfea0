"""Checkpoint I/O: this project's format, the official layouts, the convert CLI and clear failures."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import sftok
from sftok.checkpoint import (CheckpointError, infer_model_config, load_into, official_to_model_config,
                              read_state_dict, save_official)
from sftok.convert import main as convert_main
from sftok.maskgit_vqgan import MaskGITVQGAN, load_teacher
from sftok.registry import model_config
from sftok.weights import WeightsFileError

from shared_paths import REF  # noqa: E402  (../shared beside the repo, as in CI)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return sftok.create_model("sftok_tiny").eval()


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def official_yaml(tmp_path, finetune_decoder=True, size="tiny", codebook=1024):
    """A minimal official-style YAML (the fields the official SFTok reads)."""
    cfg = {"model": {"vq_model": {"codebook_size": codebook, "token_size": 32, "use_l2_norm": True,
                                  "commitment_cost": 0.25, "vit_enc_model_size": size, "vit_enc_patch_size": 16,
                                  "num_latent_tokens": 64, "num_group": 1, "finetune_decoder": finetune_decoder},
                     "decoder": {"vit_dec_model_size": size, "num_proxy_codes": 256, "codebook_size": 1024}},
           "dataset": {"preprocessing": {"crop_size": 256}},
           "optimizer": {"params": {"learning_rate": 1e-4}},
           "lr_scheduler": {"params": {"learning_rate": "${optimizer.params.learning_rate}"}}}
    path = tmp_path / f"official_{finetune_decoder}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------------------------------- own format
def test_save_load_round_trip(tiny, tmp_path):
    sftok.save_model(tiny, tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["format"] == "sftok" and meta["model"]["encoder_size"] == "tiny"
    for path in (tmp_path / "ck", tmp_path / "ck" / "model.safetensors"):
        back = sftok.load_model(path)
        assert back.cfg == tiny.cfg and same_weights(back, tiny) and not back.training


def test_assignment_option_survives_round_trip(tmp_path):
    model = sftok.create_model("sftok_tiny_stage12", assignment="per_image")
    sftok.save_model(model, tmp_path)
    assert sftok.load_model(tmp_path).cfg.assignment == "per_image"


# ---------------------------------------------------------------------------------------------- official
def test_official_yaml_maps_to_registry_configs(tmp_path):
    assert official_to_model_config(official_yaml(tmp_path, True, "base", 8192)) == \
        model_config("sftok_b64", pixel_hidden_channels=128)
    assert official_to_model_config(official_yaml(tmp_path, False, "base", 8192)) == model_config("sftok_b64_stage12")
    assert official_to_model_config(REF / "config_tiny_stage1.yaml").pixel_head is False
    with pytest.raises(sftok.ConfigError, match="vq_model"):
        official_to_model_config({"model": {}})


def test_official_bin_and_old_key(tiny, tmp_path):
    state = tiny.state_dict()
    state["decoder.embedding_positional_embedding"] = state.pop("decoder.learnable_embedding_positional_embedding")
    torch.save(state, tmp_path / "pytorch_model.bin")
    back = sftok.from_official(tmp_path / "pytorch_model.bin", official_yaml(tmp_path))
    assert same_weights(back, tiny)
    assert same_weights(sftok.from_official(tmp_path / "pytorch_model.bin"), tiny)    # config inferred


def test_official_stage12_layout(tiny, tmp_path):
    state = {k: v for k, v in tiny.state_dict().items() if not k.startswith("pixel_")}
    assert len(state) == 78
    assert len(sftok.create_model("sftok_b64_stage12", device="meta").state_dict()) == 318   # official B count
    model = sftok.from_official(state, official_yaml(tmp_path, finetune_decoder=False))
    assert not model.cfg.pixel_head
    with pytest.raises(CheckpointError, match="stage-1/2 checkpoint"):
        sftok.from_official(state, official_yaml(tmp_path, finetune_decoder=True))


def test_hf_layout_and_to_official_round_trip(tiny, tmp_path):
    save_official(tiny, tmp_path / "hf", fmt="safetensors")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model"]["vq_model"]["finetune_decoder"] is True and "generator" in cfg["model"]
    assert same_weights(sftok.load_model(tmp_path / "hf"), tiny)            # routed to from_official
    assert same_weights(sftok.from_official(tmp_path / "hf"), tiny)


def test_convert_cli_both_directions(tiny, tmp_path):
    sftok.save_model(tiny, tmp_path / "ours")
    assert convert_main(["to-official", str(tmp_path / "ours"), str(tmp_path / "off")]) == 0
    official_state = read_state_dict(tmp_path / "off" / "pytorch_model.bin")
    assert official_state.keys() == tiny.state_dict().keys()
    assert convert_main(["to-sftok", str(tmp_path / "off" / "pytorch_model.bin"), str(tmp_path / "back")]) == 0
    assert same_weights(sftok.load_model(tmp_path / "back"), tiny)
    # the official YAML route, as a real subprocess (the documented command line)
    torch.save(tiny.state_dict(), tmp_path / "pytorch_model.bin")
    run = subprocess.run([sys.executable, "-m", "sftok.convert", "to-sftok", str(tmp_path / "pytorch_model.bin"),
                          str(tmp_path / "viayaml"), "--config", str(official_yaml(tmp_path))],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert run.returncode == 0, run.stderr
    assert same_weights(sftok.load_model(tmp_path / "viayaml"), tiny)
    assert convert_main(["to-sftok", str(tmp_path / "missing.bin"), str(tmp_path / "x")]) == 1


def test_reference_bundle_converts(tmp_path):
    if not (REF / "model_tiny.safetensors").exists():
        pytest.skip("reference bundle missing")
    assert convert_main(["to-sftok", str(REF / "model_tiny.safetensors"), str(tmp_path / "ref"),
                         "--config", str(REF / "config_tiny_stage3.yaml")]) == 0
    model = sftok.load_model(tmp_path / "ref")
    assert model.cfg == infer_model_config(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == 3_844_803


# ---------------------------------------------------------------------------------------------- failures
def test_corrupt_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightsFileError, match="corrupt"):
        read_state_dict(bad)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip")
    with pytest.raises(WeightsFileError, match="corrupt"):
        sftok.from_official(tmp_path / "pytorch_model.bin")


def test_pickled_objects_refused(tmp_path):
    torch.save({"weights": torch.zeros(1), "obj": object()}, tmp_path / "evil.bin")
    with pytest.raises(WeightsFileError):
        read_state_dict(tmp_path / "evil.bin")


def test_b64_weights_into_tiny_model_names_the_mismatch(tiny):
    b64_state = sftok.create_model("sftok_b64", device="meta").state_dict()   # shapes only, no memory
    with pytest.raises(CheckpointError) as e:
        load_into(tiny, b64_state, "b64.bin")
    msg = str(e.value)
    assert "differ in shape" in msg and "latent_tokens" in msg
    assert "encoder_size='base'" in msg and "encoder_size='tiny'" in msg and "config" in msg


def test_saved_config_vs_weights_mismatch(tiny, tmp_path):
    sftok.save_model(tiny, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["codebook_size"] = 4096
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="codebook_size=1024"):
        sftok.load_model(tmp_path)
    meta["model"]["bogus"] = 1
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(sftok.ConfigError, match="bogus"):
        sftok.load_model(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        sftok.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="maskgit-vqgan-imagenet-f16-256.bin.*fun-research/TiTok"):
        load_teacher(tmp_path / "maskgit-vqgan-imagenet-f16-256.bin")


def test_load_teacher_strict(tmp_path):
    torch.manual_seed(0)
    teacher = MaskGITVQGAN(hidden_channels=32)
    torch.save(teacher.state_dict(), tmp_path / "teacher.bin")
    back = load_teacher(tmp_path / "teacher.bin", hidden_channels=32)
    assert same_weights(back, teacher) and not back.training
    assert not any(p.requires_grad for p in back.parameters())
    with pytest.raises(ValueError, match="hidden_channels=128"):
        load_teacher(tmp_path / "teacher.bin")
    state = teacher.state_dict()
    state.pop("quantize.embedding.weight")
    torch.save(state, tmp_path / "partial.bin")
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        load_teacher(tmp_path / "partial.bin", hidden_channels=32)
