"""Killing a command completely, with the Ray processes that work for it (used by the crash tests)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def kill_with_ray(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL ``proc`` (started with ``start_new_session=True``), its process group and every descendant, and
    wait until all of them are gone.

    The process group is not enough: Ray 2.60's raylet puts each worker (a Train controller, a Ray Data task)
    in a process group of its own, and such a worker lives on for a moment after the raylet dies. One once
    wrote a Train checkpoint snapshot after a test had read the "state at the kill". The descendants are
    listed before the kill, while they are still the driver's."""
    import psutil
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    psutil.wait_procs(family, timeout=timeout)


def kill_with_its_ray_workers(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL ``proc``, a driver that joined this process's Ray (``RAY_ADDRESS``), and every actor process
    of its job (Tune trials, Train controllers and workers), and wait until none is alive.

    Ray would kill a dead driver's actors itself, but asynchronously: until then a trial can still write a
    checkpoint after the caller has read "the state at the kill". Here they die at once, as on a lost
    machine. Actors of this process's own job, and detached ones (Ray Data's shared stats actors outlive
    the job that happened to create them), are left alone."""
    import time

    import psutil
    import ray
    from ray.util.state import list_actors
    kill_with_ray(proc, timeout)
    own = ray.get_runtime_context().get_job_id()
    deadline = time.time() + timeout
    while True:
        others = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                  if a.job_id != own and not getattr(a, "is_detached", False)]
        if not others:
            return
        if time.time() > deadline:
            raise TimeoutError(f"actors of the killed driver still alive after {timeout} s: {others}")
        for actor in others:
            if actor.pid:
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(actor.pid).kill()
        time.sleep(0.2)
