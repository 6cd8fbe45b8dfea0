"""MLflow tracking, owned by the project (not Ray's logger callbacks; PLATFORM.md P19).

One experiment (``tracking.experiment``), one *parent* run per pipeline run name and one *child* run per
stage, linked with the ``mlflow.parentRunId`` tag. The driver creates both runs (so a rerun after a crash
finds and continues the same runs by their tags) and hands the child run id to the Train workers through
``train_loop_config``; only rank 0 opens it and logs. ``MLFLOW_RUN_ID`` is never exported (it would override
the parent id, mlflow#15713).

Tracking URI: ``tracking.uri`` when set (a cluster: ``http://<head>:5000``, the ``mlflow server`` started by
``ray_cluster.yaml``), else ``sqlite:////<abs run root>/mlflow.db`` with artifacts in
``<run root>/mlartifacts``. Always explicit: an unset URI inside a Ray worker would silently write into
the worker's ephemeral CWD.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from sftok_platform.config import Config, ConfigError

# tags that identify our runs (resume finds runs by these, never by timestamps)
TAG_PIPELINE = "sftok.pipeline"      # the pipeline run name (run.name)
TAG_KIND = "sftok.kind"              # "pipeline" | "stage" | "sweep" | ...
TAG_STAGE = "sftok.stage"
TAG_PARENT = "mlflow.parentRunId"
RESERVED_ALIASES = ("latest",)       # MLflow also reserves v<N>


# ######################################################################################################
# URIs and experiment
# ######################################################################################################

def run_root(cfg: Config) -> Path:
    """Absolute directory that holds every run (``run.root``); relative paths resolve against the CWD."""
    root = cfg.run.root
    if "://" in root:
        raise ConfigError(f"run.root={root!r}: use a filesystem path (on a cluster a shared NFS/EFS mount such "
                          "as /mnt/shared/sftok/runs); object-store URIs are supported for data.path only.")
    return Path(os.path.expanduser(root)).resolve()


def tracking_uri(cfg: Config) -> str:
    """The explicit MLflow tracking URI of this run."""
    if cfg.tracking.uri:
        uri = cfg.tracking.uri
        if uri.startswith("file:") or (not uri.startswith(("sqlite:", "http:", "https:", "postgresql", "mysql",
                                                            "databricks"))):
            raise ConfigError(f"tracking.uri={uri!r}: MLflow 3 refuses file stores; use sqlite:////abs/path/"
                              "mlflow.db (one machine) or http://<head>:5000 (an `mlflow server`).")
        return uri
    return f"sqlite:///{run_root(cfg) / 'mlflow.db'}"


def artifact_location(cfg: Config) -> Optional[str]:
    """Where a newly created experiment keeps artifacts: next to the sqlite DB, or the server's choice."""
    if tracking_uri(cfg).startswith("sqlite:"):
        return str(Path(tracking_uri(cfg)[len("sqlite:///"):]).parent / "mlartifacts")
    return None


def client(cfg_or_uri: Config | str):
    from mlflow import MlflowClient
    uri = cfg_or_uri if isinstance(cfg_or_uri, str) else tracking_uri(cfg_or_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(cfg: Config) -> str:
    """Id of ``tracking.experiment``, created on first use (with an explicit artifact location)."""
    if tracking_uri(cfg).startswith("sqlite:"):
        run_root(cfg).mkdir(parents=True, exist_ok=True)
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location(cfg))
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            raise
        return exp.experiment_id


# ######################################################################################################
# Runs (driver side)
# ######################################################################################################

