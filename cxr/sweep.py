"""A sweep's search space (SPACE.yaml) as data, checked against the config schema before Ray starts.

SPACE.yaml names the config keys to vary (dotted, as `key=value` overrides name them) and a distribution for each:

    space:
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.name: {choice: [small_cnn, densenet121]}
      optim.batch_size: {grid: [16, 32]}
    trials: 8                  # samples (each grid point is run `trials` times); default 1 with a grid, else 8
    metric: val_auroc_mean     # what ASHA and "best" use (maximised); default the validation mean AUROC
    asha: {grace_period: 1, reduction_factor: 2}
    name: my-sweep             # default: the config's run.name + "-sweep"

A misspelt key, an impossible range or a value the schema refuses costs a second here, not a cluster's
start-up: each choice/grid value, both ends of a range and a point inside are validated with the base config.
`cxr.tuning` runs the sweep on Ray Tune.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

KINDS = ("choice", "uniform", "loguniform", "grid")
TOP_KEYS = ("space", "trials", "metric", "asha", "name")
ASHA_KEYS = ("grace_period", "reduction_factor")


class SpaceError(ValueError):
    """SPACE.yaml is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Dimension:
    """One config key and how it varies."""

    key: str
    kind: str
    values: tuple[Any, ...]  # choice/grid: the values; uniform/loguniform: (lo, hi)

    def describe(self) -> str:
        return f"{self.kind}{list(self.values)}"


@dataclass
class Space:
    """The parsed SPACE.yaml: dimensions, samples, the metric and ASHA's settings."""

    dimensions: list[Dimension]
    trials: int
    metric: str = "val_auroc_mean"  # cxr.evaluation.metrics.SCORE (imported lazily: `cxr --help` stays fast)
    grace_period: int = 1
    reduction_factor: int = 2
    name: str | None = None
    source: str = "space"
    extra: dict[str, Any] = field(default_factory=dict)

    def params(self) -> dict[str, str]:
        """The space as MLflow params of the sweep's parent run."""
        out = {f"space.{d.key}": d.describe() for d in self.dimensions}
        return {**out, "sweep.trials": str(self.trials), "sweep.metric": self.metric,
                "sweep.scheduler": f"ASHA(time_attr=epoch, grace_period={self.grace_period}, "
                                   f"reduction_factor={self.reduction_factor})"}

    def tune_space(self) -> dict[str, Any]:
        """Ray Tune's param_space: one entry per key (dotted names kept; a trial turns them into overrides)."""
        from ray import tune

        make = {"choice": lambda v: tune.choice(list(v)), "grid": lambda v: tune.grid_search(list(v)),
                "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
        return {d.key: make[d.kind](d.values) for d in self.dimensions}


def overrides(params: dict[str, Any]) -> list[str]:
    """A trial's sampled values as `key=value` overrides (JSON is YAML, so each value keeps its type)."""
    return [f"{k}={_yaml_scalar(_plain(v))}" for k, v in sorted(params.items())]


def _yaml_scalar(v: Any) -> str:
    """JSON, but a float keeps its dot (YAML 1.1 reads `1e-09` as text, `1.0e-09` as a number)."""
    if isinstance(v, float) and math.isfinite(v):
        text = repr(v)
        return text.replace("e", ".0e") if "e" in text and "." not in text else text
    return json.dumps(v)


def load(url: str, base: dict[str, Any], trials: int | None = None) -> Space:
    """Read SPACE.yaml and check it against the base config (plain data, as the config file holds it)."""
    from cxr.config import read_yaml

    return parse(read_yaml(url, SpaceError), base, source=url, trials=trials)


def parse(raw: Any, base: dict[str, Any], source: str = "space", trials: int | None = None) -> Space:
    """A Space from plain data, or a SpaceError naming the file and the offending key."""
    from cxr.evaluation.metrics import SCORE

    if not isinstance(raw, dict):
        raise SpaceError(f"{source}: the top level must be a mapping with a `space:` section")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise SpaceError(f"{source}: unknown top-level key {unknown[0]!r}{_close(unknown[0], TOP_KEYS)}; "
                         f"expected {', '.join(TOP_KEYS)}")
    entries = raw.get("space")
    if not isinstance(entries, dict) or not entries:
        raise SpaceError(f"{source}: `space:` must map config keys (e.g. optim.lr) to distributions")
    dims = [_dimension(source, str(k), v) for k, v in entries.items()]
    for dim in dims:
        _check_values(source, dim, base)
    asha = raw.get("asha") or {}
    if not isinstance(asha, dict) or set(asha) - set(ASHA_KEYS):
        bad = sorted(set(asha) - set(ASHA_KEYS)) if isinstance(asha, dict) else [asha]
        raise SpaceError(f"{source}: asha: unknown setting {bad[0]!r}; expected {', '.join(ASHA_KEYS)}")
    grace, factor = asha.get("grace_period", 1), asha.get("reduction_factor", 2)
    if not _whole(grace) or grace < 1:
        raise SpaceError(f"{source}: asha.grace_period must be a whole number of epochs >= 1 (got {grace!r})")
    if not _whole(factor) or factor < 2:
        raise SpaceError(f"{source}: asha.reduction_factor must be a whole number >= 2 (got {factor!r})")
    count = trials if trials is not None else raw.get("trials", 1 if any(d.kind == "grid" for d in dims) else 8)
    if not _whole(count) or count < 1:
        raise SpaceError(f"{source}: trials must be a whole number >= 1 (got {count!r})")
    metric = raw.get("metric", SCORE)
    if not isinstance(metric, str) or not metric.startswith("val_"):
        raise SpaceError(f"{source}: metric must name a validation metric the training reports each epoch, "
                         f"e.g. {SCORE} (got {metric!r})")
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name or "/" in name):
        raise SpaceError(f"{source}: name must be a folder name without '/' (got {name!r})")
    return Space(dims, int(count), metric, int(grace), int(factor), name, source)


