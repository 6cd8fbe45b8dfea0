"""Fast checks of the training platform pieces that need neither a Ray cluster nor minutes of training:
the safe checkpoint format, the run layout, MLflow tracking (real sqlite store), configuration checks that
must fail before any work, the CLI, and one optimisation step of every stage on CPU."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sftok_platform.config import ConfigError, load_config
from sftok_platform import tracking
from sftok_platform.cluster import check_resources
from sftok_platform.train import checkpointing as ckpt
from sftok_platform.train.loop import autocast_dtype, codebook_stats, config_from_dict
from sftok_platform.train.pipeline import check_same_run, preflight, stage_inputs, summary_table

REPO = Path(__file__).resolve().parent.parent


def tiny(tmp_path, *overrides):
    return load_config("tiny", [f"run.root={tmp_path}", "run.name=t", *overrides])


# ------------------------------------------------------------------------------------------- checkpoints

def test_state_roundtrip_is_weights_only_and_restores_rng(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    rng = ckpt.capture_rng()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.save_state(tmp_path, {"step": 7, "model": model.state_dict(), "optimizer": opt.state_dict(),
                               "rng": [rng], "config": "a: 1\n"})
    state = ckpt.load_state(tmp_path)            # weights_only=True inside
    assert state["step"] == 7 and state["config"] == "a: 1\n"
    assert ckpt.optimizer_fingerprint(state["optimizer"]) == pytest.approx(ckpt.optimizer_fingerprint(opt.state_dict()))
    assert ckpt.optimizer_fingerprint(state["optimizer"]) > 0
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    ckpt.restore_rng(state["rng"][0])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_stage_layout_done_marker_and_journal(tmp_path):
    paths = ckpt.StagePaths(tmp_path, "stage1")
    assert not ckpt.is_done(paths)
    ckpt.journal(paths, step=1, loss=2.0)
    ckpt.journal(paths, step=2, loss=1.5)
    assert [e["step"] for e in ckpt.read_journal(paths)] == [1, 2]
    ckpt.mark_done(paths, {"metrics": {"val_loss": 1.0}})
    assert not ckpt.is_done(paths), "a marker without the export is not a finished stage"
    paths.export.mkdir(parents=True)
    assert ckpt.is_done(paths) and ckpt.read_done(paths)["metrics"]["val_loss"] == 1.0
    assert ckpt.ray_run_name("exp", "stage2") == "exp-stage2"


def test_teacher_export_loads_strictly(tmp_path):
    from sftok.maskgit_vqgan import MaskGITVQGAN
    cfg = tiny(tmp_path)
    tc = cfg.teacher
    t = MaskGITVQGAN(tc.hidden_channels, tc.codebook_size, tc.z_channels, cfg.teacher_arch())
    ckpt.save_teacher(t, tmp_path / "exp", hidden_channels=tc.hidden_channels, codebook_size=tc.codebook_size,
                      z_channels=tc.z_channels, arch=cfg.teacher_arch())
    loaded = ckpt.load_teacher_export(tmp_path / "exp", cfg)
    assert loaded.arch == cfg.teacher_arch()
    # the export describes its layout, so tools that get only the directory rebuild the same network
    from sftok_platform.evaluate import _load_teacher
    assert _load_teacher(str(tmp_path / "exp")).arch == cfg.teacher_arch()
    for (k, a), (_, b) in zip(t.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert not any(p.requires_grad for p in loaded.parameters())


def test_codebook_stats():
    counts = torch.tensor([4.0, 4.0, 0.0, 0.0])
    s = codebook_stats(counts)
    assert s["codebook_usage"] == 0.5 and s["codebook_perplexity"] == pytest.approx(2.0)


def test_autocast_choice():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        autocast_dtype("fp16", cpu)


def test_config_survives_the_trip_to_the_workers(tmp_path):
    cfg = tiny(tmp_path, "stage2.replace_prob=0.5", "eval.steps=[1,8]")
    back = config_from_dict(cfg.to_dict())
    assert back == cfg


# ------------------------------------------------------------------------------------------- tracking

def test_parent_child_runs_resume_by_tags_and_register(tmp_path, seed_mlflow):
    seed_mlflow(tmp_path)
    cfg = tiny(tmp_path)
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path}/mlflow.db"
    parent = tracking.start_parent_run(cfg)
    child = tracking.start_child_run(cfg, "stage1", parent)
    assert tracking.start_parent_run(cfg) == parent, "a rerun must continue the same parent run"
    assert tracking.start_child_run(cfg, "stage1", parent) == child
    other = tracking.start_child_run(cfg, "stage2", parent)
    assert other != child
    c = tracking.client(cfg)
    run = c.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["stage1.lr"] == str(cfg.stage1.lr) and "stage2.lr" not in run.data.params
    with pytest.raises(ConfigError, match="reserved"):
        tracking.check_alias("latest")


def test_registered_model_is_a_pyfunc_and_the_alias_moves_only_when_promoted(tmp_path, seed_mlflow):
    """The registered tokenizer is an MLflow pyfunc (tokens and reconstructions from image bytes, without
    this project's loading code); one registered model per preset; a version per run with its figures as
    tags; the serving alias moves only on promotion."""
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    from sftok.checkpoint import save_model
    from sftok.model import SFTok
    from sftok_platform.serving import example_image
    seed_mlflow(tmp_path)
    cfg = tiny(tmp_path, "tracking.system_metrics=false")
    torch.manual_seed(0)
    model = SFTok(cfg.model).eval()
    export = save_model(model, tmp_path / "export")
    parent = tracking.start_parent_run(cfg)
    c = tracking.client(cfg)
    name = tracking.registered_model_name(cfg)
    assert name == "sftok-tiny"
    v1, uri1 = tracking.register_model(cfg, parent, export, tags={"stage": "stage3", "eval.psnr": "17.5"})
    assert uri1 == f"models:/sftok-tiny/{v1}"
    with pytest.raises(Exception):                    # not promoted: no serving alias yet
        c.get_model_version_by_alias(name, cfg.tracking.alias)
    v2, uri2 = tracking.register_model(cfg, parent, export, promote=True)
    assert uri2 == "models:/sftok-tiny@current" and int(v2) == int(v1) + 1
    mv = c.get_model_version_by_alias(name, "current")
    assert str(mv.version) == v2 and mv.run_id == parent
    assert c.get_model_version(name, v1).tags["eval.psnr"] == "17.5"

    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    pyfunc = mlflow.pyfunc.load_model(uri2)
    assert [s.name for s in pyfunc.metadata.get_input_schema().inputs] == ["image"]
    png = example_image(96)                              # resized + centre-cropped to the model's 32 px
    out = pyfunc.predict(pd.DataFrame({"image": [png, png]}))
    assert list(out.columns) == ["tokens"] and len(out["tokens"][0]) == 64 and out["tokens"][0] == out["tokens"][1]
    with torch.no_grad():
        from sftok_platform.data.transforms import eval_transform, to_chw_float
        direct = model.encode(torch.from_numpy(to_chw_float([eval_transform(png, cfg.model.image_size)])))
    assert out["tokens"][0] == direct[0].tolist(), "the pyfunc must tokenize exactly like the library"
    rec = pyfunc.predict(pd.DataFrame({"image": [png]}), params={"task": "reconstruct", "steps": 2})
    img = Image.open(io.BytesIO(rec["image"][0]))
    assert img.format == "PNG" and img.size == (cfg.model.image_size,) * 2
    with pytest.raises(Exception, match="params.task"):
        pyfunc.predict(pd.DataFrame({"image": [png]}), params={"task": "generate"})

    # a stage-1/2 tokenizer (no pixel head) carries its teacher and reconstructs through it
    import dataclasses

    from sftok.maskgit_vqgan import MaskGITVQGAN
    from sftok_platform.serving import save_pyfunc
    tc = cfg.teacher
    teacher = MaskGITVQGAN(tc.hidden_channels, tc.codebook_size, tc.z_channels, cfg.teacher_arch())
    ckpt.save_teacher(teacher, tmp_path / "teacher", hidden_channels=tc.hidden_channels,
                      codebook_size=tc.codebook_size, z_channels=tc.z_channels, arch=cfg.teacher_arch())
    stage2 = save_model(SFTok(dataclasses.replace(cfg.model, pixel_head=False)), tmp_path / "stage2")
    no_head = mlflow.pyfunc.load_model(str(save_pyfunc(stage2, tmp_path / "pyfunc12", teacher_dir=tmp_path / "teacher")))
    rec = no_head.predict(pd.DataFrame({"image": [png]}), params={"task": "reconstruct", "steps": 2})
    assert Image.open(io.BytesIO(rec["image"][0])).size == (cfg.model.image_size,) * 2


def test_run_closed_by_sets_the_end_status_of_every_outcome(tmp_path, seed_mlflow):
    seed_mlflow(tmp_path)
    cfg = tiny(tmp_path)
    parent = tracking.start_parent_run(cfg)
    ids = [tracking.start_child_run(cfg, s, parent) for s in ("stage1", "stage2", "stage3", "stage0")]
    with tracking.run_closed_by(cfg, ids[0]):
        pass
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.run_closed_by(cfg, ids[1]):
            raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt):
        with tracking.run_closed_by(cfg, ids[2]):
            raise KeyboardInterrupt
    with tracking.run_closed_by(cfg, ids[3], finish=False):     # the block ends the run itself
        tracking.end_run(cfg, ids[3], "KILLED")
    c = tracking.client(cfg)
    assert [c.get_run(i).info.status for i in ids] == ["FINISHED", "FAILED", "KILLED", "KILLED"]
    assert c.get_run(ids[1]).data.tags["sftok.error"] == "RuntimeError: boom"
    assert "sftok.error" not in c.get_run(ids[2]).data.tags


def test_non_finite_metrics_are_logged_not_dropped(tmp_path, seed_mlflow):
    import math
    seed_mlflow(tmp_path)
    cfg = tiny(tmp_path)
    parent = tracking.start_parent_run(cfg)
    tracking.log_summary_metrics(cfg, parent, {"loss": float("nan"), "grad_norm": float("inf"), "ok": 1.0,
                                               "label": "text", "flag": True})
    m = tracking.client(cfg).get_run(parent).data.metrics
    assert math.isnan(m["loss"]) and m["grad_norm"] > 1e300 and m["ok"] == 1.0
    assert "label" not in m and "flag" not in m


def test_file_store_uri_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="file stores"):
        tracking.tracking_uri(tiny(tmp_path, "tracking.uri=file:///tmp/mlruns"))


# ------------------------------------------------------------------------------------------- checks before work

def test_stage3_without_stage2_fails_with_a_fix(tmp_path):
    cfg = tiny(tmp_path, "run.stages=[stage3]", "teacher.weights=random_missing.bin")
    with pytest.raises(ConfigError, match="teacher.weights"):
        preflight(cfg, ["stage3"])
    cfg = tiny(tmp_path, "run.stages=[stage0,stage3]")
    with pytest.raises(ConfigError, match=r"stage3 starts from the stage2 EMA weights.*--stages stage2,stage3"):
        preflight(cfg, ["stage0", "stage3"])
    preflight(tiny(tmp_path), ["stage0", "stage1", "stage2", "stage3"])   # the full schedule plans everything


def test_missing_external_weights_fail_before_any_work(tmp_path):
    cfg = load_config("b64", [f"run.root={tmp_path}", "teacher.weights="])
    with pytest.raises(ConfigError) as e:
        preflight(cfg, ["stage0", "stage1", "stage2", "stage3"])
    for key in ("losses.vgg16_weights", "losses.lpips_heads", "losses.dino_weights"):
        assert key in str(e.value)
    cfg = load_config("b64", [f"run.root={tmp_path}", f"teacher.weights={tmp_path}/nope.bin"])
    with pytest.raises(ConfigError, match="nope.bin"):
        stage_inputs(cfg, "stage1", tmp_path)


def test_data_path_without_manifest(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(ConfigError, match="manifest.json"):
        preflight(tiny(tmp_path, f"data.path={tmp_path}/shards"), ["stage0"])


def test_more_workers_or_gpus_than_the_cluster(tmp_path):
    with pytest.raises(ConfigError, match="needs 16 CPUs.*--workers 4"):
        check_resources(load_config("tiny", ["train.workers=16"], validate=False), {"CPU": 4.0})
    with pytest.raises(ConfigError, match="needs 2 GPUs"):
        check_resources(tiny(tmp_path, "train.workers=2", "train.gpu=true"), {"CPU": 8.0, "GPU": 1.0})
    check_resources(tiny(tmp_path, "train.workers=2"), {"CPU": 2.0})


def test_global_batch_must_divide(tmp_path):
    with pytest.raises(ConfigError, match="not divisible"):
        tiny(tmp_path, "train.workers=3")


def test_rerun_with_a_different_config_is_refused(tmp_path):
    cfg = tiny(tmp_path)
    rdir = tmp_path / "t"
    cfg.save(rdir / "config.yaml")
    check_same_run(tiny(tmp_path, "train.workers=2"), rdir)          # scaling may change on resume
    with pytest.raises(ConfigError, match=r"stage1.lr.*--run-name"):
        check_same_run(tiny(tmp_path, "stage1.lr=0.1"), rdir)


# ------------------------------------------------------------------------------------------- CLI

def test_cli_flags_and_overrides(tmp_path):
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import full_pipeline
    finally:
        sys.path.pop(0)
    args = full_pipeline.build_parser().parse_args(
        ["--root", str(tmp_path), "--workers", "2", "--stages", "stage1,stage2", "--set", "stage2.replace_prob=0.5",
         "stage1.steps=3"])
    cfg = full_pipeline.config_from_args(args)
    assert cfg.run.name == "tiny" and cfg.train.workers == 2 and cfg.run.stages == ["stage1", "stage2"]
    assert cfg.stage2.replace_prob == 0.5 and cfg.stage1.steps == 3 and cfg.run.root == str(tmp_path)
    args = full_pipeline.build_parser().parse_args(["--preset", "b64", "--gpu", "--run-name", "try2"])
    cfg = full_pipeline.config_from_args(args)
    assert cfg.run.name == "try2" and cfg.train.gpu and cfg.model.encoder_size == "base"
    assert full_pipeline.main(["--root", str(tmp_path), "stage1.bogus=1"]) == 2
    # flag values set typed fields as given (no YAML re-parse: 0123 is not octal 83, off is not False)
    args = full_pipeline.build_parser().parse_args(["--data", "0123", "--root", "off", "--tracking-uri", "sqlite:///x.db"])
    cfg = full_pipeline.config_from_args(args)
    assert cfg.data.path == "0123" and cfg.run.root == "off" and cfg.tracking.uri == "sqlite:///x.db"
    # dotted overrides win over flags (preset <- flags <- overrides)
    args = full_pipeline.build_parser().parse_args(["--workers", "2", "train.workers=4"])
    assert full_pipeline.config_from_args(args).train.workers == 4
    with pytest.raises(ConfigError, match="--data is empty"):
        full_pipeline.config_from_args(full_pipeline.build_parser().parse_args(["--data", ""]))


def test_summary_table_lists_every_stage():
    from sftok_platform.train.pipeline import PipelineResult, StageResult
    res = PipelineResult("r", "/x", {"stage1": StageResult("stage1", "/x/e", {"val_loss": 1.5}, seconds=3)},
                         {"rfid": 12.0}, "p", "1", "models:/sftok@current", "sqlite:////x", 10.0)
    text = summary_table(res)
    assert "stage1" in text and "1.5" in text and "rfid" in text and "Generator" not in text
    res.generator_metrics = {"gfid_vs_val": 39.48, "inception_score": 1.0, "gfid_label": "gFID vs val (random Inception)"}
    text = summary_table(res)
    assert "Generator (stage 4; gFID vs val (random Inception))" in text and "39.48" in text


# ------------------------------------------------------------------------------------------- one step per stage

@pytest.mark.parametrize("stage", ["stage0", "stage1", "stage2", "stage3"])
def test_each_stage_takes_an_optimiser_step(tmp_path, stage):
    """The stage builders on CPU without Ray: loss is finite, the trained parameters move, frozen ones don't."""
    from sftok.checkpoint import save_model
    from sftok.maskgit_vqgan import MaskGITVQGAN
    from sftok.model import SFTok
    import dataclasses
    from sftok_platform.train.stages import build_stage
    torch.manual_seed(0)
    cfg = tiny(tmp_path, "losses.discriminator_start=0", "losses.discriminator_weight=0.5", "losses.perceptual_weight=1.0")
    tc = cfg.teacher
    t = MaskGITVQGAN(tc.hidden_channels, tc.codebook_size, tc.z_channels, cfg.teacher_arch())
    ckpt.save_teacher(t, tmp_path / "teacher", hidden_channels=tc.hidden_channels, codebook_size=tc.codebook_size,
                      z_channels=tc.z_channels, arch=cfg.teacher_arch())
    save_model(SFTok(dataclasses.replace(cfg.model, pixel_head=False)), tmp_path / "init")
    inputs = {"teacher": str(tmp_path / "teacher"), "init": str(tmp_path / "init")}
    parts = build_stage(stage, cfg, inputs, torch.device("cpu"))
    before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    opt = torch.optim.AdamW(parts.trainable_parameters(), lr=1e-2)
    images = torch.rand(4, 3, cfg.model.image_size, cfg.model.image_size)
    loss, metrics = parts.step_module()(images, 0)
    assert torch.isfinite(loss) and "loss" in metrics
    loss.backward()
    opt.step()
    if parts.aux_module is not None:                 # stage 3: the discriminator step trains D's heads
        d_before = {k: v.clone() for k, v in parts.aux_module.state_dict().items()}
        d_metrics = parts.aux_step(parts.aux_module, images, 0)
        assert np.isfinite(d_metrics["d_loss"]) and np.isfinite(d_metrics["d_grad_norm"])
        assert any(not torch.equal(d_before[k], v) for k, v in parts.aux_module.state_dict().items())
        state = parts.state_dict()
        assert set(state) == {"loss", "d_optimizer"} and "ema_real_logits" in state["loss"]
        assert not any(k.startswith("backbone") for k in state["loss"]["discriminator"]), "external weights saved"
        parts.load_state_dict(state)
    after = parts.model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved
    if stage == "stage3":
        assert not any(k.startswith(("encoder.", "quantize.", "latent_tokens")) for k in moved)
        assert any(k.startswith("pixel_decoder.") for k in moved)
    assert parts.codes(images).max() < parts.codebook_size
    parts.export(parts.model, tmp_path / "out")
    assert any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_train_compile_keeps_names_and_the_eager_loss(tmp_path):
    """train.compile: the trained model is compiled in place, its state_dict keys do not change, and a
    compiled training step gives the eager step's loss and gradients."""
    from sftok.maskgit_vqgan import MaskGITVQGAN
    from sftok_platform.train.loop import maybe_compile
    from sftok_platform.train.stages import build_stage
    cfg = tiny(tmp_path, "train.compile=true")
    tc = cfg.teacher
    t = MaskGITVQGAN(tc.hidden_channels, tc.codebook_size, tc.z_channels, cfg.teacher_arch())
    ckpt.save_teacher(t, tmp_path / "teacher", hidden_channels=tc.hidden_channels, codebook_size=tc.codebook_size,
                      z_channels=tc.z_channels, arch=cfg.teacher_arch())
    images = torch.rand(4, 3, cfg.model.image_size, cfg.model.image_size)

    def step(compiled: bool):
        torch.manual_seed(0)
        parts = build_stage("stage1", cfg, {"teacher": str(tmp_path / "teacher")}, torch.device("cpu"))
        keys = list(parts.model.state_dict())
        if compiled:
            maybe_compile(parts.model, cfg)
        assert list(parts.model.state_dict()) == keys
        torch.manual_seed(1)
        loss, _ = parts.step_module()(images, 0)
        loss.backward()
        return loss.detach(), parts.model.latent_tokens.grad.clone()

    eager, compiled = step(False), step(True)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-3, atol=1e-5)


