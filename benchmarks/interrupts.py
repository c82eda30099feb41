"""SIGINT / SIGTERM: stop at a safe point, say how to resume.

``install()`` (the CLI's ``run``) handles both signals. Inside a ``graceful()`` section (a trainer loop that can
write a checkpoint) the first signal only sets a flag: the trainer finishes its step, writes its checkpoint and
raises ``Interrupted``. Anywhere else, or on a second signal, ``Interrupted`` is raised at once (finished stages
are cached; an unfinished stage leaves only a temp folder the next run cleans). The CLI exits 128 + signal
number (130 for Ctrl-C, 143 for SIGTERM) with one line saying that the same command resumes.
"""

from __future__ import annotations

import contextlib
import signal

_state = {"signal": None, "graceful": 0}


class Interrupted(BaseException):
    """Raised on SIGINT/SIGTERM (a BaseException, like KeyboardInterrupt: no ``except Exception`` swallows it)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self):  # crosses a process boundary (a stage run by a worker process) intact
        return (type(self), (self.signum, str(self)))


def _handler(signum, frame):  # noqa: ARG001 - the signal module's signature
    first = _state["signal"] is None
    _state["signal"] = signum
    if not (first and _state["graceful"]):
        raise Interrupted(signum, f"{signal.Signals(signum).name} received")


def install() -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _handler)


def requested() -> bool:
    """True once a signal arrived inside a graceful section (the trainer should checkpoint and stop)."""
    return _state["signal"] is not None


def signum() -> int | None:
    return _state["signal"]


@contextlib.contextmanager
def graceful():
    """A section where the first signal is deferred to the next ``requested()`` check."""
    _state["graceful"] += 1
    try:
        yield
    finally:
        _state["graceful"] -= 1
    if _state["signal"] is not None and not _state["graceful"]:  # the signal came as the loop was ending: stop now
        raise Interrupted(_state["signal"], "stopped at the end of a training loop")


def stop_with_checkpoint(trainer, path, stage: str, done: int, total: int, unit: str) -> None:
    """After a trainer returned early on ``requested()``: write its checkpoint and raise ``Interrupted``."""
    if path is not None:
        trainer.save_checkpoint(path)
    raise Interrupted(_state["signal"] or signal.SIGINT,
                      f"{stage} stopped after {unit} {done} of {total}; its checkpoint is written")
