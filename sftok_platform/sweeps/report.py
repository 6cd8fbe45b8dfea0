"""Sweep summaries shaped like the paper's ablation tables (SPEC F.3): printed, saved as Markdown + CSV,
plotted (metric vs replacement ratio, metric vs decoding steps) and logged to the sweep's MLflow run.

Which metric: the evaluation module's figures when a trial has them (``rfid_<n>step`` etc., rFID with real
Inception weights only when ``eval.inception_weights`` is set), otherwise the stage-2 validation figures:
``val CE`` (1-step cross-entropy against the teacher codes) and ``PSNR`` / token accuracy after n-step
decoding. The table header names the metric actually used; nothing is relabelled as rFID.
"""
from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

from sftok_platform.config import Config

# metric key stem -> (label, higher is better)
METRICS = {
    "rfid": ("rFID", False), "inception_score": ("IS", True), "is": ("IS", True), "psnr": ("PSNR", True),
    "ssim": ("SSIM", True), "lpips": ("LPIPS", False), "accuracy": ("token acc", True),
    "codebook_usage": ("usage", True), "codebook_entropy": ("entropy", True),
}


def objective(cfg: Config) -> tuple[str, str]:
    """The search objective and its direction. ``eval.search_objective`` names a ``val_*`` figure of the
    stage-2 validation (``val_loss`` / ``val_ce*`` are minimised, anything else maximised); empty means PSNR
    after the largest configured number of decoding steps, maximised."""
    key = cfg.eval.search_objective or f"val_psnr_{max(cfg.eval.steps)}step"
    return key, ("min" if key.startswith(("val_loss", "val_ce")) else "max")


# ######################################################################################################
# Rows
# ######################################################################################################

def flatten_eval(out: Any) -> dict[str, float]:
    """The evaluation module's result as flat ``<metric>_<n>step`` numbers.

    Accepts ``{n: {metric: v}}``, ``{metric: {n: v}}``, ``{"steps": {n: {...}}}`` or already-flat keys.
    """
    flat: dict[str, float] = {}

    def add(metric: str, n: Any, v: Any) -> None:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            m = re.sub(r"[^a-z0-9]+", "_", str(metric).lower()).strip("_")
            flat[f"{m}_{int(n)}step" if n is not None else m] = float(v)

    def is_step(k: Any) -> bool:
        return isinstance(k, int) or (isinstance(k, str) and re.fullmatch(r"\d+(step|steps)?", k) is not None)

    def step_of(k: Any) -> int:
        return int(re.match(r"\d+", str(k)).group())

    if isinstance(out, dict) and isinstance(out.get("steps"), dict):    # sftok_platform.evaluate's layout
        for k in ("codebook_usage", "codebook_entropy", "num_images"):
            add(k, None, out.get(k))
        inception = out.get("inception")
        if isinstance(inception, dict) and "paper_comparable" in inception:
            flat["eval_inception_real"] = float(bool(inception["paper_comparable"]))
        out = out["steps"]
    for k, v in (out or {}).items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                if is_step(k):
                    add(k2, step_of(k), v2)
                elif is_step(k2):
                    add(k, step_of(k2), v2)
                else:
                    add(f"{k}_{k2}", None, v2)
        else:
            add(k, None, v)
    return flat


def collect_rows(grid, kind: str, *, budget: int = 0) -> list[dict]:
    """One row per trial of a Tune ``ResultGrid``: the trial's parameters, status and final figures."""
    from sftok_platform.sweeps.spaces import trial_key
    rows = []
    # Tune's own trial status tells an ASHA stop (TERMINATED) from an interrupted sweep (RUNNING/PENDING);
    # ResultGrid has no public per-trial status in Ray 2.60, so read it where it lives, tolerantly.
    analysis = getattr(grid, "_experiment_analysis", None)
    tune_status = {t.trial_id: t.status for t in getattr(analysis, "trials", None) or []}
    for result in grid:
        params = dict(result.config or {})
        m = dict(result.metrics or {})
        state = tune_status.get(m.get("trial_id", ""), "TERMINATED")
        if result.error is not None or state == "ERROR":
            status = "error"
        elif m.get("trial_done"):
            status = "finished"
        elif state in ("TERMINATED", "STOPPED"):
            status = "stopped early"
        else:
            status = "interrupted"
        key = m.get("trial_key") or trial_key(params, m.get("trial_id", ""))
        row = {"trial_key": key, **params, "status": status, "sweep_step": m.get("sweep_step"),
               "iterations": m.get("training_iteration")}
        for k, v in m.items():
            if _is_metric_key(k) and isinstance(v, (int, float)) and not isinstance(v, bool):
                row[k] = float(v)
        if status == "stopped early" and "loss" in m:
            row["last_train_loss"] = float(m["loss"])
        rows.append(row)
    order = {"replace-ratio": lambda r: (not r.get("warmup", True), r.get("replace_prob", 0), r.get("seed", 0)),
             "decode-steps": lambda r: r.get("steps", 0),
             "search": lambda r: r["trial_key"]}[kind]
    return sorted(rows, key=order)


