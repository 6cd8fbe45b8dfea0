"""MLflow for sweeps: one parent run per sweep, one child run per trial, and the Train callback that feeds
both Tune and the trial's MLflow run.

Run tree (all in ``tracking.experiment``)::

    sweep run  (sftok.kind=sweep)            params: sweep kind + base config; artifacts: table, CSV, plots
    ├── shared-stage0 / shared-stage1        stages every trial reuses (trained once by the sweep driver)
    └── trial run  (sftok.kind=trial)        params: the trial's knobs; metrics: curves + final figures
        └── <trial>-stage1 / -stage2         the stage runs ``run_stage`` creates (rank-0 curves, images)

Runs are found again by their tags (sweep name, trial key), so a restored sweep continues the same runs.

Why sqlite is safe here: MLflow 3.17 opens every sqlite session with ``PRAGMA busy_timeout = 20000``
(``mlflow/store/db/utils.py``), so concurrent writers on one machine wait for the lock instead of failing
with "database is locked"; the sweep driver creates the database and the experiment before any trial
starts, so the schema migration never races. ``tests/test_sweeps.py`` proves it by writing from several
processes at once and counting every value. Across machines use a tracking server (``tracking.uri=
http://<head>:5000``); sqlite on NFS is not safe.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping

from ray.tune.integration.ray_train import TuneReportCallback

from sftok_platform.config import Config
from sftok_platform import tracking

log = logging.getLogger(__name__)

TAG_SWEEP = "sftok.sweep"
TAG_TRIAL = "sftok.trial"
TAG_SWEEP_KIND = "sftok.sweep_kind"


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[k] = float(v)      # NaN / inf kept: a diverged trial's curve shows it (MLflow stores them)
    return out


def _find_or_create(cfg: Config, tags: dict[str, str], name: str) -> str:
    c = tracking.client(cfg)
    exp_id = tracking.ensure_experiment(cfg)
    run_id = tracking._find_run(c, exp_id, tags)
    if run_id is None:
        run_id = c.create_run(exp_id, run_name=name, tags=tags).info.run_id
    else:
        c.update_run(run_id, status="RUNNING")
    return run_id


def start_sweep_run(cfg: Config, sweep: str, kind: str, params: Mapping[str, Any]) -> str:
    """Find (restored sweep) or create the sweep's parent run; logs the sweep description as params."""
    run_id = _find_or_create(cfg, {TAG_SWEEP: sweep, tracking.TAG_KIND: "sweep", TAG_SWEEP_KIND: kind},
                             f"sweep-{sweep}")
    c = tracking.client(cfg)
    tracking._log_params_once(c, run_id, {**{f"sweep.{k}": v for k, v in params.items()},
                                          **tracking.curated_params(cfg)})
    return run_id


def start_trial_run(cfg: Config, sweep: str, parent_run_id: str, key: str, params: Mapping[str, Any]) -> str:
    """Find or create the child run of one trial (tags: sweep name, trial key, parent)."""
    tags = {TAG_SWEEP: sweep, tracking.TAG_KIND: "trial", TAG_TRIAL: key, tracking.TAG_PARENT: parent_run_id}
    run_id = _find_or_create(cfg, tags, key)
    c = tracking.client(cfg)
    tracking._log_params_once(c, run_id, {k: v for k, v in params.items()})
    return run_id


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """Numeric entries of ``metrics`` at ``step`` in one batch (non-numbers are skipped)."""
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, int(step)) for k, v in _numbers(metrics).items()]
    c = tracking.client(uri)
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i:i + 500])


def trial_runs(cfg: Config, parent_run_id: str) -> dict[str, Any]:
    """``trial key -> mlflow Run`` of every trial run under a sweep run."""
    c = tracking.client(cfg)
    exp_id = tracking.ensure_experiment(cfg)
    runs = c.search_runs([exp_id], filter_string=f"tags.`{tracking.TAG_PARENT}` = '{parent_run_id}' and "
                                                 f"tags.`{tracking.TAG_KIND}` = 'trial'", max_results=5000)
    return {r.data.tags[TAG_TRIAL]: r for r in runs}


# ######################################################################################################
# The Train -> Tune (+ MLflow) bridge
# ######################################################################################################

class SweepReporter(TuneReportCallback):
    """A ``TuneReportCallback`` that also puts ``sweep_step`` and ``stage`` into every result and logs the
    numbers as curves of the trial's MLflow run.

    ``sweep_step`` (= steps of earlier stages of the trial + this stage's step) is ASHA's time attribute,
    ``objective`` (search sweeps) is Optuna's metric: NaN until the stage-2 validation figure exists.
    so trials that split their budget differently between stages are compared at equal compute. The
    callback runs in the Train controller, once per ``ray.train.report`` (every ``train.log_every`` steps);
    it must be built inside the Tune trial (the parent class grabs the trial's result queue).
    """

    def __init__(self, stage: str, step_offset: int, uri: str, trial_run_id: str, objective_key: str = ""):
        super().__init__()
        self.stage, self.offset, self.uri, self.run_id = stage, int(step_offset), uri, trial_run_id
        self.objective_key = objective_key

    def after_report(self, run_context, metrics, checkpoint):
        m = dict(metrics[0]) if metrics else {}
        step = self.offset + int(m.get("step", 0))
        m.update(sweep_step=step, stage=self.stage)
        if self.objective_key:      # OptunaSearch reads its metric from every result: NaN until it exists
            m["objective"] = float(m.get(self.objective_key, float("nan"))) if self.stage == "stage2" else float("nan")
        try:
            placeholder = m.get("objective") != m.get("objective")    # Optuna's NaN before stage 2: not a value
            log_metrics(self.uri, self.run_id,
                        {k: v for k, v in m.items() if k != "step" and not (k == "objective" and placeholder)}, step)
        except Exception as e:          # a tracking hiccup must not kill the training run
            log.warning("could not log sweep metrics to MLflow: %s", e)
        super().after_report(run_context, [m] + list(metrics[1:]), checkpoint)


__all__ = ["TAG_SWEEP", "TAG_TRIAL", "start_sweep_run", "start_trial_run", "log_metrics",
           "trial_runs", "SweepReporter"]
