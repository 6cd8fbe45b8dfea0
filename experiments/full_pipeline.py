"""Train an SFTok tokenizer end to end: data, stages 0-3, evaluation, MLflow model registry.

Laptop (no flags): a private local Ray, the ``tiny`` preset, the built-in synthetic data set, CPU. About
10 minutes on 2 cores; progress lines show stage, step/total, loss, images/s and ETA::

    pip install -e ".[dev]"
    python experiments/full_pipeline.py

The same through the Ray Jobs API (the repository is shipped as the job's working dir)::

    ray job submit --working-dir . -- python experiments/full_pipeline.py

GPU cluster (``ray_cluster.yaml``: CPU head running the ``mlflow server``, 8-GPU workers, shared EFS at
/mnt/shared for data, checkpoints and MLflow)::

    ray up ray_cluster.yaml
    ray dashboard ray_cluster.yaml &                 # forwards 8265 to this machine
    export RAY_AUTH_TOKEN=$(ray get-auth-token)      # Ray >= 2.59 token auth (see ray_cluster.yaml)
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python experiments/full_pipeline.py --preset b64 --data s3://bucket/imagenet-shards --workers 16 --gpu \\
        --root /mnt/shared/sftok/runs --tracking-uri http://127.0.0.1:5000 \\
        teacher.weights=/mnt/shared/weights/maskgit-vqgan-imagenet-f16-256.bin \\
        losses.vgg16_weights=/mnt/shared/weights/vgg16-397923af.pth \\
        losses.lpips_heads=/mnt/shared/weights/vgg.pth \\
        losses.dino_weights=/mnt/shared/weights/dino_deitsmall16_pretrain.pth

(prepare the shards once with ``python -m sftok_platform.data prepare --source ... --out ...``.)

Where things go: ``--root`` (default ``./runs``; as a Ray job without ``--root``: ``~/sftok/runs`` on the
head, since a job's working dir is an ephemeral copy) holds every run, the Ray checkpoints, the stage
exports and the default MLflow store (``mlflow.db`` + ``mlartifacts/``).

Resume and fresh attempts: rerunning the same command after a crash skips the finished stages and
restarts the running one from its last checkpoint (same optimizer state, no repeated steps). A fresh
attempt is an explicit ``--run-name NAME``; the default name is the preset's name.

Other flags: ``--config FILE`` (a YAML preset or a saved config.yaml), ``--stages stage1,stage2``,
``--root DIR`` (runs, checkpoints and the default MLflow store), ``--tracking-uri URI``,
``--with-generator`` (stage 4, the class-conditional generator), and dotted overrides as positional
arguments or ``--set`` (``stage2.replace_prob=0.5 train.checkpoint_every=500``).

MLflow UI (the exact command is printed at the end of a run)::

    mlflow ui --backend-store-uri sqlite:////abs/path/runs/mlflow.db --default-artifact-root /abs/path/runs/mlartifacts
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

try:                                   # run as a script from a clone without `pip install -e .`
    import sftok  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sftok.config import ConfigError, load_config  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (python -m pydoc experiments/full_pipeline.py) "
                                       "for the launch manual.")
    p.add_argument("--preset", default=None, help="tiny (default) | b64 | l64")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML config file (instead of --preset)")
    p.add_argument("--data", default=None, help="prepared shards dir or s3:// URI (default: built-in synthetic)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers per stage")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--run-name", default=None, help="run name; the same name resumes, a new one starts afresh")
    p.add_argument("--root", default=None, help="directory for runs (checkpoints, Ray storage, MLflow db)")
    p.add_argument("--stages", default=None, help="comma-separated subset of stage0,stage1,stage2,stage3")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite in --root)")
    p.add_argument("--with-generator", action="store_true", help="also train the generator (stage 4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    return p


def config_from_args(args: argparse.Namespace):
    """Preset/config file <- flags <- dotted overrides (the later wins)."""
    if args.preset and args.config:
        raise ConfigError("pass either --preset or --config, not both.")
    source = args.config or args.preset or "tiny"
    overrides: list[str] = []
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    if args.workers is not None:
        overrides.append(f"train.workers={args.workers}")
    if args.gpu:
        overrides.append("train.gpu=true")
    if args.root is not None:
        overrides.append(f"run.root={args.root}")
    if args.stages is not None:
        overrides.append(f"run.stages={args.stages}")
    if args.tracking_uri is not None:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.with_generator:
        overrides.append("generator.enabled=true")
    overrides += list(args.set) + list(args.overrides)
    cfg = load_config(source, overrides, validate=False)
    if not Path(cfg.run.root).expanduser().is_absolute() and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        # a Ray job's CWD is its unpacked working_dir in an ephemeral session dir: keep runs out of it
        cfg.run.root = str(Path("~/sftok").expanduser() / cfg.run.root)
        print(f"[pipeline] running as a Ray job: run.root={cfg.run.root} (pass --root for shared storage)")
    if args.run_name is not None:
        cfg.run.name = args.run_name
    elif cfg.run.name == "default":
        cfg.run.name = Path(str(cfg.preset)).stem      # one resumable run per preset unless named
    return cfg.validate()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        from sftok_platform.train import run_pipeline
        run_pipeline(cfg, with_generator=args.with_generator)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