def add_parser(p: Any) -> None:
    """`cxr sweep`'s arguments (cxr/cli.py stays small)."""
    p.add_argument("--config", required=True, help="the base YAML config every trial starts from")
    p.add_argument("--space", required=True, help="SPACE.yaml: the keys to vary and their distributions "
                   "(choice, uniform, loguniform, grid); see the README")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the base config")
    p.add_argument("--trials", type=int, help="samples to draw (default: SPACE.yaml's trials)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster's resources fit)")
    p.add_argument("--promote", action="store_true", help="promote the best trial's model over @champion if it is "
                   "better by `cxr promote`'s rules")
    p.set_defaults(func=command)


def command(args: Any) -> int:
    """`cxr sweep`: run it, print the trials' table."""
    if args.trials is not None and args.trials < 1 or args.max_concurrent is not None and args.max_concurrent < 1:
        raise ValueError("--trials and --max-concurrent must be at least 1")
    from cxr import tuning

    out = tuning.run(args.config, args.space, list(args.overrides), args.trials, args.max_concurrent, args.promote)
    print(tuning.summary_text(out))
    return 0


def _dimension(source: str, key: str, spec: Any) -> Dimension:
    where = f"{source}: space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(f"{where}: give exactly one distribution, one of {', '.join(KINDS)} (e.g. "
                         "{loguniform: [1.0e-4, 1.0e-2]})")
    kind, values = next(iter(spec.items()))
    if kind not in KINDS:
        raise SpaceError(f"{where}: unknown distribution {kind!r}{_close(str(kind), KINDS)}; "
                         f"expected one of {', '.join(KINDS)}")
    if not isinstance(values, list) or not values:
        raise SpaceError(f"{where}: {kind} takes a non-empty list (got {values!r})")
    if kind in ("uniform", "loguniform"):
        if len(values) != 2 or not all(_number(v) for v in values):
            raise SpaceError(f"{where}: {kind} takes [lo, hi], two numbers (got {values!r})")
        lo, hi = (float(v) for v in values)
        if lo >= hi:
            raise SpaceError(f"{where}: impossible range: {kind} [{lo:g}, {hi:g}] needs lo < hi")
        if kind == "loguniform" and lo <= 0:
            raise SpaceError(f"{where}: impossible range: loguniform [{lo:g}, {hi:g}] needs lo > 0")
        values = [lo, hi]
    return Dimension(key, str(kind), tuple(values))


def _check_values(source: str, dim: Dimension, base: dict[str, Any]) -> None:
    """The base config with each value (both ends and the middle of a range) must pass the schema."""
    from cxr import config as cfgmod

    if dim.kind in ("choice", "grid"):
        tried = list(dim.values)
    else:
        lo, hi = dim.values
        # an inner point too, off the integers: a whole-number key cannot take a continuous range
        inner = lo * (hi / lo) ** 0.382 if dim.kind == "loguniform" else lo + (hi - lo) * 0.382
        tried = [lo, hi, inner]
    for value in tried:
        try:
            cfgmod.validate(cfgmod.apply_overrides(base, overrides({dim.key: value})), source=source)
        except cfgmod.ConfigError as exc:
            detail = str(exc).split("invalid config:", 1)[-1].strip()
            raise SpaceError(f"{source}: space.{dim.key}: the config refuses {value!r}: {detail}") from None


def _close(word: str, options: tuple[str, ...]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _plain(v: Any) -> Any:
    """numpy scalars (Tune's samples) as Python ones, for JSON."""
    return v.item() if hasattr(v, "item") else v
