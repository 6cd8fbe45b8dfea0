"""MaskGIT generator (SPEC D): size and layout, masking, loss, CFG, sampling, and that it actually learns."""
from __future__ import annotations

import math

import pytest
import torch

from sftok.config import GeneratorConfig
from sftok.generator import MaskGITGenerator, cfg_logits, count_parameters, mask_tokens, mlm_loss, training_loss

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded, especially on a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = dict(width=64, layers=2, heads=4, mlp_dim=128, num_classes=4, dropout=0.0)


def tiny_generator(codebook_size: int = 1024, seed: int = 0, **kw) -> MaskGITGenerator:
    torch.manual_seed(seed)
    return MaskGITGenerator(GeneratorConfig(**{**TINY, **kw}), codebook_size=codebook_size, seq_len=64)


def test_full_size_parameter_count_and_official_keys():
    """SPEC D: 183,522,560 parameters with the ImageBert (HF BERT) layout; built on the meta device."""
    with torch.device("meta"):
        g = MaskGITGenerator(GeneratorConfig())
    assert count_parameters(g) == 183_522_560
    sd = g.state_dict()
    assert sd["model.embeddings.word_embeddings.weight"].shape == (9194, 768)
    assert sd["model.embeddings.position_embeddings.weight"].shape == (65, 768)
    assert sd["model.encoder.layer.23.attention.self.query.weight"].shape == (768, 768)
    assert sd["model.encoder.layer.0.intermediate.dense.weight"].shape == (3072, 768)
    assert sd["model.lm_head.weight"].shape == (8192, 768)
    assert not any(k.startswith("model.encoder.layer.24") for k in sd)
    assert {k.split(".")[1] for k in sd} == {"embeddings", "encoder", "lm_head"}


def test_token_space_class_and_null_ids():
    with torch.device("meta"):
        g = MaskGITGenerator(GeneratorConfig())
    assert g.mask_id == 8192 and g.null_class_id == 9193
    ids = g.class_tokens(torch.tensor([0, 999, 5]), drop=torch.tensor([False, False, True]))
    assert ids.tolist() == [8193, 9192, 9193]
    with pytest.raises(ValueError, match="num_classes"):
        g.class_tokens(torch.tensor([1000]))


def test_arccos_masking_counts_and_replacement():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 100, (512, 64))
    masked, mask = mask_tokens(tokens, mask_id=100, generator=g)
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= 64
    assert torch.equal(masked[mask], torch.full_like(masked[mask], 100))
    assert torch.equal(masked[~mask], tokens[~mask])
    # reproduce the counts from the same random stream: n = max(1, round(64 * arccos(t) / (pi/2)))
    t = torch.rand(512, generator=torch.Generator().manual_seed(3))
    expected = (64 * (torch.acos(t) / (math.pi / 2)).clamp(1e-6, 1)).round().clamp(min=1)
    assert torch.equal(counts, expected.long())
    # arccos schedule: E[ratio] = 2/pi ~ 0.64 (more masking than linear's 0.5)
    assert abs(counts.float().mean().item() / 64 - 2 / math.pi) < 0.05


def test_mlm_loss_weights_masked_1_visible_0p1_with_label_smoothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 64, 10)
    targets = torch.randint(0, 10, (2, 64))
    mask = torch.rand(2, 64) < 0.5
    loss, metrics = mlm_loss(logits, targets, mask, label_smoothing=0.1, unmasked_weight=0.1)
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
    ce = 0.9 * nll + 0.1 * (-logp.mean(-1))           # label smoothing 0.1 over 10 classes
    w = torch.where(mask, 1.0, 0.1)
    assert torch.allclose(loss, (ce * w).sum() / w.sum(), atol=1e-6)
    acc = ((logits.argmax(-1) == targets) & mask).sum(1) / mask.sum(1)
    assert metrics["masked_accuracy"] == pytest.approx(acc.mean().item(), abs=1e-6)


