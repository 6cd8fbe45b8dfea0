"""Connecting to Ray and checking that the cluster can run the configured job, before any work.

``connect(cfg)``: a job submitted with ``ray job submit`` (or a shell with ``RAY_ADDRESS``) joins that
cluster; anything else starts a private local Ray (``address="local"``), never attaching to someone
else's cluster by accident. ``check_resources(cfg)``: refuses more workers / GPUs than the cluster has,
with a message that says what to change.
"""
from __future__ import annotations

import os
from typing import Optional

from sftok_platform.config import Config, ConfigError


def ray_address() -> str:
    """``RAY_ADDRESS`` when set (job submissions set it), else ``"local"``."""
    addr = os.environ.get("RAY_ADDRESS", "").strip()
    if not addr:
        return "local"
    if addr.startswith(("http://", "https://")):   # a dashboard URL: ray.init needs the GCS
        return "auto"
    return addr


def connect(cfg: Optional[Config] = None, *, address: Optional[str] = None, num_cpus: Optional[float] = None,
            num_gpus: Optional[int] = None, quiet: bool = True) -> dict:
    """The one place this project starts or joins Ray (no-op when already connected); returns
    ``ray.cluster_resources()``.

    ``address`` (default :func:`ray_address`: ``RAY_ADDRESS``, else ``"local"``) names a cluster to join.
    A private local Ray gets the machine's cores plus a little logical head-room (Ray Data's read and
    transform tasks run next to the Train workers) unless ``num_cpus`` says otherwise, and a dashboard on a
    free port that ``RAY_API_SERVER_ADDRESS`` names in the driver and in every worker. Why: Train V2's
    placement-group cleaner and other State API clients find the dashboard by auto-detection, which fails
    with "Found multiple active Ray instances" when other users run their own local Ray on the machine;
    stopped trials' workers then leak and the next trials hang PENDING (PLATFORM.md P8). Ray gives a local
    raylet 30 s to start, not always enough on a busy host: a start-up time-out is retried twice. Train's
    preemption watcher is off there (:func:`_local_train_settings`).
    """
    import ray
    if ray.is_initialized():
        return dict(ray.cluster_resources())
    address = address or ray_address()
    kwargs: dict = {"configure_logging": True, "logging_level": "warning" if quiet else "info",
                    "log_to_driver": True}
    if address != "local":
        ray.init(address=address, **kwargs)
        return dict(ray.cluster_resources())
    cores = os.cpu_count() or 1
    want = (cfg.train.workers * cfg.train.cpus_per_worker) if cfg is not None else 0
    kwargs.update(num_cpus=num_cpus if num_cpus is not None else max(cores, want) + 2, num_gpus=num_gpus)
    for attempt in range(3):
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        os.environ["RAY_API_SERVER_ADDRESS"] = api
        try:
            ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                     runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api,
                                               "PYTHONPATH": _pythonpath_with_project(),
                                               "PYTHONWARNINGS": _pythonwarnings(),
                                               **_local_train_settings()}}, **kwargs)
            break
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
    return dict(ray.cluster_resources())


# Deprecation warnings that Ray's own actors print on every stage (Ray 2.60: Train's DatasetManager sets
# ExecutionOptions.exclude_resources itself), which a user cannot act on. Message prefixes, as PYTHONWARNINGS
# matches them.
KNOWN_RAY_DEPRECATIONS = ("`ExecutionOptions.exclude_resources`",)


def _pythonwarnings() -> str:
    """PYTHONWARNINGS for local workers: the user's own filters, then ``ignore`` for the known Ray ones.

    A side effect to know: with any PYTHONWARNINGS set, Ray does not install its own "print each
    RayDeprecationWarning once per module" filter (``ray.util.annotations``), so in local workers Ray's
    deprecation warnings follow Python's default (shown only for code in ``__main__``). The driver, where
    this project's own Ray calls are made, keeps Ray's filter; ``PYTHONWARNINGS=default`` in the
    environment brings every warning back in the workers too."""
    ours = [f"ignore:{message}" for message in KNOWN_RAY_DEPRECATIONS]
    return ",".join([w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w] + ours)


def _local_train_settings() -> dict:
    """Train settings for a private local Ray. Its one node cannot be preempted, so Train V2's
    PreemptionWatcher (a new actor process with every worker group, and a core-worker error line about its
    constructor arguments on the console at every stage) has nothing to watch: it is off unless
    ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` is set. A cluster keeps Ray's default (on)."""
    key = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
    return {key: os.environ.get(key, "0")}


