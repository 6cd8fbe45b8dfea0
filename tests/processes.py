"""Killing a command that started its own local Ray, completely (used by the crash tests)."""
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
