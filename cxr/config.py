"""One YAML file describes a training run; `section.key=value` overrides adjust it from the command line.

Validation (pydantic v2, unknown keys forbidden) happens on the driver before any Ray worker starts,
so a typo costs a second, not a cluster start-up. Override values are typed the way YAML types a
scalar (`3`, `3.0e-4`, `true`, `null`, `[a, b]`) and then checked like the file. The fully resolved
config (defaults filled in, precision chosen, credentials in URLs masked) is what a run records as `resolved.yaml`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cxr import storage
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

    enabled: bool = True
    rotate_deg: float = Field(7.0, ge=0.0, le=45.0)
    scale: tuple[float, float] = Field((0.9, 1.1), description="zoom range (a factor of 1 is no zoom)")
    translate: float = Field(0.05, ge=0.0, lt=0.5, description="fraction of the image side")
    brightness: float = Field(0.1, ge=0.0, le=1.0, description="additive, fraction of the full range")
    contrast: float = Field(0.1, ge=0.0, le=1.0, description="gain in [1 - c, 1 + c] around each image's mean")
    hflip: bool = False
    kernel: Literal["xla", "tf"] = Field("xla", description="xla: fused bilinear gather; tf: the reference op")


class Data(Section):
    """Where images come from: prepared shards (the fast path) or, for small data, a raw dataset root."""

    source: Literal["shards", "raw"] = Field("shards", description="shards: manifest_uri; raw: root")
    manifest_uri: str | None = Field(None, description="manifest.json written by `cxr prepare` (or its folder)")
    root: str | None = Field(None, description="raw mode: a dataset root laid out like NIH's (path or fsspec URL)")
    image_size: int = Field(224, ge=32, le=1024)
    train_split: str = "train"
    val_split: str = "val"
    augment: Augment = Field(default_factory=Augment)
    seed: int = 0
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
    name: str = Field("small_cnn", description="a name in cxr.models.MODELS")
    weights: str | None = Field(None, description="initial weights file (local path or fsspec URL)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

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
    lr: float = Field(1e-3, gt=0.0)
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1, description="default: train size // global batch")
    weighted_loss: bool = False
    lr_schedule: Literal["plateau", "cosine"] = Field("plateau", description=(
        "plateau: lr x plateau_factor when val AUROC stalls; cosine: lr down to min_lr over the epochs"))
    plateau_patience: int = Field(1, ge=1, description="epochs without val AUROC gain before lr drops")
    plateau_factor: float = Field(0.1, gt=0.0, lt=1.0)
    min_lr: float = Field(1e-6, ge=0.0)
    early_stopping_patience: int | None = Field(None, ge=1, description="null: never stop early")
    steps_per_log: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _cosine_decays(self) -> Optim:
        if self.lr_schedule == "cosine" and self.min_lr >= self.lr:
            raise ValueError(f"a cosine schedule decays from lr to min_lr: min_lr ({self.min_lr}) must be below "
                             f"lr ({self.lr})")
        return self


class Scaling(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    precision: Precision | None = Field(None, description="default: mixed_float16 on GPU, else CPU_PRECISION")
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
    experiment: str = "cxr"
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
    data: Data
    model: Model = Field(default_factory=Model)
    optim: Optim = Field(default_factory=Optim)
    scaling: Scaling = Field(default_factory=Scaling)
    tracking: Tracking = Field(default_factory=Tracking)
    run: Run = Field(default_factory=Run)


def load(url: str, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (local path or fsspec URL), apply `key=value` overrides, validate."""
    try:
        raw = yaml.safe_load(storage.read_text(url))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{url}: not valid YAML: {exc}") from exc
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
