"""One YAML file describes a training run; `section.key=value` overrides adjust it from the command line.

Validation (pydantic v2, unknown keys forbidden) happens on the driver before any Ray worker starts,
so a typo costs a second, not a cluster start-up. Override values are typed the way YAML types a
scalar (`3`, `3.0e-4`, `true`, `null`, `[a, b]`) and then checked like the file. The fully resolved
config (defaults filled in, precision chosen, credentials in URLs masked) is what a run records as `resolved.yaml`.
"""

from __future__ import annotations

import difflib
import json
import os
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from cxr import storage
from cxr.models import MODEL_NAMES
from cxr.redact import redact

Precision = Literal["float32", "mixed_bfloat16", "mixed_float16"]

GPU_PRECISION: Precision = "mixed_float16"
# On CPUs, mixed_bfloat16 is no faster for the batch-norm nets trained here (the casts around batch norm eat
# the faster convolutions; docs/benchmarks.md), and float32 is exact.
CPU_PRECISION: Precision = "float32"


class ConfigError(ValueError):
    """The config file or an override is invalid; the message names every offending key."""


class Section(BaseModel):
    """Unknown keys are errors; numbers given for text fields (a run name `2024`) stay text."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class Augment(Section):
    """Training-time augmentation (applied by cxr.data.augment); validation is never augmented.

    Set a range to 0 to turn that augmentation off, or `enabled: false` for none at all. Flips are off
    by default: the heart is on the left, and a flipped radiograph is not a plausible one. The model is
    frozen (hashable) because the input pipeline captures it in traced functions.
    """

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, frozen=True)

    enabled: bool = Field(True, description="false: no augmentation at all, whatever the ranges below")
    rotate_deg: float = Field(7.0, ge=0.0, le=45.0, description="largest rotation, in degrees either way")
    scale: tuple[float, float] = Field((0.9, 1.1), description="zoom range (a factor of 1 is no zoom)")
    translate: float = Field(0.05, ge=0.0, lt=0.5, description="fraction of the image side")
    brightness: float = Field(0.1, ge=0.0, le=1.0, description="additive, fraction of the full range")
    contrast: float = Field(0.1, ge=0.0, le=1.0, description="gain in [1 - c, 1 + c] around each image's mean")
    hflip: bool = Field(False, description="random left-right flips (off: a flipped film puts the heart on the right)")
    kernel: Literal["xla", "tf"] = Field("xla", description="xla: fused bilinear gather; tf: the reference op")


class Data(Section):
    """Where images come from: prepared shards (the fast path) or, for small data, a raw dataset root."""

    source: Literal["shards", "raw"] = Field("shards", description="shards: manifest_uri; raw: root")
    manifest_uri: str | None = Field(None, description="manifest.json written by `cxr prepare` (or its folder)")
    root: str | None = Field(None, description="raw mode: a dataset root laid out like NIH's (path or fsspec URL)")
    image_size: int = Field(224, ge=32, le=1024, description="side in pixels of the model's square input")
    train_split: str = Field("train", description="the split trained on")
    val_split: str = Field("val", description="the split scored each epoch: the best checkpoint, lr plateaus, "
                           "early stopping")
    augment: Augment = Field(default_factory=Augment, description="training-time augmentation")
    seed: int = Field(0, description="seed of the weights' initialisation, the shuffle and the augmentation")
    allow_upsample: bool = Field(False, description="train above the stored image size (blurry: refused unless set)")
    raw_size: int | None = Field(None, ge=32, le=4096, description="raw mode: images are preprocessed to this side "
                                 "first, as `cxr prepare --size` would (default: image_size)")
    split_seed: int = Field(0, description="raw mode: the patient split's seed (`cxr inspect --seed`)")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="raw mode: as `cxr inspect --val-fraction`")
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="raw mode, no official lists: test patients")
    dataset: str | None = Field(None, description="a built-in dataset spec or a spec YAML: how raw mode reads "
                                "data.root (default nih); shards carry their manifest's (another one set here is "
                                "refused)")
    uncertain: Literal["ignore", "ones", "zeros"] = Field("ignore", description=(
        "uncertain labels: ignore (label -1, masked in the loss and metrics), ones (positive) or zeros (negative)"))

    @field_validator("dataset")
    @classmethod
    def _spec_name(cls, dataset: str | None) -> str | None:
        from cxr.data.spec import builtin_names

        if dataset is not None and dataset not in builtin_names() and not dataset.endswith((".yaml", ".yml")):
            raise ValueError(f"{dataset!r} is neither a built-in dataset spec ({', '.join(builtin_names())}) "
                             "nor a spec file (.yaml)")
        return dataset

    @model_validator(mode="after")
    def _where(self) -> Data:
        if self.source == "shards" and not self.manifest_uri:
            raise ValueError("data.source is shards: set data.manifest_uri (or data.source=raw with data.root)")
        if self.source == "raw" and not self.root:
            raise ValueError("data.source is raw: set data.root to a dataset root")
        return self

    @property
    def location(self) -> str:
        """The manifest or the root: what identifies the data of a run."""
        return str(self.manifest_uri if self.source == "shards" else self.root)


class Model(Section):
    name: str = Field("small_cnn", description=f"the architecture: {', '.join(MODEL_NAMES)} (cxr.models)")
    weights: str | None = Field(None, description="initial weights: a weights file or checkpoint folder (local path "
                                "or fsspec URL), or an MLflow model URI")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout rate before the classifier head (0: none)")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from cxr.models import MODEL_NAMES  # the one registry of model names

        if name not in MODEL_NAMES:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
        return name


class Optim(Section):
    batch_size: int = Field(16, ge=1, description="per worker; the global batch is this x num_workers")
    eval_batch_size: int | None = Field(None, ge=1, description="per worker; default 2 x batch_size")
    lr: float = Field(1e-3, gt=0.0, description="Adam's learning rate (the schedule's start)")
    epochs: int = Field(10, ge=1, description="epochs to train; raising it continues a finished run")
    steps_per_epoch: int | None = Field(None, ge=1, description="default: train size // global batch")
    weighted_loss: bool = Field(False, description="weight each finding's positive and negative terms by the "
                                "training split's counts (Wang et al.)")
    lr_schedule: Literal["plateau", "cosine"] = Field("plateau", description=(
        "plateau: lr x plateau_factor when val AUROC stalls; cosine: lr down to min_lr over the epochs"))
    plateau_patience: int = Field(1, ge=1, description="epochs without val AUROC gain before lr drops")
    plateau_factor: float = Field(0.1, gt=0.0, lt=1.0, description="plateau: what lr is multiplied by at a stall")
    min_lr: float = Field(1e-6, ge=0.0, description="the lowest lr either schedule goes to")
    early_stopping_patience: int | None = Field(None, ge=1, description="null: never stop early")
    steps_per_log: int = Field(50, ge=1, description="training steps between logged loss and throughput")

    @model_validator(mode="after")
    def _cosine_decays(self) -> Optim:
        if self.lr_schedule == "cosine" and self.min_lr >= self.lr:
            raise ValueError(f"a cosine schedule decays from lr to min_lr: min_lr ({self.min_lr}) must be below "
                             f"lr ({self.lr})")
        return self


class Scaling(Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers, one model replica each (data parallel)")
    use_gpu: bool = Field(False, description="one GPU per worker")
    resources_per_worker: dict[str, float] | None = Field(None, description="Ray resources a worker books, e.g. "
                                                          "{CPU: 4} (default: 1 CPU, plus 1 GPU with use_gpu)")
    precision: Precision | None = Field(None, description=f"default: {GPU_PRECISION} on GPU, else {CPU_PRECISION}")
    resources_timeout_s: float = Field(600.0, ge=0.0, description=(
        "on a cluster, how long to wait for the workers' resources (an autoscaler adding nodes) before failing"))

    @model_validator(mode="after")
    def _default_precision(self) -> Scaling:
        if self.precision is None:
            self.precision = GPU_PRECISION if self.use_gpu else CPU_PRECISION
        return self


class Tracking(Section):
    tracking_uri: str | None = Field(None, description="MLflow: a server URL, or sqlite:///path (default "
                                     "sqlite:///mlflow.db in the working directory)")
    experiment: str = Field("cxr", description="the MLflow experiment the run is recorded in")
    run_name: str | None = Field(None, description="the MLflow run's name (default: run.name)")
    registered_model: str | None = Field(None, description="registry name of the trained model (default: the "
                                         "experiment's name)")
    artifact_location: str | None = Field(None, description="new experiments' artifact root (default: mlartifacts/ "
                                          "beside a SQLite store; a server's own)")
    system_metrics: bool = Field(True, description="log the driver host's CPU, memory, disk, network while training")

    @property
    def model_name(self) -> str:
        return self.registered_model or self.experiment


class Run(Section):
    storage_path: str = Field("demo-out/ray", description="Ray Train storage: local path or URI")
    name: str = Field("cxr", description="same storage_path + name resumes the run")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts; -1 for unlimited")
    checkpoints_to_keep: int = Field(2, ge=1, description="best by val AUROC; the latest is always kept")


class Config(Section):
    data: Data = Field(description="where the images come from (required: data.manifest_uri, or data.root in raw "
                       "mode)")
    model: Model = Field(default_factory=Model, description="the network")
    optim: Optim = Field(default_factory=Optim, description="the optimisation: batch, learning rate, epochs")
    scaling: Scaling = Field(default_factory=Scaling, description="how many Ray Train workers, on what")
    tracking: Tracking = Field(default_factory=Tracking, description="where the run is recorded (MLflow)")
    run: Run = Field(default_factory=Run, description="checkpoints: where, under what name, how many")


def read_yaml(url: str, error: type[Exception] = ValueError) -> Any:
    """A YAML file's data (local path or fsspec URL); a missing file or bad YAML raises `error`, naming it."""
    try:
        return yaml.safe_load(storage.read_text(url))
    except FileNotFoundError:
        raise error(f"no such file: {redact(url)}") from None
    except yaml.YAMLError as exc:
        raise error(f"{redact(url)}: not valid YAML: {exc}") from exc