def curated_params(cfg: Config, stage: Optional[str] = None) -> dict[str, Any]:
    """The resolved config as flat MLflow params: everything but other stages' sections and unused parts."""
    stages = {"stage0", "stage1", "stage2", "stage3"}
    keep_stage = {stage} if stage else stages
    out = {}
    for key, value in cfg.flat().items():
        section = key.split(".", 1)[0]
        if section in stages and section not in keep_stage:
            continue
        if section == "generator" and not (cfg.generator.enabled or stage == "stage4"):
            continue
        if section == "losses" and stage not in (None, "stage3"):
            continue
        if section == "tracking":
            continue
        out[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out


def _find_run(c, experiment_id: str, tags: Mapping[str, str]) -> Optional[str]:
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = c.search_runs([experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"],
                         max_results=1)
    return runs[0].info.run_id if runs else None


def _log_params_once(c, run_id: str, params: Mapping[str, Any]) -> list[str]:
    """Log params; on a resumed run keep the old values and return the keys whose value changed."""
    from mlflow.entities import Param
    existing = c.get_run(run_id).data.params
    changed = [k for k, v in params.items() if k in existing and existing[k] != str(v)]
    new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
    for i in range(0, len(new), 100):
        c.log_batch(run_id, params=new[i:i + 100])
    return changed


def start_parent_run(cfg: Config, *, kind: str = "pipeline", name: Optional[str] = None) -> str:
    """Find (resume) or create the parent run of pipeline ``run.name``; returns its run id."""
    c = client(cfg)
    exp_id = ensure_experiment(cfg)
    tags = {TAG_PIPELINE: cfg.run.name, TAG_KIND: kind}
    run_id = _find_run(c, exp_id, tags)
    if run_id is None:
        run_id = c.create_run(exp_id, run_name=name or cfg.run.name, tags=tags).info.run_id
    else:
        c.update_run(run_id, status="RUNNING")
    _log_params_once(c, run_id, curated_params(cfg))
    return run_id


def start_child_run(cfg: Config, stage: str, parent_run_id: Optional[str]) -> str:
    """Find (resume) or create the child run of ``stage`` under ``parent_run_id``; returns its run id."""
    c = client(cfg)
    exp_id = ensure_experiment(cfg)
    tags = {TAG_PIPELINE: cfg.run.name, TAG_KIND: "stage", TAG_STAGE: stage}
    if parent_run_id:
        tags[TAG_PARENT] = parent_run_id
    run_id = _find_run(c, exp_id, tags)
    if run_id is None:
        run_id = c.create_run(exp_id, run_name=f"{cfg.run.name}-{stage}", tags=tags).info.run_id
    else:
        c.update_run(run_id, status="RUNNING")
    changed = _log_params_once(c, run_id, curated_params(cfg, stage))
    if changed:
        c.set_tag(run_id, "sftok.params_changed_on_resume", ",".join(sorted(changed))[:5000])
    return run_id


def end_run(cfg_or_uri: Config | str, run_id: str, status: str = "FINISHED") -> None:
    client(cfg_or_uri).set_terminated(run_id, status=status)


@contextlib.contextmanager
def run_closed_by(cfg_or_uri: Config | str, run_id: str, *, finish: bool = True):
    """The MLflow run's end status follows the ``with`` block: FINISHED when it completes (unless
    ``finish=False``: the block ends the run itself), KILLED when it is interrupted (Ctrl-C, SystemExit),
    FAILED on any other exception, which then propagates unchanged, and whose type and message become the
    run's ``sftok.error`` tag. Every driver-side run (pipeline, stage, stage 4, sweep, trial) is closed this
    way, so none is left RUNNING after a crash."""
    try:
        yield
    except BaseException as e:
        killed = isinstance(e, (KeyboardInterrupt, SystemExit))
        if not killed:
            client(cfg_or_uri).set_tag(run_id, "sftok.error", f"{type(e).__name__}: {e}"[:5000])
        end_run(cfg_or_uri, run_id, "KILLED" if killed else "FAILED")
        raise
    if finish:
        end_run(cfg_or_uri, run_id, "FINISHED")


def log_config_artifact(cfg: Config, run_id: str) -> None:
    """The resolved config as ``config.yaml`` in the run's artifacts."""
    with tempfile.TemporaryDirectory() as d:
        p = cfg.save(Path(d) / "config.yaml")
        client(cfg).log_artifact(run_id, str(p))


def log_summary_metrics(cfg_or_uri: Config | str, run_id: str, metrics: Mapping[str, float],
                        step: int = 0) -> None:
    import time

    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
    for i in range(0, len(items), 500):
        client(cfg_or_uri).log_batch(run_id, metrics=items[i:i + 500])


def registered_model_name(cfg: Config) -> str:
    """``tracking.registered_model``, or one registered model per preset (``sftok-tiny``, ``sftok-b64``)."""
    return cfg.tracking.registered_model or f"sftok-{Path(str(cfg.preset)).stem}"


def register_model(cfg: Config, run_id: str, export_dir: str | os.PathLike, *,
                   tags: Optional[Mapping[str, str]] = None, teacher_dir: Optional[str | os.PathLike] = None,
                   promote: Optional[bool] = None) -> tuple[str, str]:
    """Log ``export_dir`` as the run's ``model``, an MLflow pyfunc model (:mod:`sftok_platform.serving`:
    ``mlflow.pyfunc.load_model`` / ``mlflow models serve`` tokenize and reconstruct images), and register it
    as a new version of :func:`registered_model_name` with ``tags`` (e.g. the evaluation figures).

    The serving alias ``tracking.alias`` moves to the new version only when it is promoted (``promote``,
    default ``tracking.promote``; ``full_pipeline.py --promote``), so a smoke run never replaces the model
    users serve. Returns ``(version, model_uri)``: ``models:/<name>@<alias>`` when promoted, else
    ``models:/<name>/<version>``.
    """
    import tempfile

    from sftok_platform.serving import save_pyfunc
    alias = cfg.tracking.alias
    check_alias(alias)
    promote = cfg.tracking.promote if promote is None else promote
    c = client(cfg)
    with tempfile.TemporaryDirectory(prefix="sftok-pyfunc-") as d:
        save_pyfunc(export_dir, Path(d) / "model", teacher_dir=teacher_dir)
        c.log_artifacts(run_id, str(Path(d) / "model"), artifact_path="model")
    source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/model"
    name = registered_model_name(cfg)
    try:
        c.get_registered_model(name)
    except Exception:
        c.create_registered_model(name, description="SFTok image tokenizers trained by sftok_platform: an MLflow "
                                  "pyfunc (input: a column 'image' of PNG/JPEG bytes; output: 'tokens', or with "
                                  "params task=reconstruct the reconstructed 'image').")
    mv = c.create_model_version(name, source=source, run_id=run_id,
                                tags={k: str(v) for k, v in (tags or {}).items()})
    if promote:
        c.set_registered_model_alias(name, alias, mv.version)
        return str(mv.version), f"models:/{name}@{alias}"
    return str(mv.version), f"models:/{name}/{mv.version}"


def check_alias(alias: str) -> None:
    import re
    if alias.lower() in RESERVED_ALIASES or re.fullmatch(r"[vV]\d+", alias):
        raise ConfigError(f"tracking.alias={alias!r} is reserved by MLflow; pick another name, e.g. "
                          "tracking.alias=current.")


def ui_command(cfg: Config) -> str:
    """The command that opens the MLflow UI on this run's store."""
    uri = tracking_uri(cfg)
    if uri.startswith(("http:", "https:")):
        return f"open {uri}  (on a cluster: ray attach ray_cluster.yaml -p 5000, then http://127.0.0.1:5000)"
    loc = artifact_location(cfg)
    return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {loc} --port 5000"


# ######################################################################################################
# Stage logging (rank 0 of the Train worker group)
# ######################################################################################################

class StageLogger:
    """Opens an existing run by id and logs to it; a no-op object on ranks other than 0.

    Metrics go through the fluent API with ``synchronous=False`` so a slow tracking server does not stall
    the step; :meth:`close` flushes them. MLflow's logging thread then batches what arrives within
    ``MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS`` (1 s unless set). Without a buffer it blocks in a 1 s queue
    poll that neither a flush nor ``end_run`` interrupts: every stage ended with 2 s of waiting (measured:
    ``flush_async_logging`` 1.0 s + ``end_run`` 1.0 s; 0.01 s each with the buffer).
    """

    def __init__(self, uri: str, run_id: Optional[str], *, enabled: bool, system_metrics: bool = True):
        self.enabled = bool(enabled and run_id)
        self.uri = uri
        self.run_id = run_id
        if not self.enabled:
            return
        os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
        import mlflow
        os.environ.pop("MLFLOW_RUN_ID", None)
        mlflow.set_tracking_uri(uri)
        self._mlflow = mlflow
        self._run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)

    def metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.enabled:
            clean = {k: float(v) for k, v in metrics.items() if _is_number(v)}
            self._mlflow.log_metrics(clean, step=step, synchronous=False)

    def tags(self, tags: Mapping[str, str]) -> None:
        if self.enabled:
            self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            p = Path(path)
            if p.is_dir():
                self._mlflow.log_artifacts(str(p), artifact_path=artifact_path)
            else:
                self._mlflow.log_artifact(str(p), artifact_path=artifact_path)

    def image_grid(self, rows: Iterable, labels: Iterable[str], name: str, step: int) -> Optional[Path]:
        """A PNG grid (one row per tensor batch [B,3,H,W] in [0,1]) as an MLflow image under key ``name`` at
        ``step`` (``mlflow.log_image``: the UI's image step slider), plus its row labels as
        ``image_labels/<name>.txt``. The labels stay out of ``images/``: the UI reads that folder as
        ``log_image`` files only, and one other file there hides every image of the run (seen in Chromium)."""
        if not self.enabled:
            return None
        from PIL import Image
        labels = list(labels)
        with tempfile.TemporaryDirectory() as d:
            path = save_image_grid(rows, labels, Path(d) / f"{name}.png")
            with Image.open(path) as img:
                self._mlflow.log_image(img.convert("RGB"), key=name, step=int(step), synchronous=True)
            self._mlflow.log_artifact(str(path.with_suffix(".txt")), artifact_path="image_labels")
        return path

    def close(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self._mlflow.flush_async_logging()
            self._mlflow.end_run(status=status)
            self.enabled = False


GRID_MIN_TILE_PX = 64


def save_image_grid(rows: Iterable, labels: Iterable[str], path: str | os.PathLike) -> Path:
    """Rows of image batches -> one PNG; the row labels are written into the file name's sidecar text.
    Images under 64 px (the tiny preset's 32 px) are enlarged by a whole factor, nearest neighbour, so that
    a grid is readable in the MLflow UI without blurring what the model drew."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision.utils import make_grid
    rows = [r.detach().float().clamp(0, 1).cpu() for r in rows]
    scale = max(1, GRID_MIN_TILE_PX // max(r.shape[-1] for r in rows))
    if scale > 1:
        rows = [F.interpolate(r, scale_factor=scale, mode="nearest") for r in rows]
    n = min(r.shape[0] for r in rows)
    grid = make_grid(torch.cat([r[:n] for r in rows]), nrow=n, padding=2, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    path.with_suffix(".txt").write_text("rows (top to bottom): " + ", ".join(labels) + "\n")
    return path


def _is_number(v: Any) -> bool:
    """A value MLflow can log as a metric. NaN and +-inf are kept on purpose: a diverged curve must show its
    non-finite points (MLflow stores NaN as NaN and clamps inf), not silently stop."""
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, (bool, str))


__all__ = ["tracking_uri", "run_root", "ensure_experiment", "curated_params", "start_parent_run",
           "start_child_run", "end_run", "log_config_artifact", "log_summary_metrics", "register_model",
           "ui_command", "StageLogger", "save_image_grid", "client", "check_alias"]
