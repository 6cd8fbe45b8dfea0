"""sftok.metrics and sftok.inception: FID self-checks, hand-computed metric values, local-only Inception."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from sftok.metrics import (
    CodebookStats, FeatureStats, InceptionScoreStats, MeanStats, codebook_stats, fid_from_feature_stats,
    fid_from_stats, gaussian_window, inception_score, psnr, rgb_to_y, ssim, to_uint8,
)


def _spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T) / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------------------------- FID
def test_fid_equals_direct_scipy_on_known_statistics():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _spd(rng, d), _spd(rng, d, 2.0)
    direct = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
    for method in ("sqrtm", "eigh"):
        assert fid_from_stats(mu1, s1, mu2, s2, method=method) == pytest.approx(direct, rel=1e-9)
    # a closed form: commuting (diagonal) covariances -> sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero_and_methods_agree():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 32)) @ rng.standard_normal((32, 32))
    y = 0.8 * x + 0.5 * rng.standard_normal(x.shape) + 0.2
    sx, sy = FeatureStats(32).update(x), FeatureStats(32).update(y)
    assert abs(fid_from_feature_stats(sx, sx)) < 1e-8
    fid = fid_from_feature_stats(sx, sy)
    assert fid > 0.1
    assert fid_from_feature_stats(sx, sy, method="eigh") == pytest.approx(fid, rel=1e-8)


def test_lowrank_fid_is_exact_for_few_samples():
    rng = np.random.default_rng(2)
    d, n = 128, 20                                   # n < d: covariances of rank n-1, as in small evals
    x = rng.standard_normal((n, d))
    y = 0.9 * x + 0.3 * rng.standard_normal((n, d)) + 0.1
    sx, sy = FeatureStats(d).update(x), FeatureStats(d).update(y)
    ref = fid_from_feature_stats(sx, sy, method="eigh")
    assert fid_from_feature_stats(sx, sy, method="lowrank") == pytest.approx(ref, rel=1e-6)
    assert fid_from_feature_stats(sx, sy, method="auto") == pytest.approx(ref, rel=1e-6)
    assert abs(fid_from_feature_stats(sx, sx, method="lowrank")) < 1e-8
    with pytest.raises(ValueError, match="lowrank"):
        fid_from_stats(sx.mean, sx.cov, sy.mean, sy.cov, method="lowrank", rank=d)


def test_feature_stats_match_numpy_and_sharded_merge_equals_single_process():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((101, 24)).astype(np.float32) * 3 + 5
    single = FeatureStats(24).update(x)
    np.testing.assert_allclose(single.mean, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(single.cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    # four "actors" with uneven shards, merged in another order, through a state_dict round trip
    parts = [FeatureStats(24).update(x[a:b]) for a, b in [(0, 7), (7, 50), (50, 51), (51, 101)]]
    merged = FeatureStats.from_state_dict(parts[2].state_dict())
    for p in (parts[3], parts[0], parts[1]):
        merged.merge(p)
    assert merged.count == 101
    np.testing.assert_allclose(merged.sum, single.sum, rtol=1e-12)
    np.testing.assert_allclose(merged.sum_outer, single.sum_outer, rtol=1e-12)
    assert fid_from_feature_stats(merged, single) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="expects features"):
        FeatureStats(24).update(x[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(24).update(x[:1]).cov


# ---------------------------------------------------------------------------------------------- IS
def test_inception_score_of_known_logits():
    # uniform predictions: IS = 1
    assert inception_score(np.zeros((10, 7))) == pytest.approx(1.0, abs=1e-12)
    # confident and evenly spread over K classes: IS = K
    k = 5
    logits = np.full((2 * k, 1008), -1e4)
    logits[np.arange(2 * k), np.arange(2 * k) % k] = 0.0
    assert inception_score(logits) == pytest.approx(k, rel=1e-9)
    # hand-computed two-image case: p1 = (a, 1-a), p2 = (1-a, a), marginal (1/2, 1/2)
    a = 0.8
    lg = np.log(np.array([[a, 1 - a], [1 - a, a]]))
    kl = a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5)
    assert inception_score(lg) == pytest.approx(math.exp(kl), rel=1e-12)


def test_inception_score_matches_torch_fidelity_one_split_and_merges():
    from torch_fidelity.metric_isc import isc_features_to_metric
    logits = torch.randn(64, 1008, generator=torch.Generator().manual_seed(0)) * 3
    ref = isc_features_to_metric(logits, splits=1, shuffle=False)["inception_score_mean"]
    a = InceptionScoreStats().update(logits[:20])
    a.merge(InceptionScoreStats().update(logits[20:]))
    assert a.compute() == pytest.approx(ref, rel=1e-10)


# ---------------------------------------------------------------------------------------------- codebook
def test_codebook_usage_and_entropy_of_a_known_histogram():
    ids = np.array([0, 0, 1, 1, 2, 2, 3, 3])          # 4 of 16 codes, uniform -> 2 bits
    s = codebook_stats(ids, 16)
    assert s["usage"] == pytest.approx(4 / 16)
    assert s["entropy"] == pytest.approx(2.0)
    skewed = CodebookStats(8).update(torch.tensor([[5, 5, 5, 7]]))   # p = (3/4, 1/4)
    assert skewed.entropy == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    assert skewed.merge(CodebookStats(8).update([1])).usage == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="codebook_size"):
        CodebookStats(8).update([8])


# ---------------------------------------------------------------------------------------------- PSNR / SSIM
def test_psnr_of_a_known_noise_level():
    x = torch.full((2, 3, 8, 8), 0.5)
    noise = torch.where(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.5, -0.1, 0.1)
    y = x + noise                                     # |error| = 0.1 everywhere -> MSE 0.01 -> 20 dB
    np.testing.assert_allclose(psnr(y, x).numpy(), [20.0, 20.0], atol=1e-5)
    # Y channel: a pure-red offset d changes Y by 65.481/255 * d
    d = 0.1
    z = x.clone()
    z[:, 0] += d
    expected = 10 * math.log10(1.0 / ((65.481 / 255 * d) ** 2 + 1e-8))      # psnr's eps=1e-8 included
    np.testing.assert_allclose(psnr(z, x, y_channel=True).numpy(), [expected] * 2, rtol=1e-6)
    assert rgb_to_y(torch.zeros(1, 3, 2, 2)).flatten()[0].item() == pytest.approx(16 / 255)


def test_ssim_identical_is_one_and_a_hand_checked_case():
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(ssim(x, x).numpy(), [1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(ssim(x, x, y_channel=False).numpy(), [1.0, 1.0], atol=1e-12)
    # constant images a and b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) on each channel
    a, b, c1 = 0.3, 0.6, 0.01 ** 2
    ca, cb = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    assert ssim(ca, cb, y_channel=False).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    assert ssim(x, 1 - x).mean().item() < 0.5 < ssim(x, (x + 0.02).clamp(0, 1)).mean().item()
    w = gaussian_window()
    assert w.shape == (11, 11) and w.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 11"):
        ssim(x[..., :8, :8], x[..., :8, :8])


def test_to_uint8_rounds_and_clamps_and_mean_stats_skip_nan():
    x = torch.tensor([-0.1, 0.0, 0.6 / 255, 0.49, 1.0, 1.3]).view(1, 1, 1, 6)
    assert to_uint8(x).flatten().tolist() == [0, 0, 1, 125, 255, 255]
    m = MeanStats().update("a", [1.0, float("nan"), 3.0])
    m.merge(MeanStats().update("a", [5.0]))
    assert m.mean("a") == pytest.approx(3.0) and m.mean("missing") is None


# ---------------------------------------------------------------------------------------------- Inception
@pytest.fixture(scope="module")
def random_inception():
    from sftok.inception import FIDInceptionV3
    return FIDInceptionV3("")


def test_random_inception_is_labelled_seeded_and_shaped(random_inception):
    from sftok.inception import RANDOM_WEIGHTS_NOTE, FIDInceptionV3
    net = random_inception
    assert net.describe() == {"weights": "", "sha256": "", "paper_comparable": False, "note": RANDOM_WEIGHTS_NOTE}
    assert "NOT comparable" in RANDOM_WEIGHTS_NOTE
    net.INPUT_IMAGE_SIZE = 75          # smallest InceptionV3 input, keeps the test fast
    x = (torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    pool, logits = net.features(x)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and torch.isfinite(pool).all()
    again = FIDInceptionV3("")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="uint8"):
        net.features(x.float())


def test_inception_loads_local_weights_safely_and_never_downloads(random_inception, tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inc

    from sftok.inception import PAPER_WEIGHTS_FILE, FIDInceptionV3, sha256_file

    def no_download(*a, **k):
        raise AssertionError("tried to download")
    monkeypatch.setattr(tf_inc, "load_state_dict_from_url", no_download)
    path = tmp_path / "weights.pth"
    torch.save(random_inception.state_dict(), path)
    with pytest.warns(UserWarning, match="may not be comparable"):
        net = FIDInceptionV3(str(path))
    assert net.weights_sha256 == sha256_file(path) and not net.paper_comparable
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), random_inception.state_dict().values()))
    # torch-fidelity's own class loads the same file strictly and computes the same features
    ref = tf_inc.FeatureExtractorInceptionV3("ref", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))
    ref.INPUT_IMAGE_SIZE = net.INPUT_IMAGE_SIZE = 75
    x = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    for a, b in zip(ref(x), net.features(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match=PAPER_WEIGHTS_FILE):
        FIDInceptionV3(str(tmp_path / "missing.pth"))
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an FID InceptionV3"):
        FIDInceptionV3(str(tmp_path / "bad.pth"))
