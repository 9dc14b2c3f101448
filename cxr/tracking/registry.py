"""The MLflow model registry as cxr uses it: versions of one registered model per experiment, two aliases.

`@champion` is the version that serves; `@previous` the champion it replaced, so a rollback is one alias move.
Aliases, not stages (deprecated in MLflow 3). Every decision is recorded as tags on the version it concerns.
MLflow has no compare-and-set on aliases, so moves happen under a lock the store itself arbitrates (`lock`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CHAMPION, PREVIOUS = "champion", "previous"


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    run_id: str
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _version(mv: Any) -> Version:
    return Version(mv.name, str(mv.version), mv.run_id, dict(mv.tags or {}))


def get(client: Any, name: str, ref: str) -> Version:
    """A version by number, or the version registered from run `ref` (the newest, if several)."""
    from mlflow.exceptions import MlflowException

    if ref.isdigit():
        return _version(client.get_model_version(name, ref))
    found = client.search_model_versions(f"name = '{name}' and run_id = '{ref}'")
    if not found:
        raise MlflowException(f"registered model {name!r} has no version {ref!r} (neither a version number nor a "
                              "run that registered one)")
    return _version(max(found, key=lambda mv: int(mv.version)))


def alias(client: Any, name: str, which: str = CHAMPION) -> Version | None:
    """The version an alias points at, or None if the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return _version(client.get_model_version_by_alias(name, which))
    except MlflowException as exc:
        if "not found" in str(exc).lower() or getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST",
                                                                                  "INVALID_PARAMETER_VALUE"):
            return None
        raise


def crown(client: Any, name: str, version: str, previous: Version | None) -> None:
    """Make `version` the champion; the champion it replaces becomes `@previous` (set first: a failure between
    the two calls leaves the old champion serving)."""
    if previous is not None:
        client.set_registered_model_alias(name, PREVIOUS, previous.version)
    client.set_registered_model_alias(name, CHAMPION, version)


def tag(client: Any, name: str, version: str, tags: dict[str, Any]) -> None:
    """Set the tags that have a value; an absent value is left out, never written as an empty string."""
    for key, value in tags.items():
        if value is not None and str(value) != "":
            client.set_model_version_tag(name, version, key, str(value))


LOCK_SUFFIX = ".promotion-lock"


@contextmanager
def lock(client: Any, name: str, holder: str, wait: float = 600.0, stale_after: float = 900.0) -> Iterator[None]:
    """Hold the model's promotion lock: a registered model named NAME.promotion-lock, which the store creates
    at most once (its name is the table's primary key), so only one process at a time moves `name`'s aliases.

    The lock guards seconds of work (re-read the champion, tag, move); one older than `stale_after` seconds was
    left by a process that died and is broken. Waiting longer than `wait` raises TimeoutError naming the holder.
    """
    from mlflow.exceptions import MlflowException

    lock_name, start = name + LOCK_SUFFIX, time.time()
    while True:
        try:
            client.create_registered_model(lock_name, tags={"cxr.lock.holder": holder,
                                                            "cxr.lock.since": f"{time.time():.3f}"},
                                           description=f"held while cxr moves the aliases of {name}; deleted after")
            break
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock_name).tags
        except MlflowException:  # released between the two calls
            continue
        age = time.time() - float(held.get("cxr.lock.since", time.time()))
        if age > stale_after:
            log.warning("breaking %s's promotion lock, held by %s for %.0f s", name, held.get("cxr.lock.holder"), age)
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(lock_name)
            continue
        if time.time() - start > wait:
            raise TimeoutError(f"{name}'s promotion lock is held by {held.get('cxr.lock.holder')} "
                               f"(for {age:.0f} s); waited {wait:.0f} s")
        time.sleep(0.5)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock_name)
