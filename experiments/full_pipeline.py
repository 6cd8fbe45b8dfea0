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

The final tokenizer is registered as an MLflow pyfunc model, a new version of ``sftok-<preset>`` per run
with the evaluation figures as version tags; ``--promote`` also moves the serving alias
(``tracking.alias``, default ``current``) to it. Use it without this project's loading code::

    mlflow.pyfunc.load_model("models:/sftok-tiny@current").predict(pd.DataFrame({"image": [png_bytes]}))
    mlflow models serve -m models:/sftok-tiny@current --env-manager local -p 5001

MLflow UI (the exact command is printed at the end of a run)::

    mlflow ui --backend-store-uri sqlite:////abs/path/runs/mlflow.db --default-artifact-root /abs/path/runs/mlartifacts
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring (python -m pydoc experiments/full_pipeline.py) "
                                       "for the launch manual.")
    add_config_arguments(p)
    p.add_argument("--run-name", default=None, help="run name; the same name resumes, a new one starts afresh")
    p.add_argument("--stages", default=None, help="comma-separated subset of stage0,stage1,stage2,stage3")
    p.add_argument("--with-generator", action="store_true", help="also train the generator (stage 4)")
    p.add_argument("--promote", action="store_true",
                   help="move the serving alias (tracking.alias, default 'current') to this run's registered version")
    return p


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
