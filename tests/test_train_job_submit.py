"""``ray job submit --working-dir .`` against a local head this test starts: the repository ships as the
job's working dir, ``experiments/full_pipeline.py`` joins the cluster through ``RAY_ADDRESS`` and trains a
stage. Teardown stops only this head (its processes are found by the head's private temp dir), never
``ray stop``: that kills every Ray on the machine, including the suite's shared one that the pytest process
is a driver of, and Ray's core worker then ends that process with exit code 1 and no pytest summary (what
CI printed on 2026-12-07: 259 dots, then nothing)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from sftok_platform.cluster import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def pids_using(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def stop_head(temp_dir: str) -> None:
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 15)):   # a throw-away head: no long goodbyes
        for pid in pids_using(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while pids_using(temp_dir) and time.time() < deadline:
            time.sleep(0.5)


@pytest.fixture()
def head():
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")      # short: Ray's socket paths have a length limit
    port, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"     # a throw-away local head; real clusters use the token (README)
    # every port explicit: the defaults (e.g. the job agent's 52365) may belong to another Ray on this machine
    cmd = ["ray", "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--ray-client-server-port={free_port()}", "--num-cpus=2", "--include-dashboard=true",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    try:
        if started.returncode != 0:
            pytest.skip(f"cannot start a local Ray head with a dashboard here: {started.stderr[-500:]}")
        yield {"address": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_outcome(address: str, sid: str, done_file: Path, seconds: float = 900.0) -> tuple[str, str]:
    """``(status, logs)`` of a submitted job from the Jobs API, polled until it ends.

    In two full-suite CI runs on a 2-core host, the head's dashboard stopped accepting connections seconds
    after a successful ``ray job submit``, while the job kept running (the same test passed alone). The
    cause is still open. Where the Jobs API does not answer, the job is judged by what it wrote: the
    stage's ``done.json``. Status is then ``"UNREACHABLE"`` and logs are empty.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient
    deadline = time.time() + seconds
    client = None
    while time.time() < deadline:
        try:
            client = client or JobSubmissionClient(address)
            status = client.get_job_status(sid)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return str(status), client.get_job_logs(sid)
        except (OSError, ConnectionError, RuntimeError):
            client = None
            if done_file.is_file():
                return "UNREACHABLE", ""
        time.sleep(3)
    raise TimeoutError(f"job {sid} did not finish in {seconds:.0f} s")


def test_job_submit_runs_the_pipeline(head, tmp_path, monkeypatch, seed_mlflow):
    seed_mlflow(tmp_path)          # the job's run root gets its (empty) MLflow store ready-made
    sid = f"sftok-smoke-{os.getpid()}"
    entry = ["python", "experiments/full_pipeline.py", "--root", str(tmp_path), "--stages",
             "stage0", "--run-name", "job", "stage0.steps=2", "stage0.global_batch_size=2", "stage0.warmup_steps=1",
             "data.synthetic_images=8", "data.synthetic_val_images=2", "train.log_every=1",
             "train.checkpoint_every=2", "tracking.system_metrics=false"]
    deadline = time.time() + 300
    while True:   # the head's job agent may still be starting ("No available agent to submit job")
        submit = subprocess.run(["ray", "job", "submit", "--address", head["address"], "--working-dir", str(REPO),
                                 "--submission-id", sid, "--no-wait", "--", *entry],
                                cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=300)
        if submit.returncode == 0 or "No available agent" not in submit.stderr or time.time() > deadline:
            break
        time.sleep(5)
    assert submit.returncode == 0, submit.stderr[-2000:]
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    done = tmp_path / "job" / "stages" / "stage0" / "done.json"
    status, logs = job_outcome(head["address"], sid, done)
    if status == "UNREACHABLE":
        warnings.warn("the head's dashboard stopped answering after the submit; the job was checked by its outputs")
        journal = (done.parent / "journal.jsonl").read_text()
        assert '"step": 2' in journal, journal[-2000:]
    else:
        assert status == "SUCCEEDED", logs[-4000:]
        assert "[stage0] step 2/2" in logs
    assert done.is_file()
