"""Ray Tune ablation sweeps (sftok_platform.sweeps, experiments/sweep.py).

Fast tests: search spaces and trial -> config mapping, the paper-shaped report, and that MLflow's sqlite
store keeps every metric when several processes write at once (the sweep's tracking choice).

End to end (``slow``; the suite's local Ray, tiny model, tiny synthetic data, a random teacher so stage 0
is skipped): the one-seed ablation with warm-up (SFVR vs vanilla: a 2-trial grid through Tune + Train +
MLflow, then decode-steps on one of its exports), run as a command on the suite's Ray that is killed mid-trial
(SIGKILL: the driver and its job's actors) and finished with ``--resume``; an Optuna + ASHA search where ASHA stops a diverging trial
and the stopped trial's workers are released.
"""
from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

FAST = ["data.synthetic_images=24", "data.synthetic_val_images=8", "stage1.steps=2", "stage2.steps=3",
        "stage1.global_batch_size=4", "stage2.global_batch_size=4", "stage1.warmup_steps=0",
        "stage2.warmup_steps=0", "train.log_every=1", "train.checkpoint_every=100", "train.max_failures=0",
        "eval.steps=[1,2]", "eval.max_images=4", "eval.batch_size=4", "tracking.system_metrics=false"]


# ######################################################################################################
# Fast
# ######################################################################################################

def test_spaces_and_trial_overrides():
    from ray import tune

    from sftok_platform.config import ConfigError, load_config
    from sftok_platform.sweeps import spaces
    cfg = load_config("tiny")
    grid = spaces.replace_ratio_space([0, 0.5, 1.0], [True, False], [0, 1])
    assert grid["replace_prob"] == tune.grid_search([0.0, 0.5, 1.0])
    assert grid["warmup"] == tune.grid_search([True, False])
    with pytest.raises(ConfigError, match=r"1.5 is not a replacement ratio in \[0, 1\]"):
        spaces.replace_ratio_space([1.5])
    with pytest.raises(ConfigError, match="unknown knob"):
        spaces.search_space({"replace_ratio": 1.0})
    with pytest.raises(ConfigError, match="low <= high"):
        spaces.search_space(ranges={"lr": (1e-2, 1e-3)})

    over = spaces.trial_overrides({"replace_prob": 0.8, "unmasked_weight": 0.2, "lr": 1e-3, "seed": 2,
                                   "stage1_fraction": 0.25}, cfg, budget=100)
    assert over["stage2.replace_prob"] == 0.8 and over["stage2.unmasked_weight"] == 0.2
    assert over["stage1.lr"] == over["stage2.lr"] == 1e-3
    assert (over["stage1.steps"], over["stage2.steps"]) == (25, 75)
    assert over["train.seed"] == cfg.train.seed + 2
    assert spaces.split_budget(10, 1.0) == (9, 1)          # stage 2 always trains
    assert spaces.split_budget(10, 0.0) == (0, 10)
    # no warm-up share: stage 1 leaves run.stages, so the trial config validates (stage steps must be >= 1)
    none = spaces.trial_overrides({"stage1_fraction": 0.0}, cfg, budget=10)
    assert none["stage1.steps"] == 0 and "stage1" not in none["run.stages"] and "stage2" in none["run.stages"]
    from sftok.config import apply_override
    for k, v in none.items():
        apply_override(cfg, k, v)
    cfg.validate()
    assert spaces.trial_key({"replace_prob": 0.5, "warmup": False, "seed": 1}) == "rp0p5-wu0-s1"
    assert spaces.trial_key({"steps": 8}) == "steps8"
    assert spaces.trial_key({"lr": 1e-3, "stage1_fraction": 0.1}, "abc_00001") == "t-abc_00001"


