"""The ``sftok`` command line: tokenize, reconstruct and info on a saved tiny checkpoint (64 px, fast)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import sftok
from sftok.checkpoint import save_model, save_official
from sftok_platform.cli import describe_checkpoint, main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("cli")
    model = sftok.create_model("sftok_tiny", image_size=64, num_proxy_codes=16)
    save_model(model, d / "ckpt")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(80, 64), (64, 96)]):       # non-square: exercises resize + center crop
        p = d / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return model, d, paths


def test_tokenize_writes_64_ids_per_image_matching_the_model(tiny, capsys):
    model, d, paths = tiny
    out = d / "tokens.json"
    assert main(["tokenize", *map(str, paths), "--checkpoint", str(d / "ckpt"), "-o", str(out)]) == 0
    assert "wrote tokens of 2 image(s)" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["num_tokens"] == 64 and doc["codebook_size"] == 1024
    toks = doc["tokens"]
    assert list(toks) == [str(p) for p in paths]
    from sftok_platform.cli import load_image
    for p in paths:
        assert len(toks[str(p)]) == 64 and all(0 <= t < 1024 for t in toks[str(p)])
        assert toks[str(p)] == model.encode(load_image(p, 64))[0].tolist()
    # stdout mode prints the same document
    assert main(["tokenize", str(paths[0]), "--checkpoint", str(d / "ckpt")]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"][str(paths[0])] == toks[str(paths[0])]


def test_reconstruct_saves_original_beside_reconstruction(tiny, capsys):
    model, d, paths = tiny
    out = d / "recon.png"
    assert main(["reconstruct", str(paths[0]), "--checkpoint", str(d / "ckpt"), "--steps", "2", "-o", str(out)]) == 0
    pair = np.asarray(Image.open(out))
    assert pair.shape == (64, 128, 3)
    from sftok.metrics import to_uint8
    from sftok_platform.cli import load_image
    img = load_image(paths[0], 64)
    np.testing.assert_array_equal(pair[:, :64], to_uint8(img)[0].permute(1, 2, 0).numpy())
    recon = model.decode_tokens(model.encode(img), num_steps=2, temperature=0.0)
    np.testing.assert_array_equal(pair[:, 64:], to_uint8(recon)[0].permute(1, 2, 0).numpy())
    assert "PSNR" in capsys.readouterr().out


def test_reconstruct_of_a_stage12_checkpoint_needs_the_teacher(tiny, tmp_path, capsys):
    _, d, paths = tiny
    m12 = sftok.create_model("sftok_tiny_stage12", image_size=64, num_proxy_codes=16)
    save_model(m12, tmp_path / "s12")
    assert main(["reconstruct", str(paths[0]), "--checkpoint", str(tmp_path / "s12"), "-o",
                 str(tmp_path / "r.png")]) == 2
    assert "--teacher" in capsys.readouterr().err
    teacher = sftok.MaskGITVQGAN(hidden_channels=32)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "teacher.safetensors"))
    assert main(["reconstruct", str(paths[0]), "--checkpoint", str(tmp_path / "s12"), "--teacher",
                 str(tmp_path / "teacher.safetensors"), "--teacher-hidden-channels", "32", "--steps", "1",
                 "-o", str(tmp_path / "r.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "r.png")).shape == (64, 128, 3)
    info = describe_checkpoint(tmp_path / "teacher.safetensors")
    assert info["format"] == "MaskGIT-VQGAN teacher" and info["teacher_hidden_channels"] == 32


def test_info_on_this_projects_and_the_official_format(tiny, tmp_path, capsys):
    model, d, _ = tiny
    n_params = sum(p.numel() for p in model.parameters())
    info = describe_checkpoint(d / "ckpt")
    assert info["format"].startswith("sftok") and info["stage"] == "stage3"
    assert info["params_total"] == n_params
    assert info["params_tokenizer"] == n_params - sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("pixel_"))
    assert info["model"]["image_size"] == 64 and info["model"]["num_proxy_codes"] == 16
    save_official(model, tmp_path / "off", fmt="bin")
    off = describe_checkpoint(tmp_path / "off")
    assert off["format"].startswith("official") and "pytorch_model.bin" in off["weights_file"]
    assert off["params_total"] == n_params and off["stage"] == "stage3"
    assert main(["info", str(tmp_path / "off")]) == 0
    text = capsys.readouterr().out
    assert "official" in text and f"{n_params:,}" in text
    assert main(["info", str(d / "ckpt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params_total"] == n_params
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
