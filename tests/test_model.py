"""SFTok core model: sizes, key layout, shapes, gradients, decoding loop and input validation."""
import json
import math
from pathlib import Path

import pytest
import torch

import sftok
from sftok.blocks import attention_impl
from sftok.decoding import masked_after_step, multistep_decode
from sftok.maskgit_vqgan import MaskGITVQGAN, ResnetBlock
from sftok.quantizer import OptVQ, sinkhorn

from shared_paths import SHARED  # noqa: E402  (../shared beside the repo, as in CI)
KEYS_TSV = SHARED / "official_checkpoint_keys_b64.tsv"


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return sftok.create_model("sftok_tiny").eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 256, 256, generator=g)


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("name,count", [
    ("sftok_b64_stage12", 175_104_832), ("sftok_b64", 205_845_315),
    ("sftok_l64_stage12", 394_156_352), ("sftok_l64", 424_896_835),
    ("sftok_tiny", 3_844_803),
])
def test_parameter_counts(name, count):
    assert n_params(sftok.create_model(name, device="meta")) == count


def test_teacher_parameter_count():
    with torch.device("meta"):
        teacher = MaskGITVQGAN(hidden_channels=128)
    assert n_params(teacher) == 54_515_587
    assert n_params(teacher.encoder) == 23_775_104


def test_b64_state_dict_matches_official_export():
    if not KEYS_TSV.exists():
        pytest.skip("official key listing not available")
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines()[1:] if line.strip()]
    expected = {k: (tuple(json.loads(s)), d.strip()) for k, s, d in rows}
    state = sftok.create_model("sftok_b64", device="meta").state_dict()
    got = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state.items()}
    assert got == expected
    assert len(got) == 407


def test_stage12_layout_has_no_pixel_head():
    model = sftok.create_model("sftok_b64_stage12", device="meta")
    assert not any(k.startswith("pixel_") for k in model.state_dict())
    assert model.mask_id == 1024


# ---------------------------------------------------------------------------------------------- forward
def test_encode_shapes_and_range(tiny, images):
    tokens = tiny.encode(images)
    assert tokens.dtype == torch.long and tokens.shape == (2, 64)
    assert 0 <= tokens.min() and tokens.max() < 1024


def test_quantize_images_straight_through_gradients(images):
    torch.manual_seed(0)
    model = sftok.create_model("sftok_tiny_stage12")
    z_q, info = model.quantize_images(images)
    assert z_q.shape == (2, 32, 1, 64)
    assert set(info) >= {"quantizer_loss", "commitment_loss", "codebook_loss", "indices"}
    assert torch.allclose(info["quantizer_loss"], info["commitment_loss"] + info["codebook_loss"])
    # unit-norm code vectors (values are the codes, gradients are the identity)
    assert torch.allclose(z_q.detach().norm(dim=1), torch.ones(2, 1, 64), atol=1e-5)
    logits = model.decoder(torch.full((2, 256), model.mask_id), z_q)
    assert logits.shape == (2, 256, 1024)
    (logits.logsumexp(-1).mean() + info["quantizer_loss"]).backward()
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert model.latent_tokens.grad.abs().sum() > 0
    assert model.quantize.embedding.grad.abs().sum() > 0      # codebook loss reaches the codebook


def test_forward_returns_logits_and_image(tiny, images):
    ids = torch.full((1, 256), tiny.mask_id)
    ids[:, :10] = 3
    with torch.no_grad():
        logits, info = tiny(images[:1], ids, return_image=True)
    assert logits.shape == (1, 256, 1024)
    assert info["image"].shape == (1, 3, 256, 256)
    assert torch.allclose(info["image"], tiny.logits_to_image(logits))


def test_attention_math_path_equals_sdpa(tiny, images):
    with torch.no_grad():
        z_q, _ = tiny.quantize_images(images)
        ids = torch.randint(0, 1025, (2, 256), generator=torch.Generator().manual_seed(0))
        fused = tiny.decoder(ids, z_q)
        with attention_impl("math"):
            naive = tiny.decoder(ids, z_q)
    assert (fused - naive).abs().max() < 1e-5


def test_per_image_assignment_is_batch_independent(tiny, images):
    batched = tiny.encode(images, assignment="per_image")
    alone = torch.cat([tiny.encode(images[i:i + 1], assignment="per_image") for i in range(2)])
    assert torch.equal(batched, alone)


def test_sinkhorn_columns_sum_to_one():
    cost = torch.rand(10, 7)
    q = sinkhorn(cost, iters=5, epsilon=10.0)
    assert torch.allclose(q.sum(dim=1), torch.ones(10), atol=1e-5)


def test_optvq_decode_tokens_matches_forward_codes():
    torch.manual_seed(0)
    vq = OptVQ(codebook_size=64, token_size=8)
    z = torch.randn(3, 8, 1, 16)
    z_q, info = vq(z)
    assert torch.allclose(vq.decode_tokens(info["indices"]), z_q, atol=1e-6)
    assert info["min_encoding_indices"].shape == (3, 1, 16)


