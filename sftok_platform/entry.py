"""What the entry scripts (``experiments/full_pipeline.py``, ``experiments/sweep.py``) share: their config
flags and the one way those flags become a validated :class:`~sftok_platform.config.Config`.

Precedence: preset or ``--config`` file <- flags <- dotted overrides (the later wins). Flag values set the
typed fields directly: ``--data 0123`` stays the path ``'0123'`` and ``--root off`` the directory ``'off'``
(formatting them into ``key=value`` strings and re-parsing them as YAML would make them 83 and False).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from sftok_platform.config import Config, ConfigError, apply_override, load_config, split_override

# flag dest -> config key (flags absent from a parser are simply skipped)
FLAG_KEYS = {"data": "data.path", "workers": "train.workers", "root": "run.root", "tracking_uri": "tracking.uri",
             "run_name": "run.name", "stages": "run.stages", "objective": "eval.search_objective"}


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The flags both entry scripts take."""
    parser.add_argument("--preset", default=None, help="tiny (default) | b64 | l64")
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML config file (instead of --preset)")
    parser.add_argument("--data", default=None, help="prepared shards dir or s3:// URI (default: built-in synthetic)")
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers per stage")
    parser.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    parser.add_argument("--root", default=None, help="directory for runs (checkpoints, Ray storage, MLflow db)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite in --root)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def config_from_args(args: argparse.Namespace, *, label: str = "pipeline") -> Config:
    """The validated config of an entry script's parsed ``args`` (see the module docstring)."""
    if getattr(args, "preset", None) and getattr(args, "config", None):
        raise ConfigError("pass either --preset or --config, not both.")
    cfg = load_config(args.config or args.preset or "tiny", validate=False)
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            if isinstance(value, str) and not value.strip():
                raise ConfigError(f"--{dest.replace('_', '-')} is empty; give a value or leave the flag out.")
            apply_override(cfg, key, value.split(",") if key == "run.stages" else value)
    if getattr(args, "gpu", None):
        cfg.train.gpu = True
    if getattr(args, "promote", False):
        cfg.tracking.promote = True
    if getattr(args, "with_generator", False):
        cfg.generator.enabled = True
    dotted = list(getattr(args, "set", []) or []) + list(getattr(args, "overrides", []) or [])
    for item in dotted:
        key, value = split_override(item)
        apply_override(cfg, key, value)
    if not Path(cfg.run.root).expanduser().is_absolute() and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        # a Ray job's CWD is its unpacked working_dir in an ephemeral session dir: keep runs out of it
        cfg.run.root = str(Path("~/sftok").expanduser() / cfg.run.root)
        print(f"[{label}] running as a Ray job: run.root={cfg.run.root} (pass --root for shared storage)")
    if cfg.run.name == "default":
        cfg.run.name = Path(str(cfg.preset)).stem      # one resumable run per preset unless named
    return cfg.validate()


__all__ = ["add_config_arguments", "config_from_args", "FLAG_KEYS"]
