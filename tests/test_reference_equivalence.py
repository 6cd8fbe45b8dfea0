"""Golden equivalence with the official SFTok implementation (../shared/reference, see its README).

The tiny reference model is loaded through the official-format converter (``sftok.from_official`` with
the official YAML). Integer outputs must match exactly, logits to ~1e-5 and pixels to PIXEL_ATOL. One
thread, as the reference was recorded with one.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sftok

from shared_paths import REF  # noqa: E402  (../shared beside the repo, as in CI)
# The pixel decoder is ~20 convolutions deep and oneDNN picks its conv kernels per CPU: on an AMD EPYC host
# the max |difference| over 256x256x3 pixels reached 1.9e-4 (1e-4 held on the Ice Lake host the bundle was
# checked on), with logits still within 1e-5. A real bug moves pixels by 1e-2 or more.
PIXEL_ATOL = 5e-4
pytestmark = pytest.mark.skipif(not (REF / "outputs.safetensors").exists(), reason="reference bundle missing")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def ref():
    from safetensors.torch import load_file
    out = load_file(str(REF / "outputs.safetensors"))
    out["images"] = load_file(str(REF / "inputs.safetensors"))["images"]
    return out


@pytest.fixture(scope="module")
def model():
    return sftok.from_official(REF / "model_tiny.safetensors", REF / "config_tiny_stage3.yaml")


@pytest.fixture(scope="module")
def model_stage12():
    from safetensors.torch import load_file
    state = {k: v for k, v in load_file(str(REF / "model_tiny.safetensors")).items() if not k.startswith("pixel_")}
    return sftok.from_official(state, REF / "config_tiny_stage1.yaml")


@pytest.fixture(scope="module")
def encoded(model, ref):
    with torch.no_grad():
        return model.quantize_images(ref["images"])


def test_converter_builds_the_reference_architecture(model, model_stage12):
    assert sum(p.numel() for p in model.parameters()) == 3_844_803
    assert model.cfg.pixel_head and model.cfg.pixel_hidden_channels == 32
    assert not model_stage12.cfg.pixel_head


def test_seeded_init_reproduces_official_weights():
    """``torch.manual_seed(0)`` + construction draws the official random weights (same RNG order)."""
    from safetensors.torch import load_file
    torch.manual_seed(0)
    fresh = sftok.create_model("sftok_tiny").state_dict()
    ref_state = load_file(str(REF / "model_tiny.safetensors"))
    assert fresh.keys() == ref_state.keys()
    assert all(torch.equal(fresh[k], ref_state[k]) for k in fresh)


def test_tokens_batched_and_one_by_one(model, ref, encoded):
    z_q, info = encoded
    assert torch.equal(info["indices"], ref["tokens"][:, 0])
    assert torch.equal(info["min_encoding_indices"], ref["tokens"])
    alone = torch.cat([model.encode(ref["images"][i:i + 1]) for i in range(2)])
    assert torch.equal(alone, ref["tokens_encoded_one_by_one"][:, 0])
    # batch-independent assignment == the official tokens of each image encoded alone
    assert torch.equal(model.encode(ref["images"], assignment="per_image"), ref["tokens_encoded_one_by_one"][:, 0])
    torch.testing.assert_close(z_q, ref["z_quantized"], atol=1e-6, rtol=0)


def test_stage1_logits_and_losses(model, model_stage12, ref, encoded):
    z_q, info = encoded
    all_masked = torch.full((2, 256), model.mask_id)
    with torch.no_grad():
        logits = model.decoder(all_masked, z_q)
        logits12, info12 = model_stage12(ref["images"], all_masked)
    torch.testing.assert_close(logits, ref["stage1_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits12, ref["stage1_logits"], atol=1e-5, rtol=0)
    # reference loss table (tiny): CE 6.931098 against the teacher proxies, quantizer loss 0.036521
    ce = F.cross_entropy(logits.reshape(-1, 1024), ref["proxy_codes_teacher_random"].reshape(-1))
    assert abs(ce.item() - 6.931098) < 1e-5
    assert abs(info["quantizer_loss"].item() - 0.036521) < 1e-6
    assert abs(info12["quantizer_loss"].item() - 0.036521) < 1e-6


def test_stage2_decoder_inputs_and_logits(model, ref, encoded):
    z_q, _ = encoded
    guided = ref["stage1_logits"].argmax(-1)
    # replace_prob 1.0: every visible slot holds the model's own step-1 prediction
    expected = torch.where(ref["stage2_rp1_masks"].bool(), model.mask_id, guided)
    assert torch.equal(expected, ref["stage2_rp1_decoder_input_ids"])
    with torch.no_grad():
        logits = model.decoder(ref["stage2_rp0p8_decoder_input_ids"], z_q)
    torch.testing.assert_close(logits, ref["stage2_rp0p8_logits"], atol=1e-5, rtol=0)


def test_stage3_logits_and_reconstruction(model, ref):
    ids = torch.where(ref["stage3_masks"].bool(), model.mask_id, ref["stage1_logits"].argmax(-1))
    with torch.no_grad():
        logits, info = model(ref["images"], ids, return_image=True)
    torch.testing.assert_close(logits, ref["stage3_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(info["image"], ref["stage3_recon_image"], atol=PIXEL_ATOL, rtol=0)
    assert abs(F.mse_loss(info["image"], ref["images"]).item() - 0.498146) < 1e-5   # reference stage-3 MSE


def test_temperature0_decode(model, ref):
    res = model.decode(ref["tokens"], num_steps=8, temperature=0.0)
    assert torch.equal(res.inputs_per_step, ref["decoder_input_ids_per_step_T0"])
    assert torch.equal(res.ids, ref["decoded_ids_T0"])
    torch.testing.assert_close(res.logits, ref["decoded_logits_T0"], atol=1e-5, rtol=0)
    with torch.no_grad():
        image = model.logits_to_image(res.logits)
    torch.testing.assert_close(image, ref["decoded_image_T0"], atol=PIXEL_ATOL, rtol=0)


def test_temperature1_decode_replays_official_rng(model, ref):
    """Same global-RNG consumption order as the official loop: ``torch.manual_seed(2)`` replays it."""
    torch.manual_seed(2)
    res = model.decode(ref["tokens"], num_steps=8, temperature=1.0)
    assert torch.equal(res.inputs_per_step, ref["decoder_input_ids_per_step_T1"])
    assert torch.equal(res.ids, ref["decoded_ids_T1"])
    torch.testing.assert_close(res.logits, ref["decoded_logits_T1"], atol=1e-5, rtol=0)
    torch.manual_seed(2)
    image = model.decode_tokens(ref["tokens"], num_steps=8, temperature=1.0)
    torch.testing.assert_close(image, ref["decoded_image_T1"], atol=PIXEL_ATOL, rtol=0)