def load(url: str, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (local path or fsspec URL), apply `key=value` overrides, validate."""
    raw = read_yaml(url, ConfigError)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{url}: the top level must be a mapping of sections, not {type(raw).__name__}")
    return validate(apply_overrides(raw, overrides), source=url)


def validate(raw: dict[str, Any], source: str = "config") -> Config:
    """A Config from plain data, or a ConfigError naming every bad key."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors()]
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(problems)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 0.0003): the value typed as a YAML scalar would be."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not a YAML scalar: {exc}") from exc
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `raw` with each override set (unknown keys are caught later by validation)."""
    out = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[:depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def to_yaml(config: Config) -> str:
    """The resolved config as YAML, in declaration order, credentials in URLs masked: every copy is a record."""
    return redact(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def write_resolved(config: Config, url: str) -> None:
    storage.write_text(url, to_yaml(config))


def show(url: str | None, overrides: Sequence[str] = ()) -> str:
    """`cxr config --show`: the config `cxr train --config URL overrides...` would run with, as YAML."""
    if not url:
        raise ConfigError("--show needs --config FILE (and key=value overrides, if any)")
    return to_yaml(with_absolute_paths(load(url, overrides)))


def _describe(err: dict[str, Any]) -> str:
    """One line per pydantic error: dotted key, message, the value given."""
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        hint = _suggest(loc)
        return f"{key}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{key}: required but missing"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


def _suggest(loc: list[str]) -> str:
    """' (did you mean optim.lr?)' for a misspelt key, else ''."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return f" (did you mean {'.'.join([*loc[:-1], close[0]])}?)" if close else ""


