"""The whole product job on tiny + synthetic data through real Ray Train (2 CPU workers, gloo) and a real
MLflow store, run once for the module and asserted on by several tests:

1. the pipeline is interrupted in stage 1 (an injected exception after step 4, ``train.max_failures=0``);
2. the same command again continues stage 1 at its step-4 checkpoint with the same optimizer state, and in
   stage 2 a worker process dies (``os._exit`` on rank 1 after step 7, ``train.max_failures=1``): Ray
   Train replaces the worker group, which resumes from the last checkpoint; stages 2 and 3 finish, the
   final model is evaluated and registered with an alias;
3. the same command a third time retrains nothing.

Every stage trains and leaves checkpoints, every stage's child run has metrics, curves and image grids.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from sftok_platform.config import load_config
from sftok_platform import tracking
from sftok_platform.train import checkpointing as ckpt
from sftok_platform.train import run_pipeline

pytestmark = pytest.mark.slow

# per-stage step counts (checkpoints every 2 steps, the last two kept): stage 1 is interrupted after step 4,
# a stage-2 worker dies after step 7, i.e. after the step-6 checkpoint
STEPS = {"stage0": 3, "stage1": 6, "stage2": 8, "stage3": 3}
INTERRUPT_AFTER = 4          # stage 1, rank 0, raise
WORKER_DIES_AFTER = 7        # stage 2 (the only stage this long), rank 1, os._exit
KEPT = {"stage0": [2, 3], "stage1": [4, 6], "stage2": [6, 8], "stage3": [2, 3]}   # train.num_to_keep=2


def _config(tmp, shards, *extra):
    return load_config("tiny", [
        f"run.root={tmp}/runs", "run.name=e2e", f"data.path={shards}", "train.workers=2",
        *[f"{s}.steps={n}" for s, n in STEPS.items()], *[f"stage{i}.global_batch_size=4" for i in range(4)],
        *[f"stage{i}.warmup_steps=1" for i in range(4)], "losses.discriminator_start=1", "losses.discriminator_weight=0.5", "losses.perceptual_weight=1.0",
        "train.checkpoint_every=2", "train.num_to_keep=2", "train.log_every=1", "eval.max_images=8", "eval.batch_size=4",
        "eval.steps=[1,2]", "tracking.system_metrics=false", "train.image_every=2", "tracking.promote=true", *extra])


def steps_after_each_start(paths):
    """Journal -> [(start step, resumed, fingerprint, [steps run after that start]), ...]."""
    out = []
    for e in ckpt.read_journal(paths):
        if e.get("event") == "start":
            out.append((e["step"], e["resumed"], e["optimizer_fingerprint"], []))
        elif "loss" in e:
            out[-1][3].append(e["step"])
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, ray_cluster, seed_mlflow):
    """The three launches; returns what the tests assert on (state between launches included)."""
    from sftok_platform.data import prepare_synthetic
    tmp = tmp_path_factory.mktemp("e2e")
    seed_mlflow(tmp / "runs")
    shards = tmp / "shards"
    prepare_synthetic(shards, 32, num_val=8, image_size=load_config("tiny").model.image_size, quiet=True)
    lines: list[str] = []
    out: dict = {"tmp": tmp, "lines": lines}

    # 1. interrupted in stage 1
    cfg = _config(tmp, shards, "train.max_failures=0")
    with pytest.raises(Exception, match=f"injected failure after step {INTERRUPT_AFTER}") as failure:
        run_pipeline(cfg, echo=lines.append, debug={"fail_after_step": INTERRUPT_AFTER, "fail_rank": 0, "how": "raise"})
    paths = ckpt.StagePaths(Path(tmp) / "runs" / "e2e", "stage1")
    ray_dir = ckpt.storage_path(paths.run_dir) / ckpt.ray_run_name("e2e", "stage1")
    last = ckpt.latest_checkpoint_dir(ray_dir)
    saved = ckpt.load_state(last)
    out["interrupted"] = {
        "error": str(failure.value), "stage0_done": ckpt.is_done(ckpt.StagePaths(paths.run_dir, "stage0")),
        "stage1_done": ckpt.is_done(paths), "last": last.name, "step": saved["step"],
        "ema_updates": saved["ema"]["num_updates"],
        "optimizer_state_filled": all(bool(part["state"]) and all(len(s) for s in part["state"].values())
                                      for part in ckpt.optimizer_parts(saved["optimizer"])),
        "fingerprint": ckpt.optimizer_fingerprint(saved["optimizer"])}

    # 2. the same command again; a stage-2 worker dies once (a marker file makes the fault one-shot)
    cfg = _config(tmp, shards, "train.max_failures=1")
    marker = tmp / "worker-killed-once"
    out["marker"] = marker
    out["cfg"] = cfg
    out["result"] = run_pipeline(cfg, echo=lines.append, debug={
        "fail_after_step": WORKER_DIES_AFTER, "fail_rank": 1, "how": "exit", "marker": str(marker)})

    c = tracking.client(cfg)      # the registry as launch 2 left it (launch 3 registers a version of its own)
    out["registered"] = c.get_model_version_by_alias(tracking.registered_model_name(cfg), cfg.tracking.alias)

    # 3. and again: nothing is retrained
    out["again"] = run_pipeline(cfg, evaluate=False, echo=lines.append)
    return out


def test_full_pipeline_two_workers(pipeline):
    cfg, result, tmp = pipeline["cfg"], pipeline["result"], pipeline["tmp"]
    rdir = Path(result.run_dir)
    assert list(result.stages) == ["stage0", "stage1", "stage2", "stage3"]
    c = tracking.client(cfg)
    for stage, res in result.stages.items():
        steps = STEPS[stage]
        paths = ckpt.StagePaths(rdir, stage)
        assert ckpt.is_done(paths) and any(paths.export.iterdir())
        ray_dir = ckpt.storage_path(rdir) / ckpt.ray_run_name("e2e", stage)
        assert sorted(p.name for p in ray_dir.glob("step_*")) == [f"step_{s:07d}" for s in KEPT[stage]], stage
        state = ckpt.load_state(ray_dir / f"step_{steps:07d}")
        assert state["step"] == steps and len(state["rng"]) == 2, "RNG states of both ranks"
        run = c.get_run(res.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
        assert run.data.tags["ray.checkpoint"].endswith(f"step_{steps:07d}")
        assert res.metrics["val_loss"] > 0
        for key in ("loss", "lr", "grad_norm", "codebook_usage", "codebook_perplexity", "images_per_s",
                    "memory_mb", "val_loss"):
            assert key in run.data.metrics, (stage, key)
        logged = [m.step for m in c.get_metric_history(res.run_id, "loss")]
        if stage == "stage2":     # the replaced worker group redid the steps after its checkpoint
            assert sorted(set(logged)) == list(range(1, steps + 1)), logged
        else:                     # stage 1 too: one child run across both launches, no step logged twice
            assert sorted(logged) == list(range(1, steps + 1)), (stage, logged)
        artifacts = {a.path for a in c.list_artifacts(res.run_id)}
        assert {"images", "export"} <= artifacts, (stage, artifacts)
        grids = [a.path for a in c.list_artifacts(res.run_id, "images")]      # mlflow.log_image: key + step
        assert any(p.startswith(f"images/{stage}_recon+step+0+") for p in grids), grids   # before training
        assert any(p.startswith(f"images/{stage}_recon+step+2+") for p in grids), grids   # train.image_every=2
        assert any(p.startswith(f"images/{stage}_recon+step+{steps}+") for p in grids), grids   # the EMA grid at the end
    stage3 = state   # the last loop iteration: stage 3 keeps the discriminator and its optimizer
    assert set(stage3["aux"]) == {"loss", "d_optimizer"} and "discriminator" in stage3["aux"]["loss"]

    # the final model is registered (promoted: under the alias) as a pyfunc holding the stage-3 tokenizer,
    # with the evaluation figures as version tags
    import mlflow
    import sftok
    name = tracking.registered_model_name(cfg)
    mv = pipeline["registered"]
    assert str(mv.version) == result.model_version and mv.run_id == result.parent_run_id
    assert result.model_uri == f"models:/{name}@{cfg.tracking.alias}"
    assert float(mv.tags["eval.psnr"]) == pytest.approx(result.eval_metrics["psnr"], rel=1e-4)
    local = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, tracking_uri=tracking.tracking_uri(cfg),
                                                dst_path=str(tmp / "dl"))
    model = sftok.load_model(Path(local) / "artifacts" / "tokenizer")
    assert model.cfg.pixel_head and model.cfg.image_size == cfg.model.image_size
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    import pandas as pd
    from sftok_platform.serving import example_image
    out = mlflow.pyfunc.load_model(result.model_uri).predict(pd.DataFrame({"image": [example_image(cfg.model.image_size)]}))
    assert len(out["tokens"][0]) == cfg.model.num_latent_tokens
    parent = c.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and "config.yaml" in {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert (rdir / "config.yaml").is_file()
    text = "\n".join(pipeline["lines"])
    assert "mlflow ui --backend-store-uri sqlite:///" in text and "stage3" in text


def test_interrupted_stage_continues_at_its_checkpoint(pipeline):
    """Launch 1 stopped in stage 1 after step 4 (stage 0 finished); launch 2 continued stage 1 at the step-4
    checkpoint with the same optimizer state and ran only the steps after it."""
    before = pipeline["interrupted"]
    assert f"injected failure after step {INTERRUPT_AFTER}" in before["error"]
    assert before["stage0_done"] and not before["stage1_done"]
    assert before["last"] == "step_0000004"
    assert before["step"] == 4 and before["ema_updates"] == 4 and before["optimizer_state_filled"]

    rdir = Path(pipeline["result"].run_dir)
    attempts = steps_after_each_start(ckpt.StagePaths(rdir, "stage1"))
    assert [(a[0], a[1]) for a in attempts] == [(0, False), (4, True)]
    assert attempts[1][2] == pytest.approx(before["fingerprint"]), "resumed with a different optimizer state"
    assert attempts[0][3] == [1, 2, 3, 4] and attempts[1][3] == [5, 6], "steps repeated or skipped"
    state = ckpt.load_state(ckpt.latest_checkpoint_dir(ckpt.storage_path(rdir) / ckpt.ray_run_name("e2e", "stage1")))
    assert state["step"] == STEPS["stage1"]
    # stage 0 had finished in launch 1: launch 2 did not train it again
    assert [a[:2] for a in steps_after_each_start(ckpt.StagePaths(rdir, "stage0"))] == [(0, False)]


def test_dead_worker_is_replaced_and_training_continues(pipeline):
    """Rank 1 of stage 2 exited after step 7; Ray Train started a new worker group from a reported checkpoint
    (step 6, or step 4 when the controller had not yet registered step 6 when rank 1 died) that ran to the
    end without gaps."""
    assert pipeline["marker"].is_file(), "the fault was not injected"
    rdir = Path(pipeline["result"].run_dir)
    attempts = steps_after_each_start(ckpt.StagePaths(rdir, "stage2"))
    assert len(attempts) == 2 and attempts[0][:2] == (0, False), attempts
    assert attempts[0][3][:WORKER_DIES_AFTER] == list(range(1, WORKER_DIES_AFTER + 1))
    restart, resumed = attempts[1][:2]
    assert resumed and restart in (4, 6), attempts
    assert attempts[1][3] == list(range(restart + 1, STEPS["stage2"] + 1))
    res = pipeline["result"].stages["stage2"]
    assert res.metrics["val_loss"] > 0 and res.ray_checkpoint.endswith(f"step_{STEPS['stage2']:07d}")
    # no other stage saw the fault (the marker makes it one-shot; stage 1 ends before step 7)
    for stage in ("stage1", "stage3"):
        assert len(steps_after_each_start(ckpt.StagePaths(rdir, stage))) == (2 if stage == "stage1" else 1)


def test_rerun_retrains_nothing(pipeline):
    again = pipeline["again"]
    assert list(again.stages) == ["stage0", "stage1", "stage2", "stage3"]
    assert all(r.skipped for r in again.stages.values())
    rdir = Path(pipeline["result"].run_dir)
    for stage in STEPS:     # no new start in any journal
        starts = steps_after_each_start(ckpt.StagePaths(rdir, stage))
        assert len(starts) == {"stage1": 2, "stage2": 2}.get(stage, 1), (stage, starts)


def test_the_mlflow_ui_shows_the_run_its_stages_and_their_image_grids(pipeline):
    """What a user opens after the run, in a real browser (headless Chromium on ``mlflow ui``): the pipeline
    run with its evaluation figures and a link to every stage run; a stage run's image grid on the
    model-metrics tab (``mlflow.log_image``, so the UI has a step slider) whose image the server serves.
    Skips where Chromium is not installed."""
    from mlflow_ui import MlflowUI
    cfg, result = pipeline["cfg"], pipeline["result"]
    c = tracking.client(cfg)
    exp_id = c.get_run(result.parent_run_id).info.experiment_id
    stage_ids = {stage: res.run_id for stage, res in result.stages.items()}
    with MlflowUI(tracking.tracking_uri(cfg)) as ui:
        html = ui.page(f"#/experiments/{exp_id}/runs/{result.parent_run_id}", "eval/psnr", "e2e-stage3<")
        assert ">e2e<" in html and "eval/psnr" in html
        for stage, run_id in stage_ids.items():      # the parent page links each child run by name
            assert f'href="#/experiments/{exp_id}/runs/{run_id}">e2e-{stage}<' in html, stage

        html = ui.page(f"#/experiments/{exp_id}/runs/{stage_ids['stage1']}/model-metrics", 'class="rc-image-img"',
                       "stage1_recon", "val_loss")
        assert "stage1_recon" in html and "val_loss" in html
        assert "No image logged at this step" not in html     # the image view opens at step 0: one is there
        src = re.search(r'<img class="rc-image-img" src="(get-artifact\?path=images%2Fstage1_recon[^"]+)"', html)
        assert src, "no stage-1 image grid on the model-metrics tab"
        assert len(ui.get(src.group(1).replace("&amp;", "&"))) > 100      # the grid itself, served
    # runs side by side on the compare page: tests/test_sweeps.py (the ablation's trials)