def test_report_one_row_per_trial_and_metric_named(tmp_path):
    from sftok_platform.sweeps import report
    rows = []
    for rp in (0.0, 0.5, 1.0):
        for wu in (True, False):
            for seed in (0, 1):
                rows.append({"trial_key": f"rp{rp}-wu{int(wu)}-s{seed}", "replace_prob": rp, "warmup": wu,
                             "seed": seed, "status": "finished", "val_loss": 5.0 - rp - 0.1 * seed,
                             "val_psnr_1step": 10.0, "val_psnr_2step": 10.0 + rp, "val_accuracy_2step": 0.1})
    rows.append({"trial_key": "rp1-wu1-s9", "replace_prob": 1.0, "warmup": True, "seed": 9,
                 "status": "stopped early", "last_train_loss": 6.9})
    files = report.write_report(rows, "replace-ratio", tmp_path, title="t")
    md = Path(files["markdown"]).read_text()
    table = md.split("One row per trial:")[1].split("Grouped over seeds:")[0]
    body = [line for line in table.splitlines() if line.startswith("| ") and "Training strategy" not in line]
    assert len(body) == len(rows)
    assert "val CE (1-step) ↓" in md and "PSNR@2 (dB) ↑" in md and "rFID" not in md
    assert "| Vanilla | 0 | 64 | ✓ |" in md and "| SFVR | 1 | 64 | ✗ |" in md
    assert "SFVR is better by 1" in md                       # PSNR@2 10+1 vs 10+0 (mean over 2 seeds)
    with open(files["csv"]) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert Path(files["plot_ratio"]).stat().st_size > 0 and Path(files["plot_steps"]).stat().st_size > 0

    # with the evaluation module's figures the table reports rFID, and says where it comes from
    ev = [{"trial_key": "a", "replace_prob": 1.0, "warmup": True, "seed": 0, "status": "finished",
           **report.flatten_eval({8: {"rFID": 4.3, "IS": 100.0, "psnr": 20.0}})}]
    assert ev[0]["rfid_8step"] == 4.3 and ev[0]["is_8step"] == 100.0
    assert report.metric_columns(ev)[0] == ("rfid_8step", "rFID@8", False)
    ev[0]["eval_inception_real"] = 0.0
    assert report.metric_columns(ev)[0] == ("rfid_8step", "rFID@8 (random Inception: not comparable)", False)
    assert report.flatten_eval({"rfid": {"1": 2.0, "8step": 1.5}}) == {"rfid_1step": 2.0, "rfid_8step": 1.5}

    steps_rows = [{"trial_key": f"steps{n}", "steps": n, "status": "finished", "psnr": 20.0 + n} for n in (1, 2, 4)]
    files = report.write_report(steps_rows, "decode-steps", tmp_path / "steps", title="s")
    md = Path(files["markdown"]).read_text()
    assert "| PSNR ↑ | 21 | 22 | 24 |" in md and Path(files["plot_steps"]).is_file()


def _log_many(uri: str, run_id: str, worker: int, n: int) -> None:
    from mlflow import MlflowClient
    c = MlflowClient(tracking_uri=uri)
    for i in range(n):
        c.log_metric(run_id, f"w{worker}", float(i), step=i)


