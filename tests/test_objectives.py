"""Training objectives: masking, stage losses, LPIPS, DINO discriminator, DiffAug, EMA, optimiser, weights."""
import copy
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import sftok
import sftok.objectives as objectives
from sftok_platform.config import LossConfig, SFVRStageConfig, StageConfig, load_config
from sftok.diffaug import DiffAug
from sftok.discriminator import BatchNormLocal, DinoDiscriminator, build_dino_backbone
from sftok.ema import EMA, ema_decay_at
from sftok.lpips import LPIPS
from sftok.masking import (arccos_mask, arccos_num_masked, check_mask, decoder_input_ids,
                           replacement_draw)
from sftok.objectives import Stage3Loss, hinge_d_loss, stage0_loss, stage1_loss, stage2_loss, weighted_ce
from sftok.optim import build_optimizer, cosine_lr, discriminator_lr_at, lr_at, no_weight_decay, param_groups
from sftok.weights import MissingWeightsError, missing_weights, read_state_dict, resolve_weight


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model12():
    torch.manual_seed(0)
    return sftok.create_model("sftok_tiny_stage12").train()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def codes():
    return torch.randint(0, 1024, (2, 256), generator=torch.Generator().manual_seed(2))


def tiny_loss_cfg(**kw):
    base = dict(vgg16_weights="random", lpips_heads="random", dino_weights="random", dino_arch="tiny",
                discriminator_start=0)
    base.update(kw)
    return LossConfig(**base)


