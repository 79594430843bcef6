"""Run a function in a fresh child process, so that a crash, an abort, a hang or a
process-global patch never reaches the caller.

Spawn (not fork): the child starts with no CUDA context and no patched torch, and a parent that
already initialised CUDA stays safe. The function and its arguments must be picklable (a
module-level function). Its return value comes back through a pipe; an exception comes back as
its type name and message, so that the parent can re-raise it as the right `TunerError`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from tuner.errors import CLIENT_FAULT_CODES, ProbeError, TunerError

# Exit codes of a child killed by a signal are negative; name the common ones for messages.
_SIGNAL_NAMES = {
    -signal.SIGABRT: "aborted (SIGABRT)",
    -signal.SIGSEGV: "crashed (SIGSEGV)",
    -signal.SIGKILL: "was killed (SIGKILL)",
    -signal.SIGBUS: "crashed (SIGBUS)",
}


@dataclass(frozen=True)
class ChildFailure:
    """How a child failed, as data the parent can act on."""

    kind: str
    """`exception`, `timeout`, `crash`."""
    message: str
    error_type: str | None = None
    error_code: str | None = None
    traceback: str | None = None
    """The child's own traceback of an `exception`, for the caller's log."""


class ChildFailed(ProbeError):
    """A child process failed; `failure` says how."""

    def __init__(self, failure: ChildFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure
        if failure.error_code:
            self.code = failure.error_code
        # An error the child raised keeps its fault; a crash or a hang is never the request's.
        self.client_fault = failure.kind == "exception" and failure.error_code in CLIENT_FAULT_CODES


_PARENT: Connection | None = None
"""In a child started by `run_in_child`: the pipe to the parent, for `send_progress`."""


def send_progress(message: Any) -> None:
    """From inside a child: hand `message` (picklable) to the parent's `on_message` callback at
    once, while the child keeps running. Outside a child it does nothing."""
    if _PARENT is not None:
        _PARENT.send(("progress", message))


def _child_main(
    conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    global _PARENT
    _PARENT = conn
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        code = exc.code if isinstance(exc, TunerError) else None
        message = exc.message if isinstance(exc, TunerError) else f"{type(exc).__name__}: {exc}"
        conn.send(("error", type(exc).__name__, code, message, traceback.format_exc(limit=-16)))
    else:
        conn.send(("ok", result))
    finally:
        conn.close()


_MAIN_LOCK = threading.Lock()


@contextmanager
def _main_script_hidden() -> Iterator[None]:
    """Start a child without it running the caller's script again.

    A spawned child imports the parent's `__main__` (by path or module name) before it runs its
    target, which re-runs a script's top-level code: a training script that calls `plan_for` at
    top level, without an `if __name__ == "__main__":` guard, would probe again in every child,
    recursively. The children only run functions of importable modules, so the script is hidden
    from the spawn while the child starts."""
    main = sys.modules.get("__main__")
    with _MAIN_LOCK:
        if main is None:
            yield
            return
        saved: dict[str, Any] = {n: main.__dict__[n] for n in ("__file__", "__spec__") if n in main.__dict__}
        main.__dict__.pop("__file__", None)
        main.__dict__["__spec__"] = None
        try:
            yield
        finally:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


def run_in_child(
    fn: Callable[..., Any],
    *args: Any,
    timeout: float,
    what: str = "child process",
    env: dict[str, str] | None = None,
    on_message: Callable[[Any], None] | None = None,
    **kwargs: Any,
) -> Any:
    """`fn(*args, **kwargs)` in a spawned process; its result, or `ChildFailed`.

    A `TunerError` raised in the child keeps its code and message; any other exception becomes
    a probe error naming its type. A hang past `timeout` seconds kills the child; so does the
    caller's KeyboardInterrupt. What the child passes to `send_progress` reaches `on_message`
    in the caller as it happens (and is dropped without one); `timeout` bounds the whole run.
    """
    ctx = mp.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})  # spawn copies the parent's environment at start
    try:
        process = ctx.Process(target=_child_main, args=(sender, fn, args, kwargs), daemon=True)
        with _main_script_hidden():
            process.start()
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    sender.close()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if not receiver.poll(max(0.0, deadline - time.monotonic())):
                _kill(process)
                raise ChildFailed(
                    ChildFailure(
                        "timeout", f"The {what} did not finish within {timeout:g} s and was stopped."
                    )
                )
            try:
                message = receiver.recv()
            except EOFError:
                process.join(5)
                raise ChildFailed(_crash(what, process.exitcode)) from None
            if message[0] != "progress":
                break
            if on_message is not None:
                on_message(message[1])
    except BaseException:
        _kill(process)
        raise
    finally:
        receiver.close()
    process.join(10)
    if process.is_alive():
        _kill(process)
    if message[0] == "ok":
        return message[1]
    _, error_type, code, text, trace = message
    failure = ChildFailure("exception", text, error_type=error_type, error_code=code, traceback=trace)
    raise ChildFailed(failure)


def child_traceback(error: BaseException | None) -> str | None:
    """The traceback a child sent with the failure `error` was raised from (followed through the
    errors it caused), or None: what the caller logs, where the child's frames are."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ChildFailed) and error.failure.traceback:
            return error.failure.traceback
        error = error.__cause__ or error.__context__
    return None


def _crash(what: str, exitcode: int | None) -> ChildFailure:
    how = _SIGNAL_NAMES.get(exitcode or 0, f"exited with code {exitcode}")
    return ChildFailure("crash", f"The {what} {how} before returning a result.")


def _kill(process: Any) -> None:
    if process.is_alive():
        process.kill()
    process.join(5)
