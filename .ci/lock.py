"""Rewrite requirements.lock from the project venv: every runtime dependency, transitively, pinned as installed.

Run with the venv's Python after changing pyproject.toml's dependencies (`.venv/bin/python .ci/lock.py`). The
GPU block at the end (TensorFlow's CUDA wheels, which this CPU machine does not install) is kept as it is.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "requirements.lock")
GPU_MARK = "# GPU image only"
ENV = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux", "platform_system": "Linux",
       "os_name": "posix", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython"}
SKIP = {"setuptools", "wheel", "pip"}  # the base image's


def _walk(requirements: list[Requirement]) -> dict[str, str]:
    pins: dict[str, str] = {}
    todo = [(r, frozenset(r.extras)) for r in requirements]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if (name, extras) in seen or name in SKIP:
            continue
        seen.add((name, extras))
        dist = md.distribution(req.name)
        pins[name] = dist.version
        for text in dist.requires or ():
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({**ENV, "extra": e}) for e in (extras or {""})):
                todo.append((sub, frozenset(sub.extras)))
    return pins


def main() -> None:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        deps = [Requirement(d) for d in tomllib.load(fh)["project"]["dependencies"]]
    text = open(LOCK).read()
    lines = text.splitlines(keepends=True)
    header = "".join(line for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    gpu = text[text.index(GPU_MARK):] if GPU_MARK in text else ""
    pins = _walk(deps)
    body = "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))
    with open(LOCK, "w") as fh:
        fh.write(header + body + ("\n" + gpu if gpu else ""))
    print(f"{LOCK}: {len(pins)} pins")


if __name__ == "__main__":
    main()
