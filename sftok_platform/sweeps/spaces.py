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
# Checking a sweep's arguments (before Ray starts)
# ######################################################################################################

# where each search knob may lie; the log-scale knobs (lr, unmasked_weight) only need to be > 0
KNOB_DOMAINS = {"replace_prob": (0.0, 1.0), "stage1_fraction": (0.0, 1.0)}
LOG_KNOBS = ("unmasked_weight", "lr")


def _listed(values, flag: str, example: str, *, check, what: str) -> list:
    """``values`` as a list that is non-empty, holds no value twice and passes ``check`` for each value."""
    values = list(values)
    if not values:
        raise ConfigError(f"{flag}: list at least one value, e.g. {flag} {example}.")
    bad = [v for v in values if not check(v)]
    if bad:
        raise ConfigError(f"{flag} {','.join(f'{v:g}' if isinstance(v, float) else str(v) for v in values)}: "
                          f"{bad[0]} is not {what}; e.g. {flag} {example}.")
    if len(set(values)) < len(values):
        twice = next(v for v in values if values.count(v) > 1)
        raise ConfigError(f"{flag} lists {twice} twice: every value is one trial, named after it.")
    return values


def check_ratios(ratios: Sequence[float]) -> list[float]:
    return _listed([float(r) for r in ratios], "--ratios", "0,0.5,0.8,1", check=lambda r: 0.0 <= r <= 1.0,
                   what="a replacement ratio in [0, 1]")


def check_seeds(seeds: Sequence[int]) -> list[int]:
    return _listed([int(s) for s in seeds], "--seeds", "0,1,2", check=lambda s: s >= 0,
                   what="a seed offset >= 0 (it is added to train.seed)")


def check_warmup(warmup: Sequence[bool]) -> list[bool]:
    """The warm-up settings in order, each once (``on,on`` is ``on``)."""
    return _listed(list(dict.fromkeys(bool(w) for w in warmup)), "--warmup", "on,off", check=lambda w: True,
                   what="on or off")


def check_decode_steps(steps: Sequence[int]) -> list[int]:
    return _listed([int(s) for s in steps], "--steps", "1,2,4,8,16", check=lambda s: s >= 1,
                   what="a number of decoding steps >= 1")


def check_search_knobs(fixed: Optional[dict], ranges: Optional[dict]) -> dict[str, tuple[float, float]]:
    """The search's ``(low, high)`` per knob after ``ranges``; refuses unknown knobs and values outside a
    knob's domain (``KNOB_DOMAINS``, ``> 0`` for the log-scale ones), in ``fixed`` and in ``ranges``."""
    fixed, ranges = dict(fixed or {}), dict(ranges or {})
    unknown = (set(fixed) - {"seed"} | set(ranges)) - set(SEARCH_RANGES)
    if unknown:
        raise ConfigError(f"unknown knob(s) {sorted(unknown)}: the search varies {', '.join(SEARCH_RANGES)} "
                          "(and seed).")

    def inside(k: str, v: float) -> bool:
        lo, hi = KNOB_DOMAINS.get(k, (0.0, float("inf")))
        return lo <= v <= hi and (v > 0 or k not in LOG_KNOBS)

    def domain(k: str) -> str:
        return "> 0 (log scale)" if k in LOG_KNOBS else "in [{:g}, {:g}]".format(*KNOB_DOMAINS[k])

    for k, v in fixed.items():
        if k == "seed":
            if float(v) != int(v) or int(v) < 0:
                raise ConfigError(f"--fix seed={v:g}: a seed offset is an integer >= 0.")
        elif not inside(k, float(v)):
            raise ConfigError(f"--fix {k}={v:g}: {k} must be {domain(k)}.")
    bounds = {**SEARCH_RANGES, **{k: tuple(float(x) for x in v) for k, v in ranges.items()}}
    for k, (lo, hi) in bounds.items():
        if not lo <= hi:
            raise ConfigError(f"--range {k}={lo:g},{hi:g}: need low <= high.")
        if not (inside(k, lo) and inside(k, hi)):
            raise ConfigError(f"--range {k}={lo:g},{hi:g}: both ends must be {domain(k)}.")
    return bounds


