"""Run native code that can abort (llama.cpp, the quantiser, onnxruntime) in a child process.

A segfault or abort there becomes a one-line `NativeCrash` in the parent, never a dead CLI.
The function must be importable (module-level) because the child is started with `spawn`.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import traceback
from typing import Any, Callable

from .errors import EdgesmithError, NativeCrash


def _child(conn, fn, args, kwargs):
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except EdgesmithError as e:
        conn.send(("user", str(e)))
    except BaseException as e:  # noqa: BLE001 - everything must reach the parent
        conn.send(("exc", f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        conn.close()


def run_isolated(fn: Callable, *args: Any, what: str = "native code", timeout: float | None = None, **kwargs: Any) -> Any:
    """Call fn(*args, **kwargs) in a spawned child; return its (picklable) result.

    Raises NativeCrash naming `what` and the signal if the child dies, EdgesmithError if the child
    raised one, RuntimeError (with the child's traceback) for other exceptions.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, kwargs), daemon=True)
    proc.start()
    child.close()
    msg = None
    try:
        if parent.poll(timeout):
            try:
                msg = parent.recv()
            except EOFError:
                msg = None
        proc.join(timeout=30 if msg is not None else 5)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    if msg is None:
        code = proc.exitcode
        if code is None or (timeout is not None and code == -signal.SIGKILL):
            raise NativeCrash(f"{what} did not finish within {timeout}s and was stopped")
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            raise NativeCrash(f"{what} crashed ({name}) in a child process")
        raise NativeCrash(f"{what} exited with code {code} without a result")
    kind = msg[0]
    if kind == "ok":
        return msg[1]
    if kind == "user":
        raise EdgesmithError(msg[1])
    raise RuntimeError(f"{what} failed in a child process: {msg[1]}\n{msg[2]}")