def _absolute_spec(dataset: str | None) -> dict[str, str]:
    """A local spec file's path made absolute (a built-in name stays a name, and stays unset if it was)."""
    from cxr.data.spec import builtin_names

    if dataset is None or dataset in builtin_names() or "://" in dataset:
        return {}
    return {"dataset": os.path.abspath(dataset)}


def with_absolute_paths(config: Config) -> Config:
    """Local relative paths made absolute against the driver's working directory.

    Ray workers run in directories of their own, so `demo-out/shards` must mean the driver's folder;
    rank 0 logs to MLflow, so a relative `sqlite:///demo-out/mlflow.db` must too. URLs (s3://, http://,
    file://, ...) are left as they are.
    """

    def absolute(path: str | None) -> str | None:
        return path if path is None or "://" in path else os.path.abspath(path)

    def absolute_tracking(uri: str | None) -> str | None:
        if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
        return uri if uri is None or ":" in uri else os.path.abspath(uri)

    weights = config.model.weights
    model_uri = (weights or "").startswith(("models:/", "runs:/"))  # a registered model to fine-tune: no path
    return config.model_copy(update={
        "tracking": config.tracking.model_copy(
            update={"tracking_uri": absolute_tracking(config.tracking.tracking_uri)}),
        "data": config.data.model_copy(update={"manifest_uri": absolute(config.data.manifest_uri),
                                               "root": absolute(config.data.root),
                                               **_absolute_spec(config.data.dataset)}),
        "model": config.model.model_copy(update={"weights": weights if model_uri else absolute(weights)}),
        "run": config.run.model_copy(update={"storage_path": absolute(config.run.storage_path)}),
    })


