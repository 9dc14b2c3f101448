"""A Ray Train run as a Ray Tune trial that shuts its workers down itself when Tune stops the trial.

Why: Tune stops a trial (ASHA at a rung) by calling its actor's `stop()`, which for a function trainable returns
at once, while the function is still in `trainer.fit()`; Tune then removes the trial's placement group, and
Ray kills every process placed in it: the trial's actor and Train V2's controller (a zero-CPU child of the
trial, so captured in that group). The controller dies without shutting its worker group down, and Ray frees a
placement group made by an actor only once both that actor and its job (the sweep's driver) are dead: the
workers' CPUs stay reserved until Ray Train's placement-group cleaner sees the dead controller through the State
API, and for ever when the cleaner cannot reach that API (the next trials' workers then never start).

Here the trial's `cleanup()` (run by `stop()`, before Tune frees anything) aborts the running Train run through
its controller, which removes its workers and their placement group itself, and waits for `fit()` to end.
Imported only where Ray runs: it imports Ray.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import ray
from ray.train import UserCallback
from ray.util.queue import Empty, Queue

log = logging.getLogger(__name__)
T = TypeVar("T")
ABORT_TIMEOUT_S = 45.0  # the controller's abort: its workers get 5 s to stop, then the placement group goes
END_TIMEOUT_S = 15.0  # then fit() sees its controller gone and the trial's `then` runs


class ControllerHandle(UserCallback):
    """Runs in the Train controller: hands the trial the controller's actor handle at the first report (Tune
    stops trials on reported results, so before any stop; callbacks run in order, so before Tune sees it)."""

    def __init__(self, channel: Queue) -> None:
        self.channel, self.sent = channel, False

    def after_report(self, run_context: Any, metrics: Any, checkpoint: Any) -> None:
        if not self.sent:
            self.channel.put(ray.get_runtime_context().current_actor)
            self.sent = True


class _Run:
    """This process's Train run in progress: where its controller's handle arrives, and whether it was aborted."""

    def __init__(self) -> None:
        self.channel: Queue = Queue(1, actor_options={"num_cpus": 0})
        self.aborted, self.ended = threading.Event(), threading.Event()


_current: list[_Run] = []  # a trial's actor runs one trial at a time (Tune's reuse_actors is off)


def fit_until_stopped(fit: Callable[[list[Any]], T], then: Callable[[], None] | None = None) -> tuple[T | None, bool]:
    """Run `fit(run_callbacks)` (a trainer's fit, given the Ray Train callbacks to add) in a Tune trial made
    `stoppable`, then `then()` (before a stopping trial's process may go). Returns (fit's result, whether Tune
    stopped the trial); a stopped trial's result is None. Errors of fit are raised, not those of its abort."""
    from ray.tune.integration.ray_train import TuneReportCallback

    run = _Run()
    _current[:] = [run]
    try:
        try:
            result = fit([ControllerHandle(run.channel), TuneReportCallback()])
        except Exception:
            if not run.aborted.is_set():
                raise
            result = None  # the abort ended fit() (its controller exits), as intended
        if then is not None:
            then()
        return result, run.aborted.is_set()
    finally:
        run.ended.set()
        _current.clear()


def abort_running() -> bool:
    """Abort this process's Train run, if one is running, and wait for its fit() (and `then`) to end; whether
    one was running."""
    run = _current[0] if _current else None
    if run is None or run.ended.is_set():
        return False
    run.aborted.set()
    try:
        controller = run.channel.get(block=False)
    except Empty:
        log.warning("trial stopped before its first report: its Train run is left to Ray's own cleanup")
        return False
    try:
        ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
    except ray.exceptions.RayActorError:
        pass  # abort ends with the controller's exit
    except Exception as exc:  # noqa: BLE001 - the trial is stopping anyway; Ray's cleaner is the fallback
        log.warning("could not abort the stopped trial's Train run: %s", exc)
    run.ended.wait(END_TIMEOUT_S)
    return True


def stoppable(function: Callable[[dict[str, Any]], Any]) -> type:
    """Tune's trainable for a trial function that calls `fit_until_stopped`: when Tune stops the trial, its
    cleanup first aborts the function's Train run (see the module's docstring)."""
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(function)

    class StoppableTrial(base):  # type: ignore[misc, valid-type]
        def cleanup(self) -> None:
            abort_running()
            super().cleanup()

    return StoppableTrial
