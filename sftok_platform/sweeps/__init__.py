"""Ray Tune ablation sweeps over the SFTok training stages, compared in MLflow.

    from sftok_platform.sweeps import run_sweep
    result = run_sweep("replace-ratio", load_config("tiny"))           # paper Table 3/4 on this machine
    result = run_sweep("decode-steps", cfg, checkpoint="runs/x/stages/stage3/export")
    result = run_sweep("search", cfg, trials=16)                       # Optuna + ASHA

Modules: ``spaces`` (what each sweep varies, trial -> config overrides), ``driver`` (Tune function
trainables that run Train stages via ``sftok_platform.train.run_stage``; shared stages; ``Tuner.restore``),
``runs`` (MLflow: a parent run per sweep, a child per trial; the Train -> Tune reporter), ``report``
(paper-shaped tables, CSV, plots). The command line is ``experiments/sweep.py``.
"""
from sftok_platform.sweeps.driver import SweepContext, SweepResult, evaluate_export, run_ablation, run_sweep
from sftok_platform.sweeps.report import collect_rows, write_report
from sftok_platform.sweeps.spaces import (decode_steps_space, replace_ratio_space, search_space, split_budget,
                                          trial_key, trial_overrides)

__all__ = ["run_sweep", "run_ablation", "SweepContext", "SweepResult", "evaluate_export", "collect_rows",
           "write_report", "replace_ratio_space", "decode_steps_space", "search_space", "split_budget",
           "trial_key", "trial_overrides"]
