"""Multi-process tests: an `accelerate launch` command on a free port of its own, run with the environment the workers
need. accelerate's launcher ignores MASTER_PORT: without --main_process_port every launch takes 29500, and two test
runs launching at once (another checkout, another agent) would join each other's process group or fail to bind."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TWO_PROCESSES = REPO / "recipes" / "accelerate" / "two-processes.yaml"


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's choice of an unused ephemeral port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def with_free_port(cmd: list[str]) -> list[str]:
    """`cmd`, an accelerate launch command line (`accelerate launch ...` or `python -m accelerate.commands.launch ...`),
    with `--main_process_port <a free port>` right after `launch` (replacing one it already has)."""
    cmd = list(cmd)
    if "--main_process_port" in cmd:
        i = cmd.index("--main_process_port")
        del cmd[i:i + 2]
    i = next(j for j, a in enumerate(cmd) if a == "launch" or a.endswith(".launch")) + 1
    return cmd[:i] + ["--main_process_port", str(free_port())] + cmd[i:]


def two_processes(*args: str) -> list[str]:
    """This interpreter's accelerate launcher starting `args` (a script and its arguments, or `-m module ...`) in two
    processes with recipes/accelerate/two-processes.yaml (gloo on the CPU here)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TWO_PROCESSES), *args]


def launch(cmd: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run an accelerate launch command on a free port from the repository root: one thread per process (the tests'
    machines have 2 cores), this checkout first on the path. On timeout the launcher and its workers are killed together
    (killing the launcher alone leaves workers waiting in a collective, holding the CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    cmd = with_free_port(cmd)
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)