# ---------------------------------------------------------------------------------------------- decoding
def test_masking_schedule_matches_spec():
    assert masked_after_step(8) == [235, 214, 193, 170, 145, 117, 82, 0]
    assert masked_after_step(4) == [214, 170, 117, 0]
    assert masked_after_step(2) == [170, 0]
    assert masked_after_step(1) == [0]


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 3])
def test_decode_any_number_of_steps(tiny, images, steps):
    tokens = tiny.encode(images)
    res = tiny.decode(tokens, num_steps=steps, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert res.ids.shape == (2, 256) and (res.ids < 1024).all()
    assert res.inputs_per_step.shape == (2, steps, 256)
    masked_in = (res.inputs_per_step == tiny.mask_id).sum(-1)[0].tolist()
    assert masked_in == [256] + masked_after_step(steps)[:-1]
    # committed slots never change afterwards
    for s in range(1, steps):
        prev = res.inputs_per_step[:, s - 1]
        cur = res.inputs_per_step[:, s]
        kept = prev != tiny.mask_id
        assert torch.equal(cur[kept], prev[kept])


def test_decode_generator_controls_randomness(tiny, images):
    tokens = tiny.encode(images)

    def ids(temperature, seed):
        return tiny.decode(tokens, 4, temperature, generator=torch.Generator().manual_seed(seed)).ids

    assert torch.equal(ids(1.0, 5), ids(1.0, 5)) and not torch.equal(ids(1.0, 5), ids(1.0, 6))
    # temperature 0 is deterministic and seed-independent
    assert torch.equal(ids(0.0, 5), ids(0.0, 6))
    image = tiny.decode_tokens(tokens[:1], 2, 1.0, generator=torch.Generator().manual_seed(5))
    assert image.shape == (1, 3, 256, 256)


def test_decode_global_rng_when_no_generator(tiny, images):
    tokens = tiny.encode(images[:1])
    torch.manual_seed(2)
    a = tiny.decode(tokens, 3, 1.0).ids
    torch.manual_seed(2)
    b = tiny.decode(tokens, 3, 1.0).ids
    g = torch.Generator().manual_seed(2)
    c = tiny.decode(tokens, 3, 1.0, generator=g).ids
    assert torch.equal(a, b) and torch.equal(a, c)


def test_stage12_decoding_uses_teacher(images):
    torch.manual_seed(0)
    model = sftok.create_model("sftok_tiny_stage12").eval()
    teacher = MaskGITVQGAN(hidden_channels=32).eval()
    tokens = model.encode(images[:1])
    with pytest.raises(RuntimeError, match="teacher"):
        model.decode_tokens(tokens, num_steps=2)
    out = model.decode_tokens(tokens, num_steps=2, teacher=teacher, generator=torch.Generator().manual_seed(0))
    ids = model.decode(tokens, 2, generator=torch.Generator().manual_seed(0)).ids
    assert torch.equal(out, teacher.decode_codes(ids))
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(RuntimeError, match="no pixel head"):
        model.logits_to_image(torch.zeros(1, 256, 1024))


# ---------------------------------------------------------------------------------------------- teacher
def test_teacher_paths():
    torch.manual_seed(0)
    teacher = MaskGITVQGAN(hidden_channels=32)
    x = torch.rand(2, 3, 64, 64)
    codes = teacher.encode_codes(x)
    assert codes.shape == (2, 16) and codes.dtype == torch.long
    recon, info = teacher(x)
    assert recon.shape == x.shape and set(info) == {"quantizer_loss", "codes", "latents"} and info["latents"].shape == (2, 256, 4, 4)
    assert torch.equal(info["codes"], codes)
    recon.mean().add(info["quantizer_loss"]).backward()
    assert teacher.encoder.conv_in.weight.grad is not None
    assert teacher.quantize.embedding.weight.grad.abs().sum() > 0


def test_resnet_shortcut_applies_to_block_output():
    torch.manual_seed(0)
    block = ResnetBlock(32, 64).eval()
    x = torch.randn(1, 32, 8, 8)
    f = torch.nn.functional
    h = block.conv1(f.silu(block.norm1(x)))
    h = block.conv2(f.silu(block.norm2(h)))
    assert torch.allclose(block(x), h + block.nin_shortcut(h), atol=1e-6)
    assert block.conv1.padding == (1, 1)     # TF "same" for 3x3 stride 1


def test_init_pixel_head_from_teacher():
    torch.manual_seed(0)
    model = sftok.create_model("sftok_tiny")
    teacher = MaskGITVQGAN(hidden_channels=32)
    model.init_pixel_head_from_teacher(teacher)
    assert torch.equal(model.pixel_quantize.embedding.weight, teacher.quantize.embedding.weight)
    assert torch.equal(model.pixel_decoder.conv_out.weight, teacher.decoder.conv_out.weight)
    with pytest.raises(ValueError, match="pixel_hidden_channels"):
        model.init_pixel_head_from_teacher(MaskGITVQGAN(hidden_channels=64))


def test_freeze_encoder_keeps_eval_mode():
    model = sftok.create_model("sftok_tiny").freeze_encoder()
    model.train()
    assert not model.encoder.training and not model.quantize.training and model.decoder.training
    assert not model.latent_tokens.requires_grad
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.pixel_decoder.parameters())


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad,err,match", [
    (torch.rand(3, 256, 256), ValueError, "unsqueeze"),
    (torch.rand(1, 3, 128, 128), ValueError, r"\[B, 3, 256, 256\]"),
    (torch.rand(1, 1, 256, 256), ValueError, "shape"),
    (torch.rand(1, 3, 256, 256) * 255, ValueError, "divide by 255"),
    (torch.rand(1, 3, 256, 256) * 2 - 1, ValueError, r"\[-1, 1\]"),
    ((torch.rand(1, 3, 256, 256) * 255).to(torch.uint8), TypeError, "float"),
    (torch.full((1, 3, 256, 256), float("nan")), ValueError, "NaN"),
    ([[0.0]], TypeError, "torch.Tensor"),
])
def test_bad_images(tiny, bad, err, match):
    with pytest.raises(err, match=match):
        tiny.encode(bad)