def _pythonpath_with_project() -> str:
    """PYTHONPATH for local workers with this project's root first, so that an entry script run from a
    clone without ``pip install -e .`` works in the workers too (they do not inherit the driver's sys.path)."""
    from pathlib import Path

    import sftok
    root = str(Path(sftok.__file__).resolve().parent.parent)
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return os.pathsep.join([root, *rest])


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", ""})


def is_multi_node(cfg: Optional[Config] = None) -> bool:
    """Whether Train workers may run on another machine than this driver. A private local Ray: never. A
    cluster: when it has more than one alive node, or when the job wants GPUs and this node has none (an
    autoscaling cluster whose CPU-only head is, for now, its only node)."""
    import ray
    if ray_address() == "local":
        return False
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        return True
    here = ray.get_runtime_context().get_node_id()
    mine = next((n for n in nodes if n.get("NodeID") == here), {})
    return bool(cfg is not None and cfg.train.gpu and mine.get("Resources", {}).get("GPU", 0) < 1)


def tracking_uri_for_workers(uri: str, *, multi_node: bool, driver_ip: str) -> str:
    """The MLflow URI every process of the job uses, Train workers on other nodes included.

    On one machine ``uri`` itself. On a multi-node cluster a loopback host (``http://127.0.0.1:5000``, the
    documented server on the head, where the driver of ``ray job submit`` runs) becomes this node's IP, and
    a sqlite store (a file on this machine that the other nodes cannot write safely) is refused."""
    from urllib.parse import urlsplit, urlunsplit
    if not multi_node:
        return uri
    if uri.startswith("sqlite:"):
        raise ConfigError(
            f"MLflow store {uri!r} is a sqlite file, but this cluster's Train workers run on other nodes, which "
            "cannot write it safely. Run an MLflow server on the head node (ray_cluster.yaml starts one: `mlflow "
            "server --backend-store-uri sqlite:////mnt/shared/mlflow/mlflow.db --artifacts-destination "
            "/mnt/shared/mlflow/artifacts --host 0.0.0.0 --port 5000`) and pass --tracking-uri http://<head IP>:5000.")
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and (parts.hostname or "") in LOOPBACK_HOSTS:
        user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        host = f"[{driver_ip}]" if ":" in driver_ip else driver_ip
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit(parts._replace(netloc=f"{user}{host}{port}"))
    return uri


def resolve_tracking_uri(cfg: Config, echo=print) -> str:
    """Set ``cfg.tracking.uri`` to what every node can reach (:func:`tracking_uri_for_workers`); call after
    :func:`connect`, in the driver. Returns the URI."""
    import ray
    from sftok_platform import tracking
    uri = tracking.tracking_uri(cfg)
    resolved = tracking_uri_for_workers(uri, multi_node=is_multi_node(cfg), driver_ip=ray.util.get_node_ip_address())
    if resolved != uri:
        echo(f"[cluster] MLflow {uri} is this node's loopback; the workers on other nodes use {resolved}")
    if cfg.tracking.uri or resolved != uri:
        cfg.tracking.uri = resolved
    return resolved


def check_resources(cfg: Config, resources: Optional[dict] = None) -> None:
    """Refuse a scaling request the cluster cannot satisfy (ConfigError says how to fix it)."""
    if resources is None:
        import ray
        resources = dict(ray.cluster_resources())
    t = cfg.train
    cpus = float(resources.get("CPU", 0))
    gpus = float(resources.get("GPU", 0))
    need_cpus = t.workers * t.cpus_per_worker
    where = "this machine's local Ray" if ray_address() == "local" else "the Ray cluster"
    if t.gpu and gpus < t.workers:
        raise ConfigError(
            f"train.workers={t.workers} with train.gpu=true needs {t.workers} GPUs, but {where} has "
            f"{gpus:g}. Lower --workers to {int(gpus)} (if > 0), drop --gpu to train on CPUs, or add GPU nodes "
            f"(ray_cluster.yaml: available_node_types.gpu_worker.min_workers).")
    if need_cpus > cpus:
        raise ConfigError(
            f"train.workers={t.workers} x train.cpus_per_worker={t.cpus_per_worker} needs {need_cpus} CPUs, but "
            f"{where} has {cpus:g}. Lower --workers (e.g. --workers {max(1, int(cpus // t.cpus_per_worker))}) "
            f"or train.cpus_per_worker, or connect to a bigger cluster (RAY_ADDRESS / ray job submit).")


__all__ = ["ray_address", "connect", "check_resources", "free_port", "is_multi_node",
           "tracking_uri_for_workers", "resolve_tracking_uri"]