def test_gpu_acceptance_script_passes_on_cpu(tmp_path):
    """bench/gpu_acceptance.py (what a GPU machine runs unattended) on CPU with the tiny preset: every stage
    steps through DDP (gloo), the teacher codes ignore autocast, checkpoint + resume reproduce the next loss."""
    import json
    import subprocess
    out = tmp_path / "acceptance.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_acceptance.py"), "--device", "cpu", "--preset",
                           "tiny", "--batch", "2", "--steps", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["passed"] and set(result["stages"]) == {"stage0", "stage1", "stage2", "stage3"}
    assert result["ddp_backend"] == "gloo" and result["resume"]["loss_after_resume"] == result["resume"]["loss_before"]


def test_restarts_that_cannot_help_are_refused(tmp_path):
    """Ray's retries (max_failures -1 on b64/l64) stop for a crash loop (3 attempts of this launch without a
    finished step) and for a replay of a divergence with the same config; a new launch or config may go on."""
    from sftok_platform.train.loop import StageDiverged, config_fingerprint, refuse_hopeless_restart
    cfg = load_config("tiny")
    paths = ckpt.StagePaths(tmp_path, "stage1")
    ckpt.journal(paths, event="start", t=10.0, step=0)
    ckpt.journal(paths, step=1, loss=1.0, t=11.0)
    for t in (20.0, 21.0):
        ckpt.journal(paths, event="start", t=t, step=0)
    refuse_hopeless_restart(paths, cfg, 0, rank=0, launched_at=15.0)          # 2 fruitless attempts: go on
    ckpt.journal(paths, event="start", t=22.0, step=0)
    with pytest.raises(RuntimeError, match="last 3 attempts each failed before finishing a step"):
        refuse_hopeless_restart(paths, cfg, 0, rank=0, launched_at=15.0)
    refuse_hopeless_restart(paths, cfg, 0, rank=0, launched_at=30.0)          # the user's rerun: a new launch
    ckpt.journal(paths, step=1, loss=1.0, t=31.0)
    ckpt.journal(paths, event="diverged", step=5, config=config_fingerprint(cfg), message="stage1 diverged: x")
    with pytest.raises(StageDiverged, match="stage1 diverged: x"):
        refuse_hopeless_restart(paths, cfg, 4, rank=0, launched_at=30.0)
    refuse_hopeless_restart(paths, load_config("tiny", ["stage1.lr=1e-4"]), 4, rank=0, launched_at=30.0)


