"""Stage 4 (generator): FID helpers, config checks, and one end-to-end run through real Ray + MLflow."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sftok_platform.config import ConfigError, load_config


def test_low_rank_fid_equals_the_scipy_sqrtm_recipe():
    from sftok.metrics import fid_from_stats
    from sftok_platform.generator_stage import fid_low_rank
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(80, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 1.0
    mu_ref, sigma_ref = ref.mean(0), np.cov(ref, rowvar=False)
    for n in (2, 5, 12):                               # fewer samples than dims: rank-deficient covariance
        x = rng.normal(size=(n, 32)) + 0.5
        want = fid_from_stats(x.mean(0), np.cov(x, rowvar=False), mu_ref, sigma_ref)
        assert fid_low_rank(x, mu_ref, sigma_ref) == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert fid_low_rank(ref[:20], ref[:20].mean(0), np.cov(ref[:20], rowvar=False)) == pytest.approx(0, abs=1e-6)


def test_reference_stats_file_is_checked(tmp_path):
    from sftok_platform.generator_stage import load_reference_stats
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros(3))
    with pytest.raises(ConfigError, match="VIRTUAL_imagenet256_labeled"):
        load_reference_stats(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "ok.npz", mu=np.ones(2048), sigma=np.eye(2048))
    ref = load_reference_stats(str(tmp_path / "ok.npz"))
    assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)


def test_config_checks_say_how_to_fix():
    from sftok_platform.generator_stage import check_config
    manifest = {"classes": [{"index": i} for i in range(10)]}
    cfg = load_config("tiny", ["generator.num_classes=5"])
    with pytest.raises(ConfigError, match="generator.num_classes=10"):
        check_config(cfg, manifest)
    cfg = load_config("tiny", ["generator.num_classes=10", "generator.reference_stats=/nope/ref.npz"])
    with pytest.raises(ConfigError, match="VIRTUAL_imagenet256_labeled"):
        check_config(cfg, manifest)
    cfg = load_config("tiny", ["generator.num_classes=10", "generator.global_batch_size=5", "train.workers=2"])
    with pytest.raises(ConfigError, match="multiple of 2"):
        check_config(cfg, manifest)
    assert check_config(load_config("tiny", ["generator.num_classes=10"]), manifest) == 10


@pytest.mark.slow
def test_stage4_end_to_end_tiny(tmp_path, ray_cluster, seed_mlflow):
    """Tokenize (Ray Data) -> train (Ray Train, 1 CPU worker, checkpoints; the worker fails once after step 2
    and the restarted group resumes from that checkpoint) -> sample (Ray Data) -> gFID vs the val shards, all
    logged to a real MLflow sqlite store as a child of a pipeline run."""
    import torch
    from mlflow import MlflowClient

    from sftok.checkpoint import save_model
    from sftok.model import SFTok
    from sftok.generator import load_generator
    from sftok_platform import tracking
    from sftok_platform.data import prepare_synthetic
    from sftok_platform.generator_stage import VAL_LABEL, run_stage4

    shards = tmp_path / "shards"
    prepare_synthetic(shards, 16, num_val=6, quiet=True)
    cfg = load_config("tiny", [
        f"run.root={tmp_path / 'runs'}", "run.name=gen", f"tracking.uri={seed_mlflow(tmp_path)}",
        "tracking.system_metrics=false",
        "generator.width=32", "generator.layers=1", "generator.heads=2", "generator.mlp_dim=64",
        "generator.num_classes=10", "generator.steps=4", "generator.global_batch_size=4",
        "generator.warmup_steps=1", "generator.lr=0.001", "generator.samples_per_class=1",
        "generator.sample_steps=2", "train.checkpoint_every=2", "train.log_every=1", "eval.steps=[2]",
        "eval.batch_size=5", "eval.temperature=0.0"])
    torch.manual_seed(0)
    tok_dir = save_model(SFTok(cfg.model), tmp_path / "tokenizer")    # the tiny preset's tokenizer (32 px)
    parent = tracking.start_parent_run(cfg)
    out = run_stage4(cfg, str(tok_dir), str(shards), parent,
                     debug={"fail_after_step": 2, "marker": str(tmp_path / "failed_once")})

    # metrics: a finite gFID against the val shards, labelled as such, and an Inception Score
    assert np.isfinite(out["gfid_vs_val"]) and out["gfid_vs_val"] >= 0
    assert "gfid" not in out and out["gfid_label"].startswith(VAL_LABEL)
    assert "random Inception weights" in out["gfid_label"]
    # IS = exp(mean KL) >= 1 exactly; near-identical samples (a random tokenizer) land on 1 - 1e-16 in float64
    assert out["inception_score"] >= 1.0 - 1e-9 and out["num_samples"] == 10
    assert out["tokenized_images"] == 16 and out["reference_images"] == 6

    stage = tmp_path / "runs" / "gen" / "stages" / "stage4"
    # tokens: both the image and its mirror, valid ids, labels kept
    import pyarrow.parquet as pq
    table = pq.read_table(stage / "tokens")
    toks = np.stack(table.column("tokens").to_numpy(zero_copy_only=False))
    assert table.num_rows == 16 and toks.shape == (16, 64) and 0 <= toks.min() and toks.max() < 1024
    assert sorted(set(table.column("label").to_pylist())) == list(range(10))
    # samples: valid tokens, one per class
    s = np.load(stage / "samples.npz")
    assert s["tokens"].shape == (10, 64) and s["tokens"].min() >= 0 and s["tokens"].max() < 1024
    assert s["labels"].tolist() == list(range(10))
    assert load_generator(stage / "export").codebook_size == 1024
    # Ray Train checkpoints every 2 steps under a deterministic run name
    ray_dir = tmp_path / "runs" / "gen" / "ray" / "gen-stage4"
    assert {p.name for p in ray_dir.glob("step_*")} == {"step_0000002", "step_0000004"}
    journal = [json.loads(x) for x in (stage / "journal.jsonl").read_text().splitlines()]
    assert [e["step"] for e in journal if "loss" in e] == [1, 2, 3, 4]
    starts = [(e["step"], e["resumed"]) for e in journal if e.get("event") == "start"]
    assert starts == [(0, False), (2, True)] and (tmp_path / "failed_once").exists()

    # MLflow: a finished child run under the parent with the loss curve, final metrics and the sample grid
    c = MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
    runs = c.search_runs([c.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                         filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["sftok.stage"] == "stage4"
    assert run.data.params["generator.width"] == "32"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert run.data.metrics["gfid_vs_val"] == pytest.approx(out["gfid_vs_val"])
    arts = {a.path for a in c.list_artifacts(run.info.run_id, "images")}
    assert any(a.startswith("images/stage4_samples+step+") and a.endswith(".png") for a in arts), arts
    assert {a.path for a in c.list_artifacts(run.info.run_id, "image_labels")} == {"image_labels/stage4_samples.txt"}

    # a rerun finds the finished stage and returns its metrics without redoing the work
    again = run_stage4(cfg, str(tok_dir), str(shards), parent)
    assert again["gfid_vs_val"] == out["gfid_vs_val"]