def _is_metric_key(k: str) -> bool:
    return (k.startswith("val_") or k.endswith("step") and re.search(r"_\d+step$", k) is not None
            or k in ("rfid", "is", "psnr", "psnr_y", "ssim", "lpips", "inception_score", "accuracy", "eval_seconds",
                     "codebook_usage", "codebook_entropy", "eval_inception_real", "num_images"))


# ######################################################################################################
# Metric columns
# ######################################################################################################

def _steps_in(rows: list[dict], prefix: str) -> list[int]:
    steps = set()
    for r in rows:
        for k in r:
            mt = re.fullmatch(re.escape(prefix) + r"_(\d+)step", k)
            if mt:
                steps.add(int(mt.group(1)))
    return sorted(steps)


def metric_columns(rows: list[dict]) -> list[tuple[str, str, bool]]:
    """``(key, header, higher_is_better)`` of the figures the table shows, best source first."""
    cols: list[tuple[str, str, bool]] = []
    if any("steps" in r for r in rows):          # decode-steps: the figures carry no step suffix
        for stem in ("rfid", "is", "inception_score", "psnr", "ssim", "lpips", "accuracy"):
            if any(stem in r for r in rows):
                label, hib = METRICS[stem]
                real = all(r.get("eval_inception_real", 1.0) == 1.0 for r in rows)
                note = "" if stem != "rfid" or real else " (random Inception: not comparable)"
                cols.append((stem, label + note, hib))
        return cols
    rfid_steps = _steps_in(rows, "rfid")
    if rfid_steps:
        n = max(rfid_steps)
        real = all(r.get("eval_inception_real", 1.0) == 1.0 for r in rows)
        cols.append((f"rfid_{n}step", f"rFID@{n}" + ("" if real else " (random Inception: not comparable)"),
                     False))
        for stem in ("is", "inception_score", "psnr", "ssim", "lpips"):
            if any(f"{stem}_{n}step" in r for r in rows):
                label, hib = METRICS[stem]
                cols.append((f"{stem}_{n}step", f"{label}@{n}", hib))
        return cols
    if any("val_loss" in r for r in rows):
        cols.append(("val_loss", "val CE (1-step)", False))
    psnr = _steps_in(rows, "val_psnr") or _steps_in(rows, "psnr")
    acc = _steps_in(rows, "val_accuracy") or _steps_in(rows, "accuracy")
    pre = "val_" if _steps_in(rows, "val_psnr") else ""
    if psnr:
        n = max(psnr)
        cols.append((f"{pre}psnr_{n}step", f"PSNR@{n} (dB)", True))
        if len(psnr) > 1 and min(psnr) != n:
            cols.append((f"{pre}psnr_{min(psnr)}step", f"PSNR@{min(psnr)} (dB)", True))
    if acc:
        n = max(acc)
        cols.append((f"{pre}accuracy_{n}step", f"token acc@{n}", True))
    return cols


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


# ######################################################################################################
# Tables
# ######################################################################################################

def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def trial_table(rows: list[dict], kind: str, num_tokens: int = 64) -> tuple[list[str], list[list[str]]]:
    """The per-trial table (one row per trial)."""
    from sftok_platform.sweeps.spaces import strategy_name
    cols = metric_columns(rows)
    arrows = [f"{h} {'↑' if hib else '↓'}" for _, h, hib in cols]
    if kind == "replace-ratio":
        header = ["Training strategy", "Replacement ratio", "#Token", "Warm-up", "Seed", *arrows, "status"]
        body = [[strategy_name(r.get("replace_prob", 0)), _fmt(r.get("replace_prob")), str(num_tokens),
                 "✓" if r.get("warmup", True) else "✗", str(r.get("seed", 0)), *[_fmt(r.get(k)) for k, _, _ in cols],
                 r["status"]] for r in rows]
    elif kind == "decode-steps":
        header = ["steps", *arrows, "status"]
        body = [[str(r.get("steps")), *[_fmt(r.get(k)) for k, _, _ in cols], r["status"]] for r in rows]
    else:
        header = ["trial", "replace_prob", "unmasked_weight", "lr", "stage1_fraction", *arrows,
                  "last train loss", "steps run", "status"]
        body = [[r["trial_key"], _fmt(r.get("replace_prob"), 3), _fmt(r.get("unmasked_weight"), 3),
                 _fmt(r.get("lr"), 3), _fmt(r.get("stage1_fraction"), 3), *[_fmt(r.get(k)) for k, _, _ in cols],
                 _fmt(r.get("last_train_loss")), _fmt(r.get("sweep_step")), r["status"]] for r in rows]
    return header, body


