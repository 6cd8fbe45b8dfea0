"""Ablation sweeps with Ray Tune over the SFTok training stages, compared in MLflow (paper SPEC F.3).

Replacement ratio x warm-up (paper Tables 3 and 4): replace_prob in {0 (vanilla), 0.5, 0.8, 1.0}, warm-up
on (stage 2 starts from the stage-1 weights; stage 1 is trained once and shared by every trial) or off
(stage 2 from a fresh initialisation)::

    python experiments/sweep.py replace-ratio --preset tiny
    python experiments/sweep.py replace-ratio --preset tiny --ratios 0,1 --warmup on --seeds 0,1

The laptop ablation (README, "The laptop ablation"; 25 minutes on a 2-core VM with the tiny preset): SFVR
(replace_prob 1.0) against vanilla (0.0), warm-up on and off, seeds 0,1,2 (12 stage-2 trials on a shared
teacher and stage 1), then a decode-steps sweep (1,2,4,8) on the first seed's SFVR warm-up export::

    python experiments/sweep.py ablation
    python experiments/sweep.py ablation --seeds 0,1,2,3,4 eval.stage_val_images=64
    python experiments/sweep.py ablation --warmup on        # half the trials: SFVR vs vanilla after warm-up

Decoding steps on a fixed checkpoint (eval only, no training; paper Fig. 8 / SPEC F.3)::

    python experiments/sweep.py decode-steps --checkpoint runs/tiny/stages/stage3/export
    python experiments/sweep.py decode-steps --checkpoint runs/tiny/stages/stage2/export --steps 1,2,4,8,16

Search (Optuna over replace_prob, unmasked-token weight, lr and the share of a fixed step budget
``stage1.steps + stage2.steps`` spent in stage 1; ASHA stops weak trials early)::

    python experiments/sweep.py search --preset tiny --trials 16
    python experiments/sweep.py search --preset tiny --trials 16 --objective val_loss   # when PSNR is flat

Every sweep ends with a table shaped like the paper's (printed, ``<root>/sweeps/<name>/report/summary.md``
and ``summary.csv``), plots (metric vs replacement ratio, metric vs decoding steps) and a parent MLflow run
holding all of them with one child run per trial. The metric: the evaluation module's reconstruction
figures with ``--evaluation full`` (rFID needs ``eval.inception_weights``), else the stage-2 validation CE
and PSNR/token accuracy after n-step decoding; the table header says which.

Through the Ray Jobs API (the repository is the job's working dir; the sweep joins that cluster)::

    ray job submit --working-dir . -- python experiments/sweep.py replace-ratio --preset tiny
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python experiments/sweep.py replace-ratio --preset b64 --data s3://bucket/shards --workers 8 --gpu \\
        --root /mnt/shared/sftok/runs --tracking-uri http://127.0.0.1:5000 teacher.weights=/mnt/shared/...bin

Resources per trial: each training trial runs ``train.workers`` Ray Train workers (``--workers``,
``--gpu``, ``train.cpus_per_worker``) plus a small driver (``--driver-cpus``, default 0.25 CPU); decode-steps
trials take ``--eval-cpus``/``--eval-gpus`` each (fractional GPUs are fine there: one process per trial).
``--concurrency`` caps trials at once (default: what the cluster fits).

Interrupted sweeps: rerun the same command with ``--resume`` (same ``--name``). A grid (replace-ratio,
ablation, decode-steps) runs again: finished trials report the figures they recorded (``runs/<trial>/
trial.json``) without training, an interrupted trial resumes its stages by name from their last Ray Train
checkpoints, the rest start. A search is restored with ``Tuner.restore`` (Optuna's and ASHA's state live
in Tune's files). Without ``--resume`` an existing sweep name is refused.

Other flags mirror ``experiments/full_pipeline.py``: ``--config FILE``, ``--data``, ``--root``,
``--tracking-uri``, ``--name``, and dotted overrides (``stage2.steps=200 train.log_every=10`` or ``--set``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:                                   # run as a script from a clone without `pip install -e .`
    import sftok  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sftok.config import ConfigError  # noqa: E402
from sftok_platform.entry import add_config_arguments, config_from_args  # noqa: E402


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _onoff(text: str) -> list[bool]:
    table = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
    try:
        return [table[x.strip().lower()] for x in text.split(",") if x.strip()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"--warmup {text!r}: use on, off or on,off") from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_config_arguments(common.add_argument_group("config (as in full_pipeline.py)"))
    s = common.add_argument_group("sweep")
    s.add_argument("--name", default=None, help="sweep name (default: the sweep kind); same name + --resume continues")
    s.add_argument("--resume", action="store_true", help="restore an interrupted sweep of this name (Tuner.restore)")
    s.add_argument("--concurrency", type=int, default=None, help="trials at once (default: what the cluster fits)")
    s.add_argument("--driver-cpus", type=float, default=0.25, help="CPUs reserved by each training trial's driver")
    s.add_argument("--num-cpus", type=float, default=None, help="logical CPUs of a local Ray (default cores + 2)")
    s.add_argument("--evaluation", choices=("val", "full"), default="val",
                   help="val: stage validation CE/PSNR; full: the evaluation module (rFID, IS, PSNR, ...)")

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The module docstring (python -m pydoc experiments/sweep.py) is the manual.")
    sub = p.add_subparsers(dest="kind", required=True)
    rr = sub.add_parser("replace-ratio", parents=[common], help="replace_prob x warm-up grid (paper Tables 3/4)")
    rr.add_argument("--ratios", type=_floats, default=[0.0, 0.5, 0.8, 1.0], help="comma-separated, 0 = vanilla")
    rr.add_argument("--warmup", type=_onoff, default=[True, False], help="on | off | on,off")
    rr.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seed offsets (one trial each)")
    ab = sub.add_parser("ablation", parents=[common],
                        help="the laptop ablation: SFVR vs vanilla x warm-up on/off x seeds, then decode steps")
    ab.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma-separated seed offsets (default 0,1,2)")
    ab.add_argument("--steps", type=_ints, default=[1, 2, 4, 8], help="decoding steps of the second sweep")
    ab.add_argument("--warmup", type=_onoff, default=[True, False],
                    help="on | off | on,off (default): 'on' halves the trials (SFVR vs vanilla after warm-up only)")
    ds = sub.add_parser("decode-steps", parents=[common], help="evaluate one checkpoint at 1,2,4,8,16 steps")
    ds.add_argument("--checkpoint", required=True, help="stage export dir (model.safetensors + config.json)")
    ds.add_argument("--steps", type=_ints, default=[1, 2, 4, 8, 16], help="comma-separated decoding steps")
    ds.add_argument("--teacher", default="", help="teacher for stage-1/2 checkpoints (stage-0 export or weights)")
    ds.add_argument("--eval-cpus", type=float, default=1.0, help="CPUs per evaluation trial")
    ds.add_argument("--eval-gpus", type=float, default=0.0, help="GPUs per evaluation trial (fractions allowed)")
    se = sub.add_parser("search", parents=[common], help="Optuna + ASHA over replace_prob, weights, lr, budget split")
    se.add_argument("--trials", type=int, default=16, help="number of Optuna trials")
    se.add_argument("--no-asha", action="store_true", help="run every trial to the end")
    se.add_argument("--grace-steps", type=int, default=None, help="ASHA grace period in steps (default budget/4)")
    se.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    se.add_argument("--objective", default=None, metavar="VAL_METRIC",
                    help="what Optuna optimises (eval.search_objective): val_loss (min) or val_psnr_8step, "
                         "val_accuracy_8step, ... (max); default PSNR at the largest eval step")
    se.add_argument("--fix", action="append", default=[], metavar="KNOB=VALUE",
                    help="pin a knob, e.g. --fix stage1_fraction=0 (knobs: replace_prob, unmasked_weight, lr, "
                         "stage1_fraction)")
    se.add_argument("--range", action="append", default=[], metavar="KNOB=LOW,HIGH",
                    help="search range of a knob, e.g. --range lr=1e-5,1e-3")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args, label="sweep")
        from sftok_platform.sweeps import run_sweep
        common = dict(name=args.name, resume=args.resume, concurrency=args.concurrency,
                      driver_cpus=args.driver_cpus, num_cpus=args.num_cpus, evaluation=args.evaluation)
        if args.kind == "replace-ratio":
            result = run_sweep("replace-ratio", cfg, ratios=args.ratios, warmup=args.warmup, seeds=args.seeds,
                               **common)
        elif args.kind == "ablation":
            from sftok_platform.sweeps import run_ablation
            grid, decode = run_ablation(cfg, seeds=args.seeds, steps=args.steps, warmup=args.warmup, **common)
            print(f"\nablation: sweep {grid.name!r} ({len(grid.rows)} trials, {grid.seconds:.0f}s) and "
                  f"{decode.name!r} ({len(decode.rows)} trials, {decode.seconds:.0f}s); reports in "
                  f"{Path(grid.report_files['markdown']).parent} and {Path(decode.report_files['markdown']).parent}")
            return 0
        elif args.kind == "decode-steps":
            result = run_sweep("decode-steps", cfg, checkpoint=args.checkpoint, steps=args.steps,
                               teacher=args.teacher, eval_cpus=args.eval_cpus, eval_gpus=args.eval_gpus, **common)
        else:
            fixed = {}
            for item in args.fix:
                if "=" not in item:
                    raise ConfigError(f"--fix {item!r}: use KNOB=VALUE, e.g. --fix stage1_fraction=0.")
                k, v = item.split("=", 1)
                fixed[k.strip()] = float(v)
            ranges = {}
            for item in args.range:
                k, _, v = item.partition("=")
                bounds = _floats(v)
                if len(bounds) != 2:
                    raise ConfigError(f"--range {item!r}: use KNOB=LOW,HIGH, e.g. --range lr=1e-5,1e-3.")
                ranges[k.strip()] = tuple(bounds)
            result = run_sweep("search", cfg, trials=args.trials, asha=not args.no_asha,
                               grace_steps=args.grace_steps, optuna_seed=args.seed, fixed=fixed, ranges=ranges,
                               **common)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    print(f"\nsweep {result.name!r}: {len(result.rows)} trials in {result.seconds:.0f}s; report in "
          f"{Path(result.report_files['markdown']).parent}; MLflow parent run {result.parent_run_id} "
          f"({result.tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
