"""The whole product job on tiny + synthetic data through real Ray Train (2 CPU workers, gloo) and a real
MLflow store: every stage trains and leaves checkpoints, every stage's child run has metrics, the final
model is evaluated and registered with an alias, and a rerun skips the finished stages."""
from __future__ import annotations

from pathlib import Path

import pytest

from sftok_platform.config import load_config
from sftok_platform import tracking
from sftok_platform.train import checkpointing as ckpt
from sftok_platform.train import run_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray
    from sftok_platform.cluster import connect
    connect(None, num_cpus=4)
    yield
    ray.shutdown()


def test_full_pipeline_two_workers(tmp_path, ray_local):
    from sftok_platform.data import prepare_synthetic
    shards = tmp_path / "shards"
    prepare_synthetic(shards, 32, num_val=8, image_size=64, quiet=True)
    steps = 3
    cfg = load_config("tiny", [
        f"run.root={tmp_path}/runs", "run.name=e2e", f"data.path={shards}", "train.workers=2",
        *[f"stage{i}.steps={steps}" for i in range(4)], *[f"stage{i}.global_batch_size=4" for i in range(4)],
        *[f"stage{i}.warmup_steps=1" for i in range(4)], "losses.discriminator_start=1", "losses.discriminator_weight=0.5", "losses.perceptual_weight=1.0",
        "train.checkpoint_every=2", "train.log_every=1", "eval.max_images=8", "eval.batch_size=4",
        "eval.steps=[1,2]", "tracking.system_metrics=false", "train.image_every=2", "tracking.promote=true"])
    lines: list[str] = []
    result = run_pipeline(cfg, echo=lines.append)

    rdir = Path(result.run_dir)
    assert list(result.stages) == ["stage0", "stage1", "stage2", "stage3"]
    c = tracking.client(cfg)
    for stage, res in result.stages.items():
        paths = ckpt.StagePaths(rdir, stage)
        assert ckpt.is_done(paths) and any(paths.export.iterdir())
        ray_dir = ckpt.storage_path(rdir) / ckpt.ray_run_name("e2e", stage)
        assert sorted(p.name for p in ray_dir.glob("step_*")) == ["step_0000002", "step_0000003"]
        state = ckpt.load_state(ray_dir / "step_0000003")
        assert state["step"] == steps and len(state["rng"]) == 2, "RNG states of both ranks"
        run = c.get_run(res.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert run.data.tags["ray.checkpoint"].endswith("step_0000003")
        for key in ("loss", "lr", "grad_norm", "codebook_usage", "codebook_perplexity", "images_per_s",
                    "memory_mb", "val_loss"):
            assert key in run.data.metrics, (stage, key)
        assert [m.step for m in c.get_metric_history(res.run_id, "loss")] == [1, 2, 3]
        artifacts = {a.path for a in c.list_artifacts(res.run_id)}
        assert {"images", "export"} <= artifacts, (stage, artifacts)
        grids = [a.path for a in c.list_artifacts(res.run_id, "images")]      # mlflow.log_image: key + step
        assert any(p.startswith(f"images/{stage}_recon+step+2+") for p in grids), grids   # train.image_every=2
        assert any(p.startswith(f"images/{stage}_recon+step+3+") for p in grids), grids   # the EMA grid at the end
    stage3 = state   # the last loop iteration: stage 3 keeps the discriminator and its optimizer
    assert set(stage3["aux"]) == {"loss", "d_optimizer"} and "discriminator" in stage3["aux"]["loss"]

    # the final model is registered (promoted: under the alias) as a pyfunc holding the stage-3 tokenizer,
    # with the evaluation figures as version tags
    import mlflow
    import sftok
    name = tracking.registered_model_name(cfg)
    mv = c.get_model_version_by_alias(name, cfg.tracking.alias)
    assert str(mv.version) == result.model_version and mv.run_id == result.parent_run_id
    assert result.model_uri == f"models:/{name}@{cfg.tracking.alias}"
    assert float(mv.tags["eval.psnr"]) == pytest.approx(result.eval_metrics["psnr"], rel=1e-4)
    local = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, tracking_uri=tracking.tracking_uri(cfg),
                                                dst_path=str(tmp_path / "dl"))
    model = sftok.load_model(Path(local) / "artifacts" / "tokenizer")
    assert model.cfg.pixel_head and model.cfg.image_size == 64
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    import pandas as pd
    from sftok_platform.serving import example_image
    out = mlflow.pyfunc.load_model(result.model_uri).predict(pd.DataFrame({"image": [example_image(64)]}))
    assert len(out["tokens"][0]) == 64
    parent = c.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and "config.yaml" in {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert (rdir / "config.yaml").is_file()
    text = "\n".join(lines)
    assert "mlflow ui --backend-store-uri sqlite:///" in text and "stage3" in text

    # the same command again: nothing is retrained
    again = run_pipeline(cfg, evaluate=False, echo=lines.append)
    assert all(r.skipped for r in again.stages.values())
