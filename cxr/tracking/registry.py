"""The MLflow model registry as cxr uses it: versions of one registered model per experiment, two aliases.

`@champion` is the version that serves; `@previous` the champion it replaced, so a rollback is one alias move.
Aliases, not stages (deprecated in MLflow 3). Every decision is recorded as tags on the version it concerns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, "" if value is None else str(value))
