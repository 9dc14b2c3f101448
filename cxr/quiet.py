"""What reaches the terminal: TensorFlow's native start-up lines are dropped, library loggers kept to warnings.

TensorFlow's C++ side prints a dozen lines in every process that imports it ("All log messages before
absl::InitializeLog() …", the oneDNN notice, "Could not find cuda drivers", the CPU-feature notice,
"failed call to cuInit" on a machine without a GPU). They come before TensorFlow reads TF_CPP_MIN_LOG_LEVEL,
so no setting hides them. `install()` (run when `cxr` is imported, so in the driver and in every Ray worker
that unpickles cxr code) makes the first `import tensorflow` run with the process's native stderr held in a
temporary file; afterwards every held line that is not one of those notices is written out, in order.
`CXR_VERBOSE=1` (`cxr -v`) turns all of this off.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType

VERBOSE_ENV = "CXR_VERBOSE"
# The notices TensorFlow prints while it loads and finds no GPU; anything else is passed on.
NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IWE]\d{4} [\d:. ]+ +\d+ (port|cudart_stub|cpu_feature_guard|cuda_platform|cuda_executor|cuda_diagnostics)"
    r"\.cc:\d+\]"
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.")
QUIET_LOGGERS = ("tensorflow", "absl", "h5py", "numba")
# TensorFlow counts traces across functions: every model loaded in a process (evaluate and promote load
# several) traces its own predict step once, which TensorFlow then calls "excessive retracing".
PREDICT_RETRACING = re.compile(r"make_predict_function\.<locals>\.one_step_on_data\S* at 0x[0-9a-f]+> triggered "
                               r"tf\.function retracing")


def _not_predict_retracing(record: logging.LogRecord) -> bool:
    return not PREDICT_RETRACING.search(record.getMessage())


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def native_stderr_filtered() -> Iterator[None]:
    """Hold file descriptor 2 in a temporary file, then write out the lines that are not TensorFlow's notices."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True)
                    if not NOISE.search(line.decode("utf-8", "replace"))]
            if kept:
                os.write(2, b"".join(kept))


class _QuietLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run inside the filter, followed by device discovery (the cuInit notice)."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with native_stderr_filtered():
            self.loader.exec_module(module)
            # Finding no GPU prints one more notice; listing devices now (it does not start the runtime, so
            # MultiWorkerMirroredStrategy can still be created first) keeps it inside the filter.
            module.config.list_physical_devices("GPU")
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("tensorflow").addFilter(_not_predict_retracing)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Intercepts the first `import tensorflow` only; every other import is left to the usual finders."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def set_verbose() -> None:
    """Show everything from here on, in this process and in the processes it starts (`cxr -v`)."""
    os.environ[VERBOSE_ENV] = "1"
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietTensorFlowFinder)]


def install() -> None:
    """Make the process's first TensorFlow import quiet (a no-op when verbose or when TF is already loaded)."""
    if verbose() or "tensorflow" in sys.modules:
        return
    if not any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())


def quiet_ray_data() -> None:
    """Ray Data's console lines (execution plans, "finished in") down to warnings; its log file keeps them all."""
    if verbose():
        return
    import ray.data  # noqa: F401 - configures the "ray.data" logger on import

    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING)
            # cxr turns Ray Data's bars off to show its own (images and img/s); no need to say so each time
            handler.addFilter(lambda record: not record.getMessage().startswith("Progress bars disabled"))