class DecoderInputs:
    def __init__(self, model):
        self.ids = []
        self.h = model.decoder.register_forward_pre_hook(lambda mod, args: self.ids.append(args[0].clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.h.remove()


# ###################################################################################################### masking
def test_arccos_mask_counts_follow_the_schedule():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    mask = arccos_mask(4000, 256, generator=g)
    n = arccos_num_masked(t, 256)
    assert mask.dtype == torch.bool and mask.shape == (4000, 256)
    assert torch.equal(mask.sum(1), n)                       # the same t draw decides the count
    assert mask.float().mean().item() == pytest.approx(2 / math.pi, abs=0.02)
    assert arccos_num_masked(torch.tensor([1.0, 0.0, 0.5]), 256).tolist() == [0, 256, round(256 * 2 / 3)]
    # every slot is equally likely to be masked
    per_slot = mask.float().mean(0)
    assert (per_slot - per_slot.mean()).abs().max() < 0.06


def test_replacement_draw_and_rng_consumption_do_not_depend_on_replace_prob():
    assert not replacement_draw(3, 256, 0.0, torch.Generator().manual_seed(0)).any()
    assert replacement_draw(3, 256, 1.0, torch.Generator().manual_seed(0)).all()
    with pytest.raises(ValueError, match="replace_prob"):
        replacement_draw(3, 256, 1.5)
    nxt = []
    for rp in (0.0, 0.5, 1.0):
        g = torch.Generator().manual_seed(7)
        arccos_mask(2, 256, generator=g)
        replacement_draw(2, 256, rp, generator=g)
        nxt.append(arccos_mask(2, 256, generator=g))
    assert torch.equal(nxt[0], nxt[1]) and torch.equal(nxt[1], nxt[2])


def test_decoder_input_ids_and_mask_checks():
    codes = torch.tensor([[1, 2, 3, 4]])
    guide = torch.tensor([[9, 8, 7, 6]])
    mask = torch.tensor([[True, False, False, False]])
    replace = torch.tensor([[True, True, False, False]])
    assert decoder_input_ids(codes, guide, mask, replace, 1024).tolist() == [[1024, 8, 3, 4]]
    assert decoder_input_ids(codes, guide, mask, None, 1024).tolist() == [[1024, 8, 7, 6]]
    assert decoder_input_ids(codes, None, mask, replace, 1024).tolist() == [[1024, 2, 3, 4]]
    assert check_mask(torch.tensor([[1, 0]]), 1, 2).dtype == torch.bool
    with pytest.raises(ValueError, match="shape"):
        check_mask(torch.zeros(2, 3, dtype=torch.bool), 2, 256)
    with pytest.raises(ValueError, match="bool"):
        check_mask(torch.full((1, 2), 0.5), 1, 2)


# ###################################################################################################### stages 1-2
def test_weighted_ce_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5)
    targets = torch.randint(0, 5, (2, 6))
    mask = torch.tensor([[1, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    loss, stats = weighted_ce(logits, targets, mask, 0.1)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    w = torch.where(mask, 1.0, 0.1)
    assert loss.item() == pytest.approx(((ce * w).sum() / w.sum()).item(), rel=1e-6)
    assert stats["ce_masked"].item() == pytest.approx(ce[mask].mean().item(), rel=1e-6)
    assert stats["ce_visible"].item() == pytest.approx(ce[~mask].mean().item(), rel=1e-6)


def test_stage1_is_all_masked_and_trains_everything(model12, images, codes):
    model12.zero_grad(set_to_none=True)
    with DecoderInputs(model12) as rec:
        loss, m = stage1_loss(model12, images, codes)
    assert len(rec.ids) == 1 and (rec.ids[0] == model12.mask_id).all()
    assert all(isinstance(v, float) for v in m.values())
    assert m["loss"] == pytest.approx(m["ce"] + m["quantizer_loss"], abs=1e-5)
    assert m["mask_ratio"] == 1.0
    loss.backward()
    for name in ("latent_tokens", "encoder.patch_embed.weight", "quantize.embedding", "decoder.ffn.2.weight"):
        p = dict(model12.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model12.zero_grad(set_to_none=True)


def test_stage2_vanilla_skips_the_guide_and_shows_teacher_codes(model12, images, codes):
    with DecoderInputs(model12) as rec:
        _, m = stage2_loss(model12, images, codes, replace_prob=0.0, generator=torch.Generator().manual_seed(3))
    assert len(rec.ids) == 1                                  # no guide pass needed
    ids = rec.ids[0]
    visible = ids != model12.mask_id
    assert torch.equal(ids[visible], codes[visible])
    assert m["visible_wrong_inputs"] == 0.0


def test_stage2_sfvr_shows_the_guide_prediction_and_weights_visible_slots(model12, images, codes):
    captured = []
    h = model12.decoder.register_forward_hook(lambda mod, args, out: captured.append((args[0], out.detach())))
    try:
        mask = torch.zeros(2, 256, dtype=torch.bool)
        mask[:, :100] = True
        loss, m = stage2_loss(model12, images, codes, replace_prob=1.0, unmasked_weight=0.1, mask=mask,
                              generator=torch.Generator().manual_seed(3))
    finally:
        h.remove()
    (guide_ids_in, guide_logits), (ids, logits) = captured
    assert (guide_ids_in == model12.mask_id).all()
    assert torch.equal(ids[:, :100], torch.full((2, 100), model12.mask_id))
    assert torch.equal(ids[:, 100:], guide_logits.argmax(-1)[:, 100:])
    ce = F.cross_entropy(logits.transpose(1, 2), codes, reduction="none")
    w = torch.where(mask, 1.0, 0.1)
    assert m["ce_weighted"] == pytest.approx(((ce * w).sum() / w.sum()).item(), rel=1e-5)
    assert m["loss"] == pytest.approx(m["ce_weighted"] + m["quantizer_loss"], abs=1e-5)


def test_stage_losses_validate_teacher_codes(model12, images):
    with pytest.raises(ValueError, match="expected \\(2, 256\\)"):
        stage1_loss(model12, images, torch.zeros(2, 64, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        stage2_loss(model12, images, torch.zeros(2, 256))


def test_stage_loss_dispatch_uses_the_stage_config(model12, images, codes):
    cfg = SFVRStageConfig(replace_prob=0.0)
    with DecoderInputs(model12) as rec:
        objectives.stage_loss("stage2", model12, images, codes, cfg, generator=torch.Generator().manual_seed(0))
    assert len(rec.ids) == 1
    with pytest.raises(ValueError, match="stage3"):
        objectives.stage_loss("stage3", model12, images, codes, cfg)


# ###################################################################################################### stage 0
def test_stage0_loss_trains_the_teacher():
    from sftok.maskgit_vqgan import MaskGITVQGAN
    torch.manual_seed(0)
    teacher = MaskGITVQGAN(hidden_channels=32).train()
    x = torch.rand(2, 3, 64, 64)
    loss, m = stage0_loss(teacher, x)
    assert loss.item() == pytest.approx(m["mse"] + m["quantizer_loss"], rel=1e-5)
    assert "lpips" not in m and 0 < m["code_usage"] <= 1
    loss.backward()
    for mod in (teacher.encoder, teacher.decoder, teacher.quantize):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())
    lp = LPIPS("random", "random")
    loss2, m2 = stage0_loss(teacher, x, lpips=lp, perceptual_weight=0.5)
    assert m2["lpips"] > 0
    assert loss2.item() == pytest.approx(m2["mse"] + m2["quantizer_loss"] + 0.5 * m2["lpips"], rel=1e-5)


# ###################################################################################################### weights
def test_missing_weights_are_errors_that_say_how_to_fix(tmp_path):
    with pytest.raises(MissingWeightsError) as e:
        resolve_weight("", "losses.dino_weights")
    msg = str(e.value)
    assert "losses.dino_weights" in msg and "dino_deitsmall16_pretrain.pth" in msg and "facebookresearch/dino" in msg
    with pytest.raises(MissingWeightsError, match="no such file"):
        resolve_weight(str(tmp_path / "vgg.pth"), "losses.lpips_heads")
    assert resolve_weight("random", "losses.vgg16_weights") is None
    assert resolve_weight("", "losses.vgg16_weights", allow_random=True) is None
    f = tmp_path / "w.pth"
    torch.save({"a": torch.ones(1)}, f)
    assert resolve_weight(str(f), "losses.vgg16_weights") == f.resolve()


def test_missing_weights_reports_every_stage3_file():
    problems = missing_weights(load_config("b64", validate=False))
    assert len(problems) == 3 and any("vgg16-397923af.pth" in p for p in problems)
    ok = load_config("b64", ["losses.perceptual_weight=0", "losses.dino_weights=random"], validate=False)
    assert missing_weights(ok) == []
    assert missing_weights(load_config("b64", validate=False), stages=["stage0", "stage1"]) == []
    bad_teacher = load_config("b64", ["teacher.weights=/nonexistent/maskgit.bin"], validate=False)
    assert any("maskgit-vqgan-imagenet-f16-256.bin" in p for p in missing_weights(bad_teacher, ["stage1"]))


def test_weight_files_are_loaded_safely(tmp_path):
    bad = tmp_path / "pickled.pth"
    torch.save({"net": torch.nn.Linear(2, 2)}, bad)          # a pickled module, not a state_dict
    with pytest.raises(ValueError, match="cannot read"):
        read_state_dict(bad, "losses.dino_weights")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        read_state_dict(junk)
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"teacher": {"w": torch.ones(2)}}, wrapped)
    assert list(read_state_dict(wrapped)) == ["w"]


def test_stage3_loss_refuses_missing_files_by_default():
    with pytest.raises(MissingWeightsError, match="losses.vgg16_weights"):
        Stage3Loss(LossConfig())
    with pytest.raises(MissingWeightsError, match="losses.dino_weights"):
        Stage3Loss(LossConfig(perceptual_weight=0.0, dino_arch="tiny"))


# ###################################################################################################### LPIPS
def _reference_lpips(features, heads, x, y):
    """The taming/TiTok formula, written out independently."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    hx, hy = ((x * 2 - 1) - shift) / scale, ((y * 2 - 1) - shift) / scale
    taps, total = {3, 8, 15, 22, 29}, 0
    k = 0
    for i, layer in enumerate(features):
        hx, hy = layer(hx), layer(hy)
        if i in taps:
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + (F.conv2d((nx - ny) ** 2, heads[k])).mean(dim=(1, 2, 3))
            k += 1
    return total


def test_lpips_loads_local_files_and_matches_the_formula(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers
    torch.manual_seed(0)
    features = make_layers(cfgs["D"])[:30].eval()          # torchvision's VGG16 feature layout
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "vgg16.pth")
    heads = [torch.rand(1, c, 1, 1) for c in (64, 128, 256, 512, 512)]
    torch.save({f"lin{k}.model.1.weight": w for k, w in enumerate(heads)}, tmp_path / "vgg.pth")
    lp = LPIPS(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))
    assert not lp.random_backbone and not any(p.requires_grad for p in lp.parameters())
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = _reference_lpips(features, heads, x, y)
    got = lp(x, y)
    assert got.shape == (2,)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert lp(x, x).abs().max() < 1e-6
    lp.train()
    assert not lp.training                                     # frozen network stays in eval mode
    cfg = LossConfig(vgg16_weights=str(tmp_path / "vgg16.pth"), lpips_heads=str(tmp_path / "vgg.pth"))
    assert isinstance(objectives.stage0_lpips(cfg), LPIPS)
    assert objectives.stage0_lpips(LossConfig()) is None and objectives.stage0_lpips(tiny_loss_cfg()) is None
    torch.save({"lin0.model.1.weight": torch.ones(1, 3, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="lin0.model.1.weight"):
        LPIPS(str(tmp_path / "vgg16.pth"), str(tmp_path / "bad.pth"))


def test_lpips_gradient_reaches_the_image():
    lp = LPIPS("random", "random")
    x = torch.rand(1, 3, 32, 32)
    y = torch.rand(1, 3, 32, 32, requires_grad=True)
    lp(x, y).sum().backward()
    assert y.grad.abs().sum() > 0


# ###################################################################################################### DiffAug
def test_diffaug_translation_is_a_zero_filled_shift():
    aug = DiffAug(translation=0.125, color=False, cutout=0.0)
    x = torch.rand(4, 3, 16, 16) + 1.0                          # strictly positive: zeros mark the fill
    out = aug(x, torch.Generator().manual_seed(0))
    for b in range(4):
        found = False
        for dh in range(-2, 3):
            for dw in range(-2, 3):
                shifted = torch.zeros_like(x[b])
                src = x[b][:, max(dh, 0):16 + min(dh, 0), max(dw, 0):16 + min(dw, 0)]
                shifted[:, max(-dh, 0):16 + min(-dh, 0), max(-dw, 0):16 + min(-dw, 0)] = src
                found |= torch.equal(out[b], shifted)
        assert found, f"sample {b} is not a shift of at most 2 pixels"


def test_diffaug_cutout_and_color():
    cut = DiffAug(translation=0.0, color=False, cutout=0.25)
    out = cut(torch.ones(8, 3, 16, 16), torch.Generator().manual_seed(1))
    for b in range(8):
        zero = out[b, 0] == 0
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert 0 < zero.sum() <= 16 and zero.sum() == len(rows) * len(cols)   # one clipped 4x4 square
        assert torch.equal(out[b, 0] == 0, out[b, 2] == 0)
    color = DiffAug(translation=0.0, color=True, cutout=0.0)
    gray = torch.full((6, 3, 8, 8), 0.3)
    shifted = color(gray, torch.Generator().manual_seed(2))
    delta = shifted - gray                                      # saturation/contrast keep a flat grey image
    assert torch.allclose(delta, delta[:, :1, :1, :1].expand_as(delta), atol=1e-6)
    assert (delta[:, 0, 0, 0].abs() <= 0.5).all()


def test_diffaug_is_reproducible_and_differentiable():
    aug = DiffAug()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    a.sum().backward()
    assert x.grad.abs().sum() > 0


# ###################################################################################################### discriminator
def test_batchnorm_local_uses_virtual_batches():
    bn = BatchNormLocal(4, virtual_bs=8)
    x = torch.randn(16, 4, 10) * 3 + 1
    out = bn(x)
    assert torch.allclose(out[:8], bn(x[:8]), atol=1e-5)        # groups are normalised separately
    assert out[:8].mean(dim=(0, 2)).abs().max() < 1e-5
    assert bn(torch.randn(9, 4, 10)).shape == (9, 4, 10)        # uneven batch still works


def test_discriminator_shapes_trainable_heads_and_state(tmp_path):
    torch.manual_seed(0)
    d = DinoDiscriminator("random", arch="tiny")
    x = torch.rand(3, 3, 256, 256, requires_grad=True)
    logits = d(x, torch.Generator().manual_seed(0))
    assert logits.shape == (3, 5 * 196)
    trainable = {n for n, p in d.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("heads.") for n in trainable)
    assert all(k.startswith("heads.") for k in d.state_dict())  # the backbone is not saved
    logits.mean().backward()
    assert x.grad.abs().sum() > 0
    d2 = DinoDiscriminator("random", arch="tiny")
    d2.load_state_dict(d.state_dict(), strict=True)
    assert torch.equal(d2.heads[0].cls.parametrizations.weight.original, d.heads[0].cls.parametrizations.weight.original)
    d.train()
    assert not d.backbone.training and d.heads.training


def test_discriminator_loads_the_dino_key_layout_strictly(tmp_path):
    torch.manual_seed(1)
    vit = build_dino_backbone("tiny")
    sd = vit.state_dict()
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"} <= set(sd)
    assert sd["pos_embed"].shape[1] == 197
    # a DINO training checkpoint: {"teacher": {"backbone.<key>": ..., "head.<...>": ...}}
    ckpt = {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "backbone.head.mlp.0.weight": torch.ones(2, 2)}}
    ckpt["teacher"] = {k.replace("backbone.head.", "head."): v for k, v in ckpt["teacher"].items()}
    torch.save(ckpt, tmp_path / "dino.pth")
    d = DinoDiscriminator(str(tmp_path / "dino.pth"), arch="tiny")
    got = d.backbone.state_dict()
    W = 32
    assert torch.equal(got["blocks.3.attn.qkv.weight"], sd["blocks.3.attn.qkv.weight"])
    assert (got["blocks.3.attn.qkv.bias"][W:2 * W] == 0).all()                      # k-bias zeroed
    assert torch.equal(got["blocks.3.attn.qkv.bias"][:W], sd["blocks.3.attn.qkv.bias"][:W])
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():                                        # zeroing the k bias changes nothing
        a = vit.forward_features(x)
        b = d.backbone.forward_features(x)
    assert torch.allclose(a, b, atol=1e-5)
    bad = {k: v for k, v in sd.items() if k != "norm.weight"}
    bad["pos_embed"] = torch.zeros(1, 50, 32)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="norm.weight"):
        DinoDiscriminator(str(tmp_path / "bad.pth"), arch="tiny")
    with pytest.raises(ValueError, match="pos_embed"):
        DinoDiscriminator(str(tmp_path / "dino.pth"), arch="vit_s16")
    with pytest.raises(MissingWeightsError, match="losses.dino_weights"):
        DinoDiscriminator("", arch="tiny")


# ###################################################################################################### stage 3
@pytest.fixture(scope="module")
def model3():
    torch.manual_seed(0)
    return Stage3Loss.prepare_model(sftok.create_model("sftok_tiny").train())


def test_stage3_trains_decoder_and_pixel_head_only(model3, images):
    s3 = Stage3Loss(tiny_loss_cfg(discriminator_start=10))
    model3.zero_grad(set_to_none=True)
    loss, m, recon = s3.generator_loss(model3, images[:1], global_step=0, generator=torch.Generator().manual_seed(0))
    assert m["gan_active"] == 0.0 and "gan_g" not in m
    assert m["loss"] == pytest.approx(m["mse"] + m["lpips"] + m["quantizer_loss"], rel=1e-5)
    loss.backward()
    grads = {n: p.grad for n, p in model3.named_parameters()}
    assert all(grads[n] is None for n in grads if n.startswith(("encoder.", "quantize.", "latent_tokens")))
    for n in ("decoder.ffn.2.weight", "pixel_quantize.embedding.weight", "pixel_decoder.conv_out.weight"):
        assert grads[n] is not None and grads[n].abs().sum() > 0, n
    assert not model3.encoder.training
    model3.zero_grad(set_to_none=True)


def test_stage3_gan_term_and_discriminator_step(model3, images):
    s3 = Stage3Loss(tiny_loss_cfg(perceptual_weight=0.0, discriminator_start=5))
    g = torch.Generator().manual_seed(0)
    loss, m, recon = s3.generator_loss(model3, images, global_step=5, generator=g)
    assert m["gan_active"] == 1.0
    assert m["gan_g_weighted"] == pytest.approx(0.5 * m["gan_g"], rel=1e-6)
    assert m["loss"] == pytest.approx(m["mse"] + m["quantizer_loss"] + m["gan_g_weighted"], rel=1e-5)
    d_loss, dm = s3.discriminator_loss(images, recon, generator=g)
    # first step: the LeCam EMAs were 0, so LeCam = w * (relu(real)^2 + relu(-fake)^2)
    lecam = 0.001 * (max(dm["d_real"], 0) ** 2 + max(-dm["d_fake"], 0) ** 2)
    assert dm["lecam"] == pytest.approx(lecam, rel=1e-4, abs=1e-12)
    assert dm["d_loss"] == pytest.approx(dm["d_hinge"] + dm["lecam"], rel=1e-6)
    assert dm["lecam_ema_real"] == pytest.approx(0.001 * dm["d_real"], rel=1e-5)
    assert dm["lecam_ema_fake"] == pytest.approx(0.001 * dm["d_fake"], rel=1e-5)
    assert hinge_d_loss(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])).item() == pytest.approx(0.5 * (0.5 + 0.75))
    d_loss.backward()                    # train mode: spectral-norm power iterations between the two D calls
    assert all(p.grad is not None for p in s3.discriminator.heads.parameters())
    assert all(p.grad is None for p in s3.discriminator.backbone.parameters())
    opt = s3.discriminator_optimizer(StageConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(s3.discriminator.heads.parameters()))
    model3.zero_grad(set_to_none=True)


def _d_grads_after(s3, model, images, with_generator_pass, leak=False):
    s3 = copy.deepcopy(s3)
    s3.discriminator.eval()              # no spectral-norm power iteration: the two runs see the same D
    recon = None
    if with_generator_pass:
        ctx = pytest.MonkeyPatch.context() if leak else nullcontext()
        with ctx as mp:
            if leak:                     # the official behaviour: D stays trainable in the generator pass
                mp.setattr(objectives, "frozen_parameters", lambda m: nullcontext())
            loss, _, recon = s3.generator_loss(model, images, 0, generator=torch.Generator().manual_seed(1))
            loss.backward()
    if recon is None:
        with torch.no_grad():
            recon, *_ = s3.reconstruct(model, images, generator=torch.Generator().manual_seed(1))
    d_loss, _ = s3.discriminator_loss(images, recon, generator=torch.Generator().manual_seed(2))
    d_loss.backward()
    model.zero_grad(set_to_none=True)
    return {n: p.grad.clone() for n, p in s3.discriminator.named_parameters() if p.requires_grad}


def test_discriminator_step_does_not_see_generator_gradients(model3, images):
    s3 = Stage3Loss(tiny_loss_cfg(perceptual_weight=0.0, discriminator_start=0))
    images = images[:1]                  # one image keeps the three passes cheap
    alone = _d_grads_after(s3, model3, images, with_generator_pass=False)
    after_g = _d_grads_after(s3, model3, images, with_generator_pass=True)
    assert alone.keys() == after_g.keys()
    for n in alone:
        assert torch.allclose(alone[n], after_g[n], atol=1e-6, rtol=1e-5), n
    leaky = _d_grads_after(s3, model3, images, with_generator_pass=True, leak=True)   # the test can fail
    assert any(not torch.allclose(alone[n], leaky[n], atol=1e-6, rtol=1e-5) for n in alone)


def test_stage3_checkpoint_state_roundtrip(images):
    s3 = Stage3Loss(tiny_loss_cfg(perceptual_weight=0.0))
    s3.ema_real_logits.fill_(0.25)
    state = s3.checkpoint_state()
    assert all(not k.startswith("backbone.") for k in state["discriminator"])
    s3b = Stage3Loss(tiny_loss_cfg(perceptual_weight=0.0))
    s3b.load_checkpoint_state(state)
    assert s3b.ema_real_logits.item() == 0.25
    for k, v in s3.discriminator.state_dict().items():
        assert torch.equal(v, s3b.discriminator.state_dict()[k])
    assert not any(k.startswith("lpips.") for k in Stage3Loss(tiny_loss_cfg()).state_dict())


def test_stage3_needs_a_pixel_head_and_a_frozen_encoder(model12, images):
    with pytest.raises(ValueError, match="pixel head"):
        Stage3Loss.prepare_model(model12)
    s3 = Stage3Loss(LossConfig(perceptual_weight=0.0, discriminator_weight=0.0))
    with pytest.raises(RuntimeError, match="prepare_model"):
        s3.generator_loss(sftok.create_model("sftok_tiny"), images, 0)


# ###################################################################################################### EMA
def test_ema_decay_schedule():
    assert ema_decay_at(0) == 0.0
    assert ema_decay_at(1) == pytest.approx(2 / 11)
    assert ema_decay_at(10) == pytest.approx(11 / 20)
    assert ema_decay_at(100_000) == 0.999


def test_ema_updates_average_trainable_and_copy_frozen():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    net[1].weight.requires_grad_(False)
    ema = EMA(net, decay=0.999)
    history = []
    for step in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        history.append({n: p.detach().clone() for n, p in net.named_parameters()})
        ema.update(net)
    w = [h["0.weight"] for h in history]
    expected = w[0]                                             # first update copies
    expected = expected + (1 - 2 / 11) * (w[1] - expected)
    expected = expected + (1 - 3 / 12) * (w[2] - expected)
    assert torch.allclose(ema.shadow["0.weight"], expected, atol=1e-6)
    assert torch.equal(ema.shadow["1.weight"], history[-1]["1.weight"])     # frozen: copied
    sd = ema.state_dict_for(net)
    assert torch.equal(sd["1.running_mean"], net[1].running_mean) and torch.allclose(sd["0.weight"], expected)
    ema2 = EMA(net)
    ema2.load_state_dict(ema.state_dict())
    assert ema2.num_updates == 3 and torch.equal(ema2.shadow["0.bias"], ema.shadow["0.bias"])
    with pytest.raises(KeyError):
        ema.update(torch.nn.Linear(3, 3))


# ###################################################################################################### optimiser
def test_param_groups_follow_the_official_rule(model12):
    groups = param_groups(model12, weight_decay=1e-4)
    no_decay, decay = set(groups[0]["names"]), set(groups[1]["names"])
    assert groups[0]["weight_decay"] == 0.0 and groups[1]["weight_decay"] == 1e-4
    assert no_decay.isdisjoint(decay)
    assert no_decay | decay == {n for n, p in model12.named_parameters() if p.requires_grad}
    for name in ("encoder.patch_embed.weight", "decoder.decoder_embed.weight", "latent_tokens",
                 "quantize.embedding", "decoder.learnable_embedding.weight", "encoder.ln_pre.weight",
                 "encoder.transformer.0.attn.in_proj_bias", "encoder.positional_embedding"):
        assert name in no_decay, name
    for name in ("encoder.transformer.0.attn.in_proj_weight", "decoder.ffn.0.weight",
                 "encoder.transformer.1.mlp.c_fc.weight", "quantize.shared_linear.weight", "encoder.conv_out.weight"):
        assert name in decay, name
    assert no_weight_decay("x.gamma", torch.zeros(2, 2)) and not no_weight_decay("x.weight", torch.zeros(2, 2))
    opt = build_optimizer(model12, StageConfig(lr=3e-4, beta2=0.95))
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and len(opt.param_groups) == 2



def test_muon_takes_the_transformer_matrices_and_adamw_the_rest(model12):
    """stageN.optimizer=muon: Muon on exactly the transformer blocks' 2-D weights (at lr x muon_lr_scale),
    AdamW (official decay groups) on every other trainable parameter; one schedule, one state dict that
    restores both halves, one fingerprint that sees both."""
    import copy
    from sftok.optim import MuonWithAdamW, set_lr
    from sftok_platform.train.checkpointing import optimizer_fingerprint
    cfg = StageConfig(lr=1e-3, weight_decay=1e-4, optimizer="muon", muon_lr_scale=20.0)
    model = copy.deepcopy(model12)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in opt.muon.param_groups[0]["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert muon.isdisjoint(adamw) and muon | adamw == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "encoder.transformer.0.attn.in_proj_weight" in muon and "decoder.transformer.1.mlp.c_proj.weight" in muon
    for name in ("encoder.patch_embed.weight", "latent_tokens", "decoder.ffn.0.weight", "encoder.ln_pre.weight",
                 "encoder.transformer.0.attn.in_proj_bias", "quantize.shared_linear.weight"):
        assert name in adamw, name
    set_lr(opt, 5e-4)
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(1e-2)
    assert all(g["lr"] == pytest.approx(5e-4) for g in opt.adamw.param_groups)

    x = torch.rand(2, 3, model.cfg.image_size, model.cfg.image_size)
    ids = torch.full((2, model.cfg.num_proxy_codes), model.mask_id)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits, info = model(x, ids)
    (logits.pow(2).mean() + info["quantizer_loss"]).backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "encoder.transformer.0.mlp.c_fc.weight" in moved and "decoder.ffn.2.weight" in moved
    state = opt.state_dict()
    assert set(state) == {"muon", "adamw"} and optimizer_fingerprint(state) > optimizer_fingerprint(state["adamw"]) > 0

    other = build_optimizer(copy.deepcopy(model12), cfg)
    other.load_state_dict(state)
    assert optimizer_fingerprint(other.state_dict()) == pytest.approx(optimizer_fingerprint(state))
    with pytest.raises(ValueError, match="another stageN.optimizer"):
        other.load_state_dict(build_optimizer(model12, StageConfig()).state_dict())


def test_muon_with_adamw_under_a_grad_scaler():
    """fp16 training drives the optimiser through torch.amp.GradScaler: unscale, step, and a skipped step
    (both halves untouched) when a gradient is inf."""
    from sftok.optim import MuonWithAdamW

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.transformer(x))

    torch.manual_seed(0)
    net = Net()
    opt = MuonWithAdamW(net, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, muon_lr_scale=20.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in net.parameters()]
    scaler.scale(net(torch.randn(4, 8)).pow(2).mean()).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(b, p) for b, p in zip(before, net.parameters()) if p.ndim == 2)
    after = [p.detach().clone() for p in net.parameters()]
    scaler.scale(net(torch.randn(4, 8)).pow(2).mean() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(after, net.parameters())) and scaler.get_scale() == 512.0


def test_lr_schedule():
    cfg = StageConfig(lr=1e-4, end_lr=1e-5, warmup_steps=10, steps=110)
    assert lr_at(0, cfg) == 0.0
    assert lr_at(5, cfg) == pytest.approx(5e-5)
    assert lr_at(10, cfg) == pytest.approx(1e-4)
    assert lr_at(60, cfg) == pytest.approx(1e-5 + 0.5 * 9e-5)             # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-5)
    assert lr_at(500, cfg) == pytest.approx(1e-5)                          # stays at end_lr
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    loss_cfg = LossConfig(discriminator_start=50, discriminator_lr=2e-4)
    assert discriminator_lr_at(49, cfg, loss_cfg) == 0.0
    assert discriminator_lr_at(55, cfg, loss_cfg) == pytest.approx(1e-4)   # half-way through its warm-up
    assert discriminator_lr_at(110, cfg, loss_cfg) == pytest.approx(1e-5)
    assert cosine_lr(3, 1.0, 0.0, 0, 3) == pytest.approx(0.0)