def steps_table(rows: list[dict]) -> Optional[tuple[list[str], list[list[str]]]]:
    """Decode-steps in the paper's layout (steps across, metrics down), from a decode-steps sweep."""
    steps = [r.get("steps") for r in rows if r.get("steps") is not None]
    if not steps:
        return None
    metrics = [k for k in ("rfid", "is", "inception_score", "psnr", "ssim", "lpips", "accuracy")
               if any(k in r for r in rows)]
    header = ["steps", *[str(s) for s in steps]]
    body = []
    for k in metrics:
        label, hib = METRICS[k]
        body.append([f"{label} {'↑' if hib else '↓'}", *[_fmt(r.get(k)) for r in rows]])
    return header, body


def aggregate_table(rows: list[dict], num_tokens: int = 64) -> Optional[tuple[list[str], list[list[str]]]]:
    """Replace-ratio trials grouped over seeds: mean ± std (n) per (strategy, ratio, warm-up)."""
    from sftok_platform.sweeps.spaces import strategy_name
    done = [r for r in rows if r["status"] == "finished"]
    if not done:
        return None
    cols = metric_columns(done)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in done:
        groups[(float(r.get("replace_prob", 0)), bool(r.get("warmup", True)))].append(r)
    header = ["Training strategy", "Replacement ratio", "#Token", "Warm-up", "seeds",
              *[f"{h} {'↑' if hib else '↓'} (mean ± std)" for _, h, hib in cols]]
    body = []
    for (rp, wu), rs in sorted(groups.items(), key=lambda kv: (not kv[0][1], kv[0][0])):
        cells = []
        for k, _, _ in cols:
            vals = [r[k] for r in rs if isinstance(r.get(k), float)]
            if vals:
                m, s = _mean_std(vals)
                cells.append(f"{m:.4g} ± {s:.2g}")
            else:
                cells.append("-")
        body.append([strategy_name(rp), _fmt(rp), str(num_tokens), "✓" if wu else "✗", str(len(rs)), *cells])
    return header, body


def sfvr_vs_vanilla(rows: list[dict]) -> list[str]:
    """Sentences comparing replace_prob 1.0 with 0.0 (same warm-up setting), averaged over seeds."""
    done = [r for r in rows if r["status"] == "finished"]
    cols = metric_columns(done)
    out = []
    for wu in (True, False):
        for key, label, hib in cols:
            a = [r[key] for r in done if r.get("replace_prob") == 1.0 and bool(r.get("warmup", True)) == wu
                 and key in r]
            b = [r[key] for r in done if r.get("replace_prob") == 0.0 and bool(r.get("warmup", True)) == wu
                 and key in r]
            if not a or not b:
                continue
            (ma, sa), (mb, sb) = _mean_std(a), _mean_std(b)
            better = (ma > mb) if hib else (ma < mb)
            out.append(f"warm-up {'on' if wu else 'off'}: {label} SFVR(1.0) {ma:.4g} ± {sa:.2g} vs vanilla(0.0) "
                       f"{mb:.4g} ± {sb:.2g} over {len(a)}/{len(b)} seed(s): SFVR is "
                       f"{'better' if better else 'not better'} by {abs(ma - mb):.3g}.")
    return out


# ######################################################################################################
# Files and plots
# ######################################################################################################