# --------------------------------------------------------------------- the reference: docs/configuration.md

REFERENCE_COMMAND = "python -m cxr.cli config --doc > docs/configuration.md"
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def reference() -> str:
    """Every key of the schema above with its type, default and meaning, as Markdown: docs/configuration.md is
    this text (tests/test_config.py fails when they differ), so the reference cannot drift from the code."""
    lines = ["# Configuration reference", "",
             f"Generated from the schema in `cxr/config.py` by `{REFERENCE_COMMAND}`; do not edit by hand.", "",
             "A config is a YAML file of the sections below (`cxr train --config FILE`). Every key has a default "
             "but the data's location (`data.manifest_uri`, or `data.root` in raw mode); unknown keys are errors. "
             "On the command line `section.key=value` overrides a key, its value typed as YAML types a scalar "
             "(`3`, `3e-4`, `true`, `null`, `[a, b]`), and `cxr config --show --config FILE key=value ...` prints "
             "the config a run would use, defaults filled in.", ""]
    for name, field in Config.model_fields.items():
        lines += _section(name, field)
    return "\n".join(lines)


def _section(key: str, field: FieldInfo) -> list[str]:
    """A section's table (one row per key), then its sub-sections'."""
    lines = [f"## `{key}`", "", _cell(field.description or "")[:1].upper() + _cell(field.description or "")[1:] + ".",
             "", "| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for name, sub in typing.cast(type[BaseModel], field.annotation).model_fields.items():
        if isinstance(sub.annotation, type) and issubclass(sub.annotation, Section):
            nested.append((f"{key}.{name}", sub))
            continue
        default = "required" if sub.is_required() else f"`{json.dumps(sub.default)}`"
        lines.append(f"| `{key}.{name}` | {_type(sub)} | {default} | {_cell(sub.description or '')} |")
    lines.append("")
    for sub_key, sub in nested:
        lines += _section(sub_key, sub)
    return lines


def _type(field: FieldInfo) -> str:
    """The annotation as a reader would say it, with its bounds: `int, >= 32, <= 1024`."""
    bounds = [f"{sign} {getattr(m, attr)}" for m in field.metadata for attr, sign in _BOUNDS.items()
              if getattr(m, attr, None) is not None]
    return ", ".join([_type_name(field.annotation), *bounds])


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named + (["null"] if type(None) in args else []))
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is dict:
        return "{" + f"{_type_name(args[0])}: {_type_name(args[1])}" + "}"
    return getattr(annotation, "__name__", str(annotation))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