def test_step_journal_writes_only_on_flush(tmp_path):
    """Per-step entries stay in memory until a flush (the loop flushes on log/checkpoint steps and on exit),
    then land in order with their losses, after the entries written directly (start, diverged...)."""
    paths = ckpt.StagePaths(tmp_path, "stage1")
    ckpt.journal(paths, event="start", step=0)
    steps = ckpt.StepJournal(paths)
    steps.add(1, torch.tensor(2.5))
    steps.add(2, torch.tensor(float("nan")))
    assert [e.get("event") for e in ckpt.read_journal(paths)] == ["start"]       # nothing written yet
    steps.flush()
    steps.flush()                                                                  # idempotent
    entries = ckpt.read_journal(paths)
    assert [e["step"] for e in entries] == [0, 1, 2] and entries[1]["loss"] == 2.5
    assert entries[2]["loss"] != entries[2]["loss"]                                # NaN kept, not dropped


def test_image_grids_enlarge_small_images_without_blurring(tmp_path):
    """32 px reconstructions (the tiny preset) become 64 px tiles, each pixel a 2x2 block of its own value;
    64 px and larger images are written at their own size."""
    from PIL import Image
    small = torch.rand(3, 3, 32, 32)
    path = tracking.save_image_grid([small, 1 - small], ["input", "other"], tmp_path / "g.png")
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 + 2 * (64 + 2), 2 + 3 * (64 + 2), 3)
    first = grid[2:66, 2:66].astype(int)                          # the first tile, padding 2
    expect = (small[0].permute(1, 2, 0).numpy() * 255).round().astype(int)
    assert np.array_equal(first[::2, ::2], expect) and np.array_equal(first[1::2, 1::2], expect)
    assert path.with_suffix(".txt").read_text().startswith("rows (top to bottom): input, other")
    big = tracking.save_image_grid([torch.rand(2, 3, 64, 64)], ["input"], tmp_path / "b.png")
    assert np.asarray(Image.open(big)).shape == (2 + 66, 2 + 2 * 66, 3)