def write_report(rows: list[dict], kind: str, out_dir: str | Path, *, title: str, notes: Iterable[str] = (),
                 num_tokens: int = 64) -> dict[str, str]:
    """``summary.md``, ``summary.csv`` and PNG plots in ``out_dir``; returns ``{name: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"## {title}", ""]
    parts += [f"- {n}" for n in notes]
    parts.append("")
    header, body = trial_table(rows, kind, num_tokens)
    parts += ["One row per trial:", "", _markdown(header, body), ""]
    if kind == "replace-ratio":
        agg = aggregate_table(rows, num_tokens)
        if agg:
            parts += ["Grouped over seeds:", "", _markdown(*agg), ""]
        parts += [f"- {s}" for s in sfvr_vs_vanilla(rows)]
    if kind == "decode-steps":
        st = steps_table(rows)
        if st:
            parts += ["Paper layout (SPEC F.3, steps across):", "", _markdown(*st), ""]
    files = {"markdown": str(out / "summary.md"), "csv": str(out / "summary.csv")}
    Path(files["markdown"]).write_text("\n".join(parts).rstrip() + "\n")
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(files["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    files.update(plot(rows, kind, out))
    return files


def plot(rows: list[dict], kind: str, out: Path) -> dict[str, str]:
    """PNG plots (matplotlib, Agg backend): metric vs replacement ratio and/or metric vs decoding steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    done = [r for r in rows if r["status"] == "finished"]
    cols = metric_columns(done)
    if not done or not cols:
        return files
    if kind == "replace-ratio":
        fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.4), squeeze=False)
        for ax, (key, label, hib) in zip(axes[0], cols):
            for wu in (True, False):
                pts: dict[float, list[float]] = defaultdict(list)
                for r in done:
                    if bool(r.get("warmup", True)) == wu and key in r:
                        pts[float(r["replace_prob"])].append(r[key])
                if not pts:
                    continue
                xs = sorted(pts)
                ms = [_mean_std(pts[x]) for x in xs]
                ax.errorbar(xs, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3,
                            label=f"warm-up {'on' if wu else 'off'}")
            ax.set_xlabel("replacement ratio (0 = vanilla)")
            ax.set_ylabel(f"{label} ({'higher' if hib else 'lower'} is better)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        files["plot_ratio"] = str(out / "metric_vs_replace_ratio.png")
        fig.savefig(files["plot_ratio"], dpi=110)
        plt.close(fig)
    # metric vs decoding steps: decode-steps sweeps, or the per-step validation figures of training trials
    stems = ["rfid", "psnr", "accuracy"] if kind == "decode-steps" else ["val_psnr", "val_accuracy"]
    stems = [s for s in stems if (any(s in r for r in done) if kind == "decode-steps" else _steps_in(done, s))]
    if stems:
        fig, axes = plt.subplots(1, len(stems), figsize=(4.2 * len(stems), 3.4), squeeze=False)
        for ax, stem in zip(axes[0], stems):
            label, hib = METRICS[stem.replace("val_", "")]
            if kind == "decode-steps":
                pts = sorted((r["steps"], r[stem]) for r in done if stem in r)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
            else:
                steps = _steps_in(done, stem)
                for r in done[:12]:
                    ax.plot(steps, [r.get(f"{stem}_{n}step", float("nan")) for n in steps], marker="o",
                            label=_row_label(r, kind), alpha=0.85)
                ax.legend(fontsize=7)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("decoding steps")
            ax.set_ylabel(f"{label} ({'higher' if hib else 'lower'} is better)")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        files["plot_steps"] = str(out / "metric_vs_steps.png")
        fig.savefig(files["plot_steps"], dpi=110)
        plt.close(fig)
    return files


def _row_label(r: dict, kind: str) -> str:
    if kind == "replace-ratio":
        return f"r={r.get('replace_prob'):g} wu={'on' if r.get('warmup', True) else 'off'} s{r.get('seed', 0)}"
    return str(r.get("trial_key"))


def log_report(uri: str, run_id: str, files: dict[str, str], rows: list[dict]) -> None:
    """Table, CSV and plots as artifacts of the sweep run, plus summary metrics (best value per column)."""
    from sftok_platform import tracking
    c = tracking.client(uri)
    for path in files.values():
        c.log_artifact(run_id, path, artifact_path="report")
    done = [r for r in rows if r["status"] == "finished"]
    summary = {"trials": float(len(rows)), "trials_finished": float(len(done)),
               "trials_stopped_early": float(sum(r["status"] == "stopped early" for r in rows))}
    for key, _, hib in metric_columns(done):
        vals = [r[key] for r in done if isinstance(r.get(key), float)]
        if vals:
            summary[f"best_{key}"] = max(vals) if hib else min(vals)
    tracking.log_summary_metrics(uri, run_id, summary)


__all__ = ["objective", "flatten_eval", "collect_rows", "metric_columns", "trial_table", "aggregate_table",
           "steps_table", "sfvr_vs_vanilla", "write_report", "plot", "log_report"]
