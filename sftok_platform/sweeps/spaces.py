"""The sweep definitions: what each ablation varies, and how one trial's parameters become config overrides.

Three sweeps, mirroring the paper's ablations (SPEC F.3) plus an open-ended search:

==============  =====================================================  ==============================  ======
sweep           parameters (Tune search space)                         search algorithm                trains
==============  =====================================================  ==============================  ======
replace-ratio   replace_prob in {0 (vanilla), .5, .8, 1} x warm-up     ``tune.grid_search``            yes
                on/off (x seeds)                                       (BasicVariantGenerator)
decode-steps    decoding steps in {1, 2, 4, 8, 16}                     ``tune.grid_search``            no
search          replace_prob, unmasked-token weight, lr, share of a    ``OptunaSearch`` + ASHA         yes
                fixed step budget spent in stage 1                     (Optuna rejects grid_search, P11)
==============  =====================================================  ==============================  ======

Warm-up follows the paper's Table 3: "on" = stage 2 starts from the stage-1 ("warming up") EMA weights,
"off" = stage 2 starts from a fresh initialisation (as the official ``run_stage2.sh`` actually does). The
stage-1 run is identical for every warm-up trial of a grid, so the sweep trains it once and shares it.

A trial is identified by a deterministic *key* built from its parameters (``rp1-wu1-s0``), never by a
timestamp: the key names the trial's Ray Train runs, so an interrupted sweep that is restored resumes each
stage from its last checkpoint instead of starting over (PLATFORM.md P4).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from sftok_platform.config import Config, ConfigError

REPLACE_RATIOS = (0.0, 0.5, 0.8, 1.0)
DECODE_STEPS = (1, 2, 4, 8, 16)
KINDS = ("replace-ratio", "decode-steps", "search")

# search ranges (uniform unless noted); the lr range is around the tiny preset's 5e-4 and the official 1e-4
SEARCH_RANGES = {
    "replace_prob": (0.0, 1.0),
    "unmasked_weight": (0.01, 1.0),      # log-uniform; official 0.1
    "lr": (5e-5, 3e-3),                  # log-uniform
    "stage1_fraction": (0.0, 0.8),       # share of the step budget spent warming up (0 = no warm-up)
}


# ######################################################################################################
# Search spaces
# ######################################################################################################

def replace_ratio_space(ratios: Sequence[float] = REPLACE_RATIOS, warmup: Sequence[bool] = (True, False),
                        seeds: Sequence[int] = (0,)) -> dict:
    """Grid over replacement ratio x warm-up x seed (one trial per combination)."""
    from ray import tune
    for r in ratios:
        if not 0.0 <= float(r) <= 1.0:
            raise ConfigError(f"replacement ratio {r} is outside [0, 1]; use e.g. --ratios 0,0.5,0.8,1.")
    return {"replace_prob": tune.grid_search([float(r) for r in ratios]),
            "warmup": tune.grid_search([bool(w) for w in warmup]),
            "seed": tune.grid_search([int(s) for s in seeds])}


def decode_steps_space(steps: Sequence[int] = DECODE_STEPS) -> dict:
    """Grid over the number of decoding steps (eval only)."""
    from ray import tune
    steps = [int(s) for s in steps]
    if not steps or min(steps) < 1:
        raise ConfigError(f"decoding steps {steps}: use positive integers, e.g. --steps 1,2,4,8,16.")
    return {"steps": tune.grid_search(steps)}


def search_space(fixed: Optional[dict] = None, ranges: Optional[dict] = None) -> dict:
    """Optuna space over the continuous knobs.

    ``fixed`` pins knobs (e.g. ``{"stage1_fraction": 0}``); ``ranges`` replaces the default ``(low, high)``
    of a knob (``SEARCH_RANGES``).
    """
    from ray import tune
    fixed = dict(fixed or {})
    bounds = {**SEARCH_RANGES, **{k: tuple(v) for k, v in (ranges or {}).items()}}
    unknown = (set(fixed) - {"seed"} | set(ranges or {})) - set(SEARCH_RANGES)
    if unknown:
        raise ConfigError(f"unknown knob(s) {sorted(unknown)}: the search varies {', '.join(SEARCH_RANGES)} "
                          "(and seed).")
    for k, (lo, hi) in bounds.items():
        if not lo <= hi or (k in ("unmasked_weight", "lr") and lo <= 0):
            raise ConfigError(f"range of {k} = ({lo}, {hi}): need low <= high{' and low > 0 (log scale)' if k in ('unmasked_weight', 'lr') else ''}.")
    space: dict[str, Any] = {
        "replace_prob": tune.uniform(*bounds["replace_prob"]),
        "unmasked_weight": tune.loguniform(*bounds["unmasked_weight"]),
        "lr": tune.loguniform(*bounds["lr"]),
        "stage1_fraction": tune.uniform(*bounds["stage1_fraction"]),
        "seed": 0,
    }
    space.update(fixed)
    return space


# ######################################################################################################
# One trial's parameters -> config
# ######################################################################################################

def split_budget(budget: int, stage1_fraction: float) -> tuple[int, int]:
    """(stage-1 steps, stage-2 steps) of a fixed budget; stage 2 always gets at least one step."""
    if budget < 1:
        raise ConfigError(f"the step budget ({budget}) must be >= 1: raise stage1.steps + stage2.steps.")
    s1 = int(round(budget * min(max(float(stage1_fraction), 0.0), 1.0)))
    s1 = min(s1, budget - 1)
    return s1, budget - s1


def trial_overrides(params: dict, base: Config, *, budget: Optional[int] = None) -> dict[str, Any]:
    """Dotted config overrides of one training trial.

    ``replace_prob``/``unmasked_weight`` set stage 2; ``lr`` sets stages 1 and 2; ``seed`` sets the
    training seed (init and masks); ``stage1_fraction`` splits ``budget`` steps between stages 1 and 2.
    """
    out: dict[str, Any] = {}
    if "replace_prob" in params:
        out["stage2.replace_prob"] = float(params["replace_prob"])
    if "unmasked_weight" in params:
        out["stage2.unmasked_weight"] = float(params["unmasked_weight"])
    if "lr" in params:
        lr = float(params["lr"])
        out["stage1.lr"] = lr
        out["stage2.lr"] = lr
        for st in ("stage1", "stage2"):             # keep the cosine floor below the peak
            out[f"{st}.end_lr"] = min(getattr(base, st).end_lr, lr * 0.1)
    if "seed" in params:
        out["train.seed"] = base.train.seed + int(params["seed"])
    if "stage1_fraction" in params:
        s1, s2 = split_budget(budget if budget is not None else base.stage1.steps + base.stage2.steps,
                              params["stage1_fraction"])
        out["stage1.steps"] = s1
        out["stage2.steps"] = s2
        for st, n in (("stage1", s1), ("stage2", s2)):   # a short stage must still leave the warm-up
            out[f"{st}.warmup_steps"] = min(getattr(base, st).warmup_steps, max(n // 4, 0))
        if s1 == 0:                                     # no warm-up: stage 1 does not run at all
            out["run.stages"] = [s for s in base.run.stages if s != "stage1"]
    return out


def trial_key(params: dict, trial_id: str = "") -> str:
    """Deterministic, filesystem-safe name of a trial (grid: from its parameters; search: its Tune id)."""
    if "stage1_fraction" in params or "lr" in params:
        if not trial_id:
            raise ValueError("search trials are named by their Tune trial id")
        return f"t-{trial_id}"
    if "steps" in params:
        return f"steps{int(params['steps'])}"
    rp = f"{float(params.get('replace_prob', 0.0)):g}".replace(".", "p")
    return f"rp{rp}-wu{int(bool(params.get('warmup', True)))}-s{int(params.get('seed', 0))}"


def strategy_name(replace_prob: float) -> str:
    """The paper's row label: vanilla (visible slots = ground-truth codes) or SFVR."""
    return "Vanilla" if float(replace_prob) == 0.0 else "SFVR"


__all__ = ["REPLACE_RATIOS", "DECODE_STEPS", "KINDS", "SEARCH_RANGES", "replace_ratio_space",
           "decode_steps_space", "search_space", "split_budget", "trial_overrides", "trial_key",
           "strategy_name"]