@pytest.mark.parametrize("bad,err,match", [
    (torch.full((1, 64), 1024), ValueError, r"\[0, 1024\)"),
    (torch.full((1, 64), -1), ValueError, "must lie in"),
    (torch.zeros(1, 32, dtype=torch.long), ValueError, "64 tokens"),
    (torch.zeros(1, 64), TypeError, "integer"),
])
def test_bad_tokens(tiny, bad, err, match):
    with pytest.raises(err, match=match):
        tiny.decode_tokens(bad, num_steps=1)


def test_bad_decoder_ids_and_args(tiny, images):
    with pytest.raises(ValueError, match="or 1024"):
        tiny(images, torch.full((2, 256), 1025))
    with pytest.raises(ValueError, match="num_steps"):
        tiny.decode_tokens(torch.zeros(1, 64, dtype=torch.long), num_steps=0)
    with pytest.raises(ValueError, match="temperature"):
        tiny.decode_tokens(torch.zeros(1, 64, dtype=torch.long), temperature=-1.0)
    # the official [B,1,64] token layout is accepted
    z = tiny.tokens_to_latents(torch.zeros(2, 1, 64, dtype=torch.long))
    assert z.shape == (2, 32, 1, 64)


def test_unknown_model_name():
    with pytest.raises(sftok.ConfigError, match="available"):
        sftok.create_model("sftok_xl")
    with pytest.raises(sftok.ConfigError, match="unknown ModelConfig"):
        sftok.create_model("sftok_tiny", widht=3)
    assert "sftok_b64" in sftok.list_models() and "sftok_tiny_stage12" in sftok.list_models()


def test_inference_dtype_bf16_keeps_quantizer_fp32(images):
    torch.manual_seed(0)
    model = sftok.create_model("sftok_tiny_stage12").eval().inference_dtype(torch.bfloat16)
    assert model.quantize.embedding.dtype == torch.float32
    assert model.decoder.ln_pre.weight.dtype == torch.bfloat16 and model.latent_tokens.dtype == torch.bfloat16
    tokens = model.encode(images[:1])
    assert tokens.dtype == torch.long and tokens.shape == (1, 64)
    res = model.decode(tokens, 2, 0.0)
    assert res.logits.dtype == torch.float32 and (res.ids < 1024).all()


def test_teacher_codes_do_not_depend_on_the_callers_autocast():
    """The training loop computes the teacher's target codes inside its bf16 autocast, the end-of-stage check
    outside it: encode_codes must give the same codes either way (issue: bf16 flips near-tie argmins)."""
    from sftok_platform.config import load_config
    from sftok.maskgit_vqgan import MaskGITVQGAN, init_scaled_
    cfg = load_config("tiny")
    t = cfg.teacher
    torch.manual_seed(0)
    teacher = init_scaled_(MaskGITVQGAN(t.hidden_channels, t.codebook_size, t.z_channels, cfg.teacher_arch())).eval()
    images = torch.rand(8, 3, 64, 64)
    fp32 = teacher.encode_codes(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = teacher.encode_codes(images)
        with torch.no_grad():
            naive = teacher.quantize.codes(teacher.encoder(images))   # what the code did before the guard
    assert torch.equal(in_autocast, fp32)
    assert (naive != fp32).any(), "bf16 autocast flips no code here, so this test would not catch a regression"