def test_cfg_scale_zero_equals_conditional_logits_and_formula():
    g = tiny_generator().eval()
    tokens = torch.randint(0, 1025, (3, 64))
    labels = torch.tensor([0, 1, 3])
    with torch.no_grad():
        cond = g(tokens, labels)
        uncond = g(tokens, labels, torch.ones(3, dtype=torch.bool))
        assert torch.equal(g.guided_logits(tokens, labels, 0.0), cond)
        guided = g.guided_logits(tokens, labels, 4.5)
    assert not torch.allclose(cond, uncond)           # the class token matters
    assert torch.allclose(guided, cond + 4.5 * (cond - uncond), atol=1e-5)
    assert torch.allclose(cfg_logits(cond, uncond, 4.5), uncond + 5.5 * (cond - uncond), atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3, 8, 70])
def test_sampler_yields_valid_tokens_for_any_step_count(steps):
    g = tiny_generator(codebook_size=1024).eval()
    labels = torch.tensor([0, 1, 2, 3])
    out = g.generate(labels, num_steps=steps, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 64) and out.dtype == torch.long
    assert out.min() >= 0 and out.max() < 1024          # never the mask id or a class id
    again = g.generate(labels, num_steps=steps, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)                     # seeded -> reproducible


def test_sampler_follows_the_arccos_unmasking_schedule():
    """Masked slots entering step i: 64, then clamp(floor(64 * arccos(i/T) / (pi/2)), 1, prev - 1)."""
    g = tiny_generator().eval()
    seen = []
    hook = g.model.embeddings.register_forward_hook(
        lambda m, inp, out: seen.append((inp[0][:, 1:] == g.mask_id).sum(1)))
    T = 8
    g.generate(torch.tensor([0, 1]), num_steps=T, guidance_scale=0.0, generator=torch.Generator().manual_seed(1))
    hook.remove()
    expected, prev = [64], 64
    for i in range(1, T):
        prev = max(1, min(prev - 1, math.floor(64 * math.acos(i / T) / (math.pi / 2))))
        expected.append(prev)
    assert [int(s[0]) for s in seen] == expected and all(int(s[1]) == e for s, e in zip(seen, expected))


def test_overfits_four_fixed_sequences_and_samples_them_back():
    """The generator learns: loss on 4 fixed class-labelled sequences falls below 30% of its start within
    150 steps, and greedy sampling (no guidance) then reproduces each class's sequence."""
    torch.manual_seed(0)
    g = tiny_generator(codebook_size=1024, class_dropout=0.1)
    tokens = torch.randint(0, 1024, (4, 64))
    labels = torch.arange(4)
    opt = torch.optim.AdamW(g.parameters(), lr=3e-3, betas=(0.9, 0.96))
    rng = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss, _ = training_loss(g, tokens.repeat(2, 1), labels.repeat(2), generator=rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = losses[0], sum(losses[-10:]) / 10
    assert start > 6.0                                 # ~ln(1024) at init
    assert end < 0.3 * start, (start, end)
    g.eval()
    out = g.generate(labels, num_steps=8, guidance_scale=0.0, temperature=0.0)
    assert (out == tokens).float().mean() > 0.9


def test_sampled_tokens_decode_to_images_with_the_tiny_tokenizer():
    from sftok import create_model
    tok = create_model("sftok_tiny").eval()
    g = tiny_generator(codebook_size=tok.cfg.codebook_size).eval()
    tokens = g.generate(torch.tensor([1, 2]), num_steps=4, guidance_scale=4.5,
                        generator=torch.Generator().manual_seed(0))
    assert tokens.max() < tok.cfg.codebook_size
    images = tok.decode_tokens(tokens, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 256, 256) and torch.isfinite(images).all()


def test_save_and_load_round_trip(tmp_path):
    from sftok.generator import load_generator, save_generator
    g = tiny_generator(codebook_size=512).eval()
    save_generator(g, tmp_path / "gen")
    back = load_generator(tmp_path / "gen")
    assert back.codebook_size == 512 and back.cfg == g.cfg
    tokens, labels = torch.randint(0, 512, (2, 64)), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(back(tokens, labels), g(tokens, labels))
    with pytest.raises(FileNotFoundError, match="generator export"):
        load_generator(tmp_path)
