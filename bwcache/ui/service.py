"""The app as a service: one run at a time on the shared pipelines, each cancellable at its next denoising step,
placed in a ZeroGPU function where the preset needs a GPU, and saved into a folder of its own."""

from __future__ import annotations

import asyncio
import functools
import threading
from contextvars import ContextVar
from pathlib import Path

from ..runner import RunCancelled
from .runs import prune_runs, save_run_folder

# One run at a time on the shared pipelines, held by the thread doing it until its run has really stopped: a
# cancelled event frees its queue slot at once, but its thread finishes its denoising step first.
PIPELINE_LOCK = threading.Lock()
# The cancel event of the event handler this thread works for (see `cancellable`), and those of every run under way.
_CANCEL: ContextVar[threading.Event | None] = ContextVar("bwcache_cancel", default=None)
RUNNING: set[threading.Event] = set()


def cancellable(function):
    """The event handler Gradio runs for `function`: the work goes to a thread, and a cancelled event (which Gradio
    answers by cancelling this coroutine) sets the run's cancel event, so the run stops at its next step, writes
    nothing, and lets go of the pipeline."""

    @functools.wraps(function)
    async def handler(*args, **kwargs):
        cancel = threading.Event()
        token = _CANCEL.set(cancel)
        RUNNING.add(cancel)
        try:
            # `to_thread` runs in a copy of this context: the thread sees the cancel event.
            return await asyncio.to_thread(function, *args, **kwargs)
        except asyncio.CancelledError:
            cancel.set()
            raise
        finally:
            RUNNING.discard(cancel)
            _CANCEL.reset(token)

    return handler


def cancel_all() -> None:
    """Every run under way stops at its next step (and writes nothing)."""
    for cancel in list(RUNNING):
        cancel.set()


def run_placed(needs_gpu: bool, on_zero_gpu: bool, on_gpu, here, *args, **kwargs):
    """`here(*args, ...)` for a CPU preset, `on_gpu(...)` (ZeroGPU's function) for the others, holding the pipeline
    lock; the work gets this handler's cancel event, except in a ZeroGPU worker process, which cannot share one (it
    stops when ZeroGPU's call ends)."""
    work, cancel = (on_gpu, None if on_zero_gpu else _CANCEL.get()) if needs_gpu else (here, _CANCEL.get())
    with PIPELINE_LOCK:
        return work(*args, cancel=cancel, **kwargs)


def save_run(root: Path, kind: str, write, keep: int) -> dict:
    """A finished run's files in a new folder under `root` (which appears only once complete), unless the handler's
    event was cancelled meanwhile; then the oldest folders beyond `keep` go, never the new one."""
    cancel = _CANCEL.get()
    if cancel is not None and cancel.is_set():
        raise RunCancelled("cancelled before its files were written")
    paths = save_run_folder(root, kind, write)
    prune_runs(root, keep, in_use={Path(next(iter(paths.values()))).parent.name})
    return paths