def test_sqlite_holds_parallel_writers(tmp_path, seed_mlflow):
    """Why trials may share one sqlite store: MLflow 3 sets busy_timeout=20 s, so writers queue instead
    of failing with "database is locked". Four processes write at once; every value must arrive."""
    from mlflow import MlflowClient
    uri = seed_mlflow(tmp_path)
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("x", artifact_location=str(tmp_path / "art"))
    run_id = c.create_run(exp).info.run_id               # schema created before the writers start
    n, workers = 40, 4
    # fresh interpreters (no fork of this Ray-threaded process), mlflow imported once in the fork server
    # instead of in each writer: the writers start together and really contend for the database
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["mlflow"])
    procs = [ctx.Process(target=_log_many, args=(uri, run_id, w, n)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    for w in range(workers):
        assert sorted(m.step for m in c.get_metric_history(run_id, f"w{w}")) == list(range(n))


# ######################################################################################################
# End to end
# ######################################################################################################

@pytest.fixture(scope="module")
def env(tmp_path_factory, ray_cluster, seed_mlflow):
    """The suite's local Ray (dashboard on, State API reachable), a run root with a random stage-0-style teacher."""
    import torch

    from sftok_platform.config import load_config
    from sftok.maskgit_vqgan import MaskGITVQGAN
    from sftok_platform.train import checkpointing as ckpt
    root = tmp_path_factory.mktemp("sweeps")
    seed_mlflow(root / "runs")
    torch.manual_seed(0)
    _t = load_config("tiny").teacher
    ckpt.save_teacher(MaskGITVQGAN(_t.hidden_channels, _t.codebook_size, _t.z_channels, load_config("tiny").teacher_arch()),
                      root / "teacher", hidden_channels=_t.hidden_channels, codebook_size=_t.codebook_size,
                      z_channels=_t.z_channels, arch=load_config("tiny").teacher_arch())   # the tiny preset's layout
    overrides = FAST + [f"run.root={root / 'runs'}", f"teacher.weights={root / 'teacher' / 'teacher.safetensors'}"]
    return {"root": root, "overrides": overrides}


def _cfg(env, extra=()):
    from sftok_platform.config import load_config
    return load_config("tiny", list(env["overrides"]) + list(extra))


def _journal_starts(stage_dir: Path) -> list[dict]:
    p = stage_dir / "journal.jsonl"
    if not p.is_file():
        return []
    return [json.loads(x) for x in p.read_text().splitlines() if '"event": "start"' in x]


# stage 2 checkpoints every other step, so that a kill mid-trial leaves a checkpoint to resume from
ABLATION_STEPS = 8
ABLATION_EXTRA = [f"stage2.steps={ABLATION_STEPS}", "train.checkpoint_every=2"]
# `--warmup on`: the two warm-up trials; the no-warm-up path (stage 2 from a fresh init) runs in the ASHA test
ABLATION_KEYS = ["rp0-wu1-s0", "rp1-wu1-s0"]


def _recorded_checkpoints(trial_dir: Path) -> list[int]:
    """Steps of the stage-2 checkpoints Train V2 has recorded for this trial (the step dir alone appears
    earlier; a kill in between leaves nothing to resume from)."""
    from sftok_platform.train import checkpointing as ckpt
    runs = sorted((trial_dir / "ray").glob("*-stage2"))
    return ckpt.recorded_checkpoint_steps(runs[0]) if runs else []


def _steps_after_last_start(stage_dir: Path) -> list[int]:
    lines = [json.loads(x) for x in (stage_dir / "journal.jsonl").read_text().splitlines()]
    last = max(i for i, e in enumerate(lines) if e.get("event") == "start")
    return [e["step"] for e in lines[last:] if "loss" in e]


@pytest.fixture(scope="module")
def ablation(env, tmp_path_factory):
    """``sweep.py ablation --warmup on`` with one seed, started as a command that joins the suite's Ray (as a
    job joins a cluster; one trial at a time, so the kill finds one trial finished and the other mid-training
    with a recorded checkpoint) and killed (SIGKILL: the driver and every actor of its job) at that point; then the same sweep finished with
    ``run_ablation(resume=True)``. Returns both sweeps' results and what the kill left behind."""
    import ray

    from processes import kill_with_its_ray_workers
    from sftok_platform.sweeps import run_ablation
    args = ["ablation", "--preset", "tiny", "--name", "abl", "--seeds", "0", "--steps", "1,2", "--warmup", "on",
            "--concurrency", "1", *env["overrides"], *ABLATION_EXTRA]
    child_env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = tmp_path_factory.mktemp("ablation-log") / "sweep.log"
    sweep_runs = Path(_cfg(env).run.root) / "sweeps" / "abl" / "runs"

    def done(key: str) -> bool:
        return (sweep_runs / key / "stages" / "stage2" / "done.json").is_file()

    def mid_training(key: str) -> bool:
        steps = _recorded_checkpoints(sweep_runs / key)
        return bool(steps) and steps[-1] < ABLATION_STEPS and not done(key)

    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "experiments" / "sweep.py"), *args], cwd=REPO,
                                env=child_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 900
        try:
            while time.time() < deadline and proc.poll() is None:
                if any(done(k) for k in ABLATION_KEYS) and any(mid_training(k) for k in ABLATION_KEYS):
                    break
                time.sleep(0.1)
        finally:
            kill_with_its_ray_workers(proc)
    # the sweep and every process of its job are dead: what they left is final
    trials = {k: {"done": done(k), "checkpoints": _recorded_checkpoints(sweep_runs / k),
                  "starts": len(_journal_starts(sweep_runs / k / "stages" / "stage2"))} for k in ABLATION_KEYS}
    text = log.read_text()
    killed = {"returncode": proc.returncode, "trials": trials, "log": text[-3000:],
              "progress_bar_lines": sum(" row/s]" in line for line in text.splitlines())}
    if not (any(t["done"] for t in trials.values()) and any(mid_training(k) for k in ABLATION_KEYS)):
        pytest.fail(f"the sweep was not caught mid-trial after a finished trial: {killed}")
    cfg = _cfg(env, ABLATION_EXTRA)
    # the suite's Ray has 4 CPUs: two trials at a time (0.25 + 1 each) leave Ray Data's read tasks a CPU
    res, ds = run_ablation(cfg, name="abl", seeds=(0,), steps=(1, 2), warmup=(True,), resume=True, concurrency=2)
    return {"cfg": cfg, "res": res, "ds": ds, "killed": killed, "sweep_runs": sweep_runs}


