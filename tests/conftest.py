"""Suite-wide setup: one private local Ray for every test that can share it, and environment settings that
keep a 2-core machine from spending the suite's time on start-up and thread contention.

Tests that need a cluster of their own (``ray job submit`` against a ``ray start`` head, token
authentication, a SIGKILLed sweep, a multi-node ``Cluster``) still start it themselves; a test that shuts
the shared Ray down (to start its own) is fine too: the next module that asks for ``ray_cluster`` gets a
fresh one.
"""
from __future__ import annotations

import os

import pytest

# Set before torch / Ray start (Ray's local processes inherit this environment; so do the subprocesses and
# the clusters that tests start themselves). None of them changes what the code under test computes.
for _key, _value in {
    # Train V2 starts a PreemptionWatcher actor (a new Python process, ~1 s of CPU here) with every worker
    # group, to drain workers on nodes that announce a spot preemption. No node of the suite's clusters
    # can be preempted (the node-loss test removes a node without notice, which is not a preemption).
    # cluster.connect already turns it off in a private local Ray; this reaches the clusters tests start.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # OpenMP threads that spin while they wait slow every torch op down many times over when the 2 cores
    # are shared (Ray workers, other jobs): an FID Inception forward took 4 s instead of 0.05 s.
    "OMP_WAIT_POLICY": "PASSIVE",
    # Train V2's controller polls its workers every 2 s; each stage waits up to that long to notice it ended.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Ray's memory monitor kills workers when the *node* is 95% full, whoever fills it; on a shared box
    # other jobs' memory then kills these tests' trials (seen: ASHA lost its reference trial).
    "RAY_memory_monitor_refresh_ms": "0",
    # `mlflow ui` / `mlflow server` (the browser tests, the node-loss test's tracking server) start a job
    # runner and seven huey consumer processes for MLflow's GenAI jobs, each importing MLflow (~3 s of CPU):
    # ~27 s of CPU per server for a feature no test uses.
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}.items():
    os.environ.setdefault(_key, _value)

RAY_CPUS = 4     # logical CPUs of the shared Ray: a 2-worker stage or a trial plus Ray Data's tasks fit

# The files that take longest (seconds, serial run of 2026-12-07), collected first: with `-n 2 --dist
# loadfile --no-loadscope-reorder` (pyproject.toml) xdist hands whole files to the two test processes in
# collection order, so the long ones start at once and the short ones fill in around them.
LONGEST_FILES = ("test_sweeps.py",            # ~290: the killed + resumed ablation, ASHA
                 "test_pipeline_e2e.py",      # ~190: three pipeline launches with 2 workers
                 "test_node_loss.py",         # ~85: a 4-raylet cluster loses a node
                 "test_train_resume.py",      # ~75
                 "test_generator_stage.py",   # ~50
                 "test_train_job_submit.py")  # ~40


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))     # stable: files stay whole


def ensure_ray() -> dict:
    """Connect to the shared private local Ray (started on first use, dashboard on: Train V2's placement-group
    cleanup needs the State API); returns its resources."""
    import ray
    from ray.data import DataContext

    from sftok_platform.cluster import connect
    if not ray.is_initialized():
        connect(None, num_cpus=RAY_CPUS)
    DataContext.get_current().enable_progress_bars = False
    return dict(ray.cluster_resources())


@pytest.fixture(scope="session")
def _ray_session():
    yield
    import ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(_ray_session):
    """The shared local Ray, (re)connected for this module. Tests must not shut it down."""
    return ensure_ray()


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory):
    """An empty MLflow sqlite store, created once: MLflow builds a new store's schema by replaying its
    alembic migrations, ~3 s on 2 cores, for every fresh ``mlflow.db``."""
    from mlflow import MlflowClient
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def seed_mlflow(_mlflow_template):
    """``seed_mlflow(directory)``: put a copy of the empty store at ``directory/mlflow.db`` (where a run root's
    default tracking URI points) unless one is there; returns its ``sqlite:///`` URI. The copy is what MLflow
    would have created there on first use (same schema, only the built-in Default experiment)."""
    import shutil
    from pathlib import Path

    def seed(directory) -> str:
        target = Path(directory) / "mlflow.db"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_mlflow_template, target)
        return f"sqlite:///{target}"
    return seed