def check_sweep_arguments(kind: str, *, evaluation: str = "val", ratios=None, warmup=(True, False), seeds=(0,),
                          steps=None, checkpoint: str = "", trials: int = 16, fixed: Optional[dict] = None,
                          ranges: Optional[dict] = None, concurrency: Optional[int] = None,
                          driver_cpus: float = 0.25, eval_cpus: float = 1.0, eval_gpus: float = 0.0,
                          grace_steps: Optional[int] = None, optuna_seed: int = 0,
                          num_cpus: Optional[float] = None, budget: Optional[int] = None) -> None:
    """Refuse, before Ray starts and before any training, every argument of a sweep that is out of range,
    empty or repeated, saying which flag and how to fix it (``run_sweep`` calls this first). ``budget``:
    the search's step budget (``stage1.steps + stage2.steps``), which the ASHA grace period must not pass."""
    if kind not in KINDS:
        raise ConfigError(f"unknown sweep {kind!r}; use {', '.join(KINDS)}.")
    if evaluation not in ("val", "full"):
        raise ConfigError(f"--evaluation {evaluation!r}: use val (validation CE/PSNR) or full (rFID etc.).")
    positive = [("--concurrency", concurrency), ("--num-cpus", num_cpus)]
    if kind == "decode-steps":
        positive.append(("--eval-cpus", eval_cpus))
        if eval_gpus < 0:
            raise ConfigError(f"--eval-gpus {eval_gpus:g}: use 0 (CPU) or a positive share of a GPU, e.g. 0.5.")
        if not checkpoint:
            raise ConfigError("decode-steps needs --checkpoint <export dir> (model.safetensors + config.json), "
                              "e.g. runs/<run>/stages/stage3/export.")
        if steps is not None:
            check_decode_steps(steps)
    else:
        positive.append(("--driver-cpus", driver_cpus))
    for flag, value in positive:
        if value is not None and not value > 0:
            raise ConfigError(f"{flag} {value:g}: must be > 0 (leave it out for the default).")
    if kind == "replace-ratio":
        if ratios is not None:
            check_ratios(ratios)
        check_warmup(warmup)
        check_seeds(seeds)
    elif kind == "search":
        if trials < 1:
            raise ConfigError(f"--trials {trials}: a search runs at least one trial, e.g. --trials 16.")
        if optuna_seed < 0:
            raise ConfigError(f"--seed {optuna_seed}: Optuna's sampler seed is an integer >= 0.")
        if grace_steps is not None and not 1 <= grace_steps <= (budget or grace_steps):
            raise ConfigError(f"--grace-steps {grace_steps}: ASHA's grace period is 1 .. the step budget "
                              f"({budget} = stage1.steps + stage2.steps); leave it out for budget / 4.")
        check_search_knobs(fixed, ranges)


# ######################################################################################################
# Search spaces
# ######################################################################################################

def replace_ratio_space(ratios: Sequence[float] = REPLACE_RATIOS, warmup: Sequence[bool] = (True, False),
                        seeds: Sequence[int] = (0,)) -> dict:
    """Grid over replacement ratio x warm-up x seed (one trial per combination)."""
    from ray import tune
    return {"replace_prob": tune.grid_search(check_ratios(ratios)),
            "warmup": tune.grid_search(check_warmup(warmup)),
            "seed": tune.grid_search(check_seeds(seeds))}


def decode_steps_space(steps: Sequence[int] = DECODE_STEPS) -> dict:
    """Grid over the number of decoding steps (eval only)."""
    from ray import tune
    return {"steps": tune.grid_search(check_decode_steps(steps))}


def search_space(fixed: Optional[dict] = None, ranges: Optional[dict] = None) -> dict:
    """Optuna space over the continuous knobs.

    ``fixed`` pins knobs (e.g. ``{"stage1_fraction": 0}``); ``ranges`` replaces the default ``(low, high)``
    of a knob (``SEARCH_RANGES``).
    """
    from ray import tune
    bounds = check_search_knobs(fixed, ranges)
    fixed = dict(fixed or {})
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


__all__ = ["REPLACE_RATIOS", "DECODE_STEPS", "KINDS", "SEARCH_RANGES", "check_sweep_arguments", "replace_ratio_space",
           "decode_steps_space", "search_space", "split_budget", "trial_overrides", "trial_key",
           "strategy_name"]