@pytest.mark.slow
def test_ablation_end_to_end(ablation):
    """``sweep.py ablation --warmup on`` with one seed: SFVR (1.0) vs vanilla (0.0) through Tune + Train
    + MLflow (the stage-1 warm-up trained once and shared; one child run per trial with params, curves and
    final figures; table + plots on the parent), then decode-steps on the SFVR warm-up export: eval-only
    trials through the evaluation module, no training."""
    from sftok_platform import tracking
    from sftok_platform.sweeps import runs
    cfg, res, ds = ablation["cfg"], ablation["res"], ablation["ds"]
    assert ablation["killed"]["progress_bar_lines"] == 0      # no Ray Data bars from the trials' workers
    assert [r["status"] for r in res.rows] == ["finished"] * 2
    assert [(r["warmup"], r["replace_prob"]) for r in res.rows] == [(True, 0.0), (True, 1.0)]
    for r in res.rows:
        assert r["sweep_step"] == (cfg.stage1.steps if r["warmup"] else 0) + cfg.stage2.steps
        assert r["val_loss"] > 0 and r["val_psnr_2step"] > 0

    c = tracking.client(res.tracking_uri)
    trials = runs.trial_runs(cfg, res.parent_run_id)
    assert sorted(trials) == sorted(ABLATION_KEYS)
    for key, run in trials.items():
        assert run.info.status == "FINISHED"
        assert float(run.data.params["stage2.replace_prob"]) == float(key[2:].split("-")[0].replace("p", "."))
        offset = cfg.stage1.steps if "-wu1-" in key else 0
        curve = [m.step for m in c.get_metric_history(run.info.run_id, "loss")]   # every stage-2 log step, on sweep_step
        expected = [offset + i for i in range(1, cfg.stage2.steps + 1)]
        starts = _journal_starts(ablation["sweep_runs"] / key / "stages" / "stage2")
        if len(starts) > 1:
            # interrupted: SIGKILL may lose the last points before the kill, and the resumed run logs again
            # the steps after its checkpoint: every step from the resume point on is there, none off the grid
            resumed_at = starts[-1]["step"]
            assert set(curve) <= set(expected) and set(expected[resumed_at:]) <= set(curve), (key, curve)
        else:
            assert sorted(curve) == expected, (key, curve)
        assert "val_psnr_2step" in run.data.metrics and "val_loss" in run.data.metrics
    # the shared warm-up ran once, as a child of the sweep run
    exp = tracking.ensure_experiment(cfg)
    shared = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{res.parent_run_id}' and "
                                                "tags.`sftok.stage` = 'stage1'")
    assert len(shared) == 1
    journal = Path(res.sweep_dir) / "runs" / "shared" / "stages" / "stage1" / "journal.jsonl"
    assert sum('"event": "start"' in line for line in journal.read_text().splitlines()) == 1

    arts = {a.path for a in c.list_artifacts(res.parent_run_id, "report")}
    assert {"report/summary.md", "report/summary.csv", "report/metric_vs_replace_ratio.png",
            "report/metric_vs_steps.png"} <= arts
    with open(res.report_files["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 2
    md = Path(res.report_files["markdown"]).read_text()
    assert "val CE (1-step)" in md and "SFVR" in md
    assert c.get_run(res.parent_run_id).data.metrics["trials_finished"] == 2

    # the decode-steps half ran on the SFVR warm-up trial's export
    assert ds.name == "abl-decode-steps"
    assert c.get_run(ds.parent_run_id).data.params["sweep.checkpoint"].endswith("rp1-wu1-s0/stages/stage2/export")
    assert [(r["steps"], r["status"]) for r in ds.rows] == [(1, "finished"), (2, "finished")]
    assert all(r["psnr"] > 0 and "rfid" in r for r in ds.rows)
    md = Path(ds.report_files["markdown"]).read_text()
    assert "rFID (random Inception: not comparable)" in md and "| steps | 1 | 2 |" in md
    assert not list((Path(ds.sweep_dir) / "runs").glob("*/stages"))          # nothing was trained
    assert sorted(runs.trial_runs(cfg, ds.parent_run_id)) == ["steps1", "steps2"]


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_sweep_comparison(ablation):
    """The ablation as a user sees it in a browser (headless Chromium on ``mlflow ui``): the sweep run's
    report table rendered from its artifacts, its plot served, and the trials side by side on the
    compare page with their parameters and metrics. Skips where Chromium is not installed."""
    from mlflow_ui import MlflowUI
    from sftok_platform import tracking
    from sftok_platform.sweeps import runs
    cfg, res = ablation["cfg"], ablation["res"]
    c = tracking.client(res.tracking_uri)
    exp_id = c.get_run(res.parent_run_id).info.experiment_id
    trials = runs.trial_runs(cfg, res.parent_run_id)
    with MlflowUI(res.tracking_uri) as ui:
        html = ui.page(f"#/experiments/{exp_id}/runs/{res.parent_run_id}/artifacts/report/summary.md", "val CE (1-step)")
        assert "val CE (1-step)" in html and "SFVR" in html and "metric_vs_replace_ratio.png" in html
        assert ui.get(f"get-artifact?path=report%2Fmetric_vs_replace_ratio.png&run_uuid={res.parent_run_id}")[:8] \
            == b"\x89PNG\r\n\x1a\n"

        ids = ",".join(f'"{run.info.run_id}"' for run in trials.values())
        html = ui.page(f'#/compare-runs?runs=[{ids}]&experiments=["{exp_id}"]', ">ce_masked<")
        assert f"Comparing {len(trials)} Runs" in html and len(trials) == 2
        for run in trials.values():
            assert f">{run.info.run_name}<" in html, run.info.run_name
        # the parameter the ablation varies, and metric rows (the table is virtualised: the alphabetically
        # first rows are in the DOM, the val_* rows further down are not)
        assert ">stage2.replace_prob<" in html and ">accuracy<" in html and ">ce_masked<" in html


@pytest.mark.slow
def test_interrupted_sweep_resumes(ablation):
    """The ablation above was killed (SIGKILL: the driver and its job's actors) while trials trained, after one had
    finished; ``--resume`` (run_ablation(resume=True)) kept the finished trials, continued the interrupted
    ones from their last checkpoint (or from the start when they had none), ran the rest and completed the
    table, in the same MLflow runs."""
    from sftok_platform import tracking
    from sftok_platform.sweeps import runs
    killed, res, cfg = ablation["killed"], ablation["res"], ablation["cfg"]
    sweep_runs = ablation["sweep_runs"]
    assert killed["returncode"] == -signal.SIGKILL, killed["log"]
    at_kill = killed["trials"]
    assert any(t["done"] for t in at_kill.values()), killed
    mid = [k for k, t in at_kill.items() if not t["done"] and t["checkpoints"] and t["checkpoints"][-1] < ABLATION_STEPS]
    assert mid, killed
    assert [r["status"] for r in res.rows] == ["finished"] * 2
    for key, before in at_kill.items():
        stage = sweep_runs / key / "stages" / "stage2"
        starts = _journal_starts(stage)
        if before["done"]:                                   # finished before the kill: not trained again
            assert len(starts) == before["starts"] == 1, (key, starts)
        elif before["checkpoints"]:                          # interrupted: continued at its last checkpoint
            last = before["checkpoints"][-1]
            assert len(starts) == before["starts"] + 1 and starts[-1]["resumed"], (key, starts)
            assert starts[-1]["step"] == last and _steps_after_last_start(stage) == list(range(last + 1, ABLATION_STEPS + 1))
        else:                                                # not started, or started with nothing to resume
            assert len(starts) == before["starts"] + 1 and (starts[-1]["step"], starts[-1]["resumed"]) == (0, False), (key, starts)
            assert _steps_after_last_start(stage) == list(range(1, ABLATION_STEPS + 1))
    # the same MLflow runs: one sweep run, one run per trial
    c = tracking.client(res.tracking_uri)
    exp = tracking.ensure_experiment(cfg)
    sweeps = c.search_runs([exp], filter_string=f"tags.`{runs.TAG_SWEEP}` = 'abl' and tags.`{tracking.TAG_KIND}` = 'sweep'")
    assert [r.info.run_id for r in sweeps] == [res.parent_run_id]
    trial_runs = c.search_runs([exp], filter_string=f"tags.`{tracking.TAG_PARENT}` = '{res.parent_run_id}' and "
                                                    f"tags.`{tracking.TAG_KIND}` = 'trial'")
    assert len(trial_runs) == 2 and sorted(runs.trial_runs(cfg, res.parent_run_id)) == sorted(ABLATION_KEYS)
    # the grid ran again (Tune's state of the killed sweep set aside, not restored); every trial recorded the
    # figures a later --resume reports without training
    assert len(list(Path(res.sweep_dir).glob("tune.interrupted-*"))) == 1
    for key in ABLATION_KEYS:
        recorded = json.loads((sweep_runs / key / "trial.json").read_text())
        assert recorded["trial_key"] == key and recorded["trial_done"] == 1.0


@pytest.mark.slow
def test_asha_stops_a_diverging_trial_and_releases_its_workers(env):
    """Optuna + ASHA over two trials: trial 1 (lr 1e-3) sets the rung, trial 2 (lr 8, diverges) is stopped at
    the second rung, and its Train workers' placement group is removed, so the CPUs are free for the next
    trial. (A third trial only showed that the freed CPUs get used: the release is asserted directly.)"""
    import ray
    from ray.util.state import list_placement_groups

    from sftok_platform import tracking
    from sftok_platform.sweeps import run_sweep, runs
    cfg = _cfg(env)
    budget = cfg.stage1.steps + cfg.stage2.steps
    good = {"replace_prob": 1.0, "unmasked_weight": 0.1, "lr": 1e-3}
    res = run_sweep("search", cfg, name="asha", trials=2, concurrency=1, fixed={"stage1_fraction": 0.0},
                    ranges={"lr": (1e-4, 10.0)}, points_to_evaluate=[good, {**good, "lr": 8.0}], grace_steps=1)
    rows = {round(r["lr"], 6): r for r in res.rows}
    assert sorted(rows) == [0.001, 8.0]
    assert rows[0.001]["status"] == "finished" and rows[0.001]["sweep_step"] == budget
    bad = rows[8.0]
    assert bad["status"] == "stopped early" and bad["sweep_step"] < budget

    trials = runs.trial_runs(cfg, res.parent_run_id)
    stopped = trials[bad["trial_key"]]
    # the stopped Train run's workers are released (Train V2 PG cleanup through the State API)
    # (the cleaner works asynchronously: the groups and their CPUs come back within the deadline, not at once)
    deadline = time.time() + 90
    while True:
        live = [pg for pg in list_placement_groups() if pg.state not in ("REMOVED",)]
        free = ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
        if (not live and free) or time.time() > deadline:
            break
        time.sleep(2)
    assert not live, live
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    # Tune's verdict decides the run status, even where the stopped trial's own except block got to mark
    # the run FAILED first (a race seen once in CI; the driver now corrects it)
    stopped = tracking.client(res.tracking_uri).get_run(stopped.info.run_id)
    assert stopped.info.status == "KILLED", stopped.info.status
    assert tracking.client(res.tracking_uri).get_run(stopped.info.run_id).data.tags["sftok.trial_status"] == "stopped early"


def test_a_trial_that_cannot_fit_is_refused_before_any_work():
    """On a 2-CPU cluster a trial (0.25 driver + 1 worker) leaves no CPU for Ray Data's readers: it would
    wait for data forever, so the sweep refuses to start and says how to fix it."""
    from sftok_platform.config import ConfigError, load_config
    from sftok_platform.sweeps.driver import check_trial_fits
    cfg = load_config("tiny")
    with pytest.raises(ConfigError, match=r"needs 2.25 CPUs.*has 2.*--num-cpus 3"):
        check_trial_fits({"CPU": 2.0}, cfg, 0.25)
    check_trial_fits({"CPU": 4.0}, cfg, 0.25)
    gpu = load_config("tiny", ["train.gpu=true", "train.workers=2"])
    with pytest.raises(ConfigError, match="needs 2 GPUs"):
        check_trial_fits({"CPU": 16.0, "GPU": 1.0}, gpu, 0.25)


def test_search_objective_from_the_command_line():
    """--objective picks what Optuna optimises; loss-like figures are minimised, a typo is refused."""
    from sftok_platform.config import ConfigError, load_config
    from sftok_platform.sweeps.report import objective
    assert objective(load_config("tiny")) == ("val_psnr_8step", "max")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    try:
        import sweep
    finally:
        sys.path.pop(0)
    args = sweep.build_parser().parse_args(["search", "--objective", "val_loss", "--trials", "2"])
    assert objective(sweep.config_from_args(args)) == ("val_loss", "min")
    args = sweep.build_parser().parse_args(["search", "--objective", "val_accuracy_8step"])
    assert objective(sweep.config_from_args(args)) == ("val_accuracy_8step", "max")
    with pytest.raises(ConfigError, match="search_objective"):
        load_config("tiny", ["eval.search_objective=psnr"])


def test_replace_ratio_command_runs_the_grid_it_was_given(monkeypatch, capsys):
    """``sweep.py replace-ratio`` hands its ratios, warm-up switch, seeds and resume flags to run_sweep (the
    end-to-end sweep tests run the ``ablation`` command and run_sweep itself)."""
    import types

    import sftok_platform.sweeps as sweeps
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import sweep
    finally:
        sys.path.pop(0)
    calls = []

    def fake_run_sweep(kind, cfg, **kwargs):
        calls.append((kind, cfg, kwargs))
        return types.SimpleNamespace(name=kwargs["name"], rows=[{}, {}], seconds=1.0, parent_run_id="p",
                                     tracking_uri="sqlite:///x.db", report_files={"markdown": "/r/summary.md"})

    monkeypatch.setattr(sweeps, "run_sweep", fake_run_sweep)
    assert sweep.main(["replace-ratio", "--preset", "tiny", "--name", "rr", "--ratios", "0,1", "--warmup", "off",
                       "--seeds", "0,2", "--concurrency", "1", "--num-cpus", "3", "--resume", "stage2.steps=6"]) == 0
    (kind, cfg, kwargs), = calls
    assert kind == "replace-ratio" and cfg.stage2.steps == 6
    assert kwargs["ratios"] == [0.0, 1.0] and kwargs["warmup"] == [False] and kwargs["seeds"] == [0, 2]
    assert kwargs["name"] == "rr" and kwargs["resume"] and kwargs["concurrency"] == 1 and kwargs["num_cpus"] == 3.0
    assert "sweep 'rr': 2 trials" in capsys.readouterr().out


BAD_SWEEP_COMMANDS = [      # (command line, what the refusal must say)
    (["search", "--trials", "0"], "--trials 0: a search runs at least one trial"),
    (["search", "--seed", "-1"], "--seed -1: Optuna's sampler seed is an integer >= 0"),
    (["search", "--grace-steps", "0"], "--grace-steps 0: ASHA's grace period is 1 .. the step budget"),
    (["search", "--grace-steps", "100000"], "--grace-steps 100000: ASHA's grace period is 1 .. the step budget"),
    (["search", "--fix", "replace_prob=1.5"], "--fix replace_prob=1.5: replace_prob must be in [0, 1]"),
    (["search", "--fix", "lr=0"], "--fix lr=0: lr must be > 0"),
    (["search", "--range", "stage1_fraction=0.5,2"], "--range stage1_fraction=0.5,2: both ends must be in [0, 1]"),
    (["search", "--concurrency", "0"], "--concurrency 0: must be > 0"),
    (["search", "--driver-cpus", "0"], "--driver-cpus 0: must be > 0"),
    (["replace-ratio", "--ratios", ""], "--ratios: list at least one value, e.g. --ratios 0,0.5,0.8,1"),
    (["replace-ratio", "--ratios", "0,1.5"], "1.5 is not a replacement ratio in [0, 1]"),
    (["replace-ratio", "--seeds", "0,0"], "--seeds lists 0 twice"),
    (["replace-ratio", "--num-cpus", "-2"], "--num-cpus -2: must be > 0"),
    (["ablation", "--seeds", "-1"], "-1 is not a seed offset >= 0"),
    (["ablation", "--steps", "1,0"], "0 is not a number of decoding steps >= 1"),   # the half after the grid
    (["ablation", "--steps", ""], "--steps: list at least one value"),
    (["decode-steps", "--checkpoint", "/nonexistent/export"], "--checkpoint /nonexistent/export: no model.safetensors"),
    (["decode-steps", "--checkpoint", "x", "--steps", "2,2"], "--steps lists 2 twice"),
    (["decode-steps", "--checkpoint", "x", "--eval-cpus", "0"], "--eval-cpus 0: must be > 0"),
    (["decode-steps", "--checkpoint", "x", "--eval-gpus", "-1"], "--eval-gpus -1: use 0 (CPU) or a positive share"),
]


@pytest.mark.parametrize("argv,message", BAD_SWEEP_COMMANDS, ids=[" ".join(a) for a, _ in BAD_SWEEP_COMMANDS])
def test_bad_sweep_arguments_are_refused_before_ray_starts(argv, message, monkeypatch, capsys, tmp_path):
    """Out-of-range, empty and repeated sweep arguments end the command with exit code 2 and a message that
    names the flag and the fix, before Ray starts (the whole ablation's arguments before its first half)."""
    from sftok_platform.sweeps import driver
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import sweep
    finally:
        sys.path.pop(0)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a sweep whose arguments are bad")

    monkeypatch.setattr(driver, "connect", no_ray)
    assert sweep.main([*argv, "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("configuration error: ") and message in err, err
    assert not (tmp_path / "sweeps").exists()            # nothing written either


def test_ablation_warmup_switch_picks_the_trials_and_the_decode_export(monkeypatch):
    """``run_ablation(warmup=...)`` runs only the asked warm-up settings, and the decode-steps half takes the
    first seed's SFVR trial of the first setting (here the no-warm-up one); no setting is refused."""
    import types

    from sftok.config import ConfigError
    from sftok_platform.config import load_config
    from sftok_platform.sweeps import driver
    calls = []

    def result(rp, wu, seed):
        return types.SimpleNamespace(error=None, config={"replace_prob": rp, "warmup": wu, "seed": seed},
                                     metrics={"export": f"/x/rp{rp}-wu{int(wu)}-s{seed}"})

    def fake_run_sweep(kind, cfg, **kwargs):
        calls.append((kind, kwargs))
        grid = [result(rp, wu, s) for wu in kwargs.get("warmup", ()) for rp in (0.0, 1.0) for s in kwargs.get("seeds", ())]
        return types.SimpleNamespace(result_grid=grid, teacher="/t")

    monkeypatch.setattr(driver, "run_sweep", fake_run_sweep)
    cfg = load_config("tiny")
    driver.run_ablation(cfg, seeds=(3, 4), steps=(1, 8), warmup=[False], echo=lambda _: None)
    (kind, grid_kwargs), (kind2, decode_kwargs) = calls
    assert kind == "replace-ratio" and grid_kwargs["warmup"] == (False,) and grid_kwargs["ratios"] == (0.0, 1.0)
    assert kind2 == "decode-steps" and decode_kwargs["checkpoint"] == "/x/rp1.0-wu0-s3"
    with pytest.raises(ConfigError, match="--warmup on"):
        driver.run_ablation(cfg, seeds=(0,), warmup=(), echo=lambda _: None)


def test_a_search_with_an_empty_tune_state_file_is_refused(tmp_path):
    """A search restores Tune's files; where a kill left the newest searcher state empty (seen with a grid's
    ``basic-variant-state``), the restore is refused with what to do instead of silently starting over."""
    from sftok_platform.sweeps.driver import _check_tune_state
    (tmp_path / "experiment_state-2026-12-07_21-15-18.json").write_text("{}")
    (tmp_path / "searcher-state-2026-12-07_21-10-00.pkl").write_bytes(b"old")
    (tmp_path / "tmp-searcher-state-2026-12-07_21-15-18.pkl").write_bytes(b"")     # a temporary: ignored
    _check_tune_state(tmp_path)
    (tmp_path / "searcher-state-2026-12-07_21-15-18.pkl").write_bytes(b"")
    with pytest.raises(RuntimeError, match="searcher-state-2026-12-07_21-15-18.pkl is empty.*new --name"):
        _check_tune_state(tmp_path)
