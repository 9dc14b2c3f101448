"""Dataset specs: a YAML file says how a dataset root's metadata maps to cxr's fields (issue 21 §1).

A spec is data, not code: a built-in name (`nih`, `chexpert`, `mimic-cxr-jpg`, `padchest`, `csv`, shipped in
`cxr/data/specs/`) or a user's own YAML file. It is validated here, unknown keys forbidden, and every error
names the file and the dotted key, so a typo in a hospital's spec costs a second. `cxr.data.tabular` reads a
root with it; docs/data.md "Dataset specs" describes every key.
"""

from __future__ import annotations

import difflib
import os
import re
import string
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cxr import storage
from cxr.redact import redact

SplitName = Literal["train", "val", "test", "train_val"]  # train_val: val patients are drawn from it by the seed


class SpecError(ValueError):
    """A dataset spec is invalid or does not fit the files it describes; the message names file and key."""


class Part(BaseModel):
    """Unknown keys are errors; a YAML number given for a text field (a code `1`) stays text."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, frozen=True)


class Table(Part):
    """A metadata CSV; `file` as distributed (a list: the first present wins); `NAME.gz` is accepted too."""

    file: str | list[str]
    split: SplitName | None = Field(None, description="the official split of every row of this file")
    required: bool = True

    @property
    def names(self) -> list[str]:
        return [self.file] if isinstance(self.file, str) else list(self.file)


class Join(Part):
    """Another CSV joined onto the metadata rows by key columns (MIMIC's label CSV on subject_id, study_id)."""

    file: str
    keys: list[str] = Field(min_length=1, description="key columns (not `on`: YAML reads that as true)")


class Split(Part):
    """Official split: a column of the (joined) rows, or of a split CSV joined on `keys`; values map to splits."""

    file: str | None = None
    keys: list[str] = Field(default_factory=list)
    column: str
    values: dict[str, SplitName]
    required: bool = Field(True, description="false: without the file, say so and use the seeded patient split")

    @model_validator(mode="after")
    def _joined(self) -> Split:
        if self.file and not self.keys:
            raise ValueError("split.file needs split.keys, the key columns it is joined on")
        return self


class Column(Part):
    """A column, optionally narrowed by a regex (group 1, else the whole match), e.g. CheXpert's patient in Path."""

    column: str
    regex: str | None = None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, regex: str | None) -> str | None:
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return regex


class Image(Part):
    """The image path relative to the root: a column, or a `str.format` pattern over columns.

    `strip_prefixes`: leading folders the path column repeats (CheXpert's `CheXpert-v1.0-small/`); the rest is
    taken relative to the folder the metadata CSV was found in, so ROOT may be that folder or its parent.
    """

    column: str | None = None
    pattern: str | None = Field(None, description="e.g. files/p{subject_id:.2}/p{subject_id}/s{study_id}/"
                                "{dicom_id}.jpg ({col:.2}: the first 2 characters)")
    strip_prefixes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one(self) -> Image:
        if (self.column is None) == (self.pattern is None):
            raise ValueError("give exactly one of image.column and image.pattern")
        return self


class View(Part):
    column: str
    keep: list[str] | None = Field(None, description="rows with another value are excluded (view_filtered)")


class Sex(Part):
    column: str
    values: dict[str, Literal["M", "F"]] = Field(default_factory=lambda: {"M": "M", "F": "F"})


class Age(Part):
    column: str
    max: float = 120.0


class Labels(Part):
    """The label set (`names`, in order) and how cells encode it.

    delimited / python_list: one column of tokens ("A|B", or "['a', 'b']" read by ast.literal_eval); a token
    is a name, a `vocabulary` spelling of one, a `none` token (no finding), or an `ignore` token; others are
    unknown labels (`unknown: exclude` drops the row, `ignore` counts them only). columns: one column per
    finding (`columns` maps name → column, default the name) whose numbers are `positive` / `negative` /
    `uncertain` codes; a blank cell means `blank`.
    """

    names: list[str] = Field(min_length=1)
    encoding: Literal["delimited", "python_list", "columns"]
    column: str | None = None
    delimiter: str = "|"
    vocabulary: dict[str, str] = Field(default_factory=dict)
    none: list[str] = Field(default_factory=list)
    ignore: list[str] = Field(default_factory=list)
    unknown: Literal["exclude", "ignore"] = "exclude"
    columns: dict[str, str] = Field(default_factory=dict)
    positive: list[float] = Field(default_factory=lambda: [1.0])
    negative: list[float] = Field(default_factory=lambda: [0.0])
    uncertain: list[float] = Field(default_factory=lambda: [-1.0])
    blank: Literal["negative", "uncertain", "positive"] = "negative"

    @model_validator(mode="after")
    def _consistent(self) -> Labels:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"labels.names repeats a name: {self.names}")
        if self.encoding == "columns":
            if self.column is not None:
                raise ValueError("labels.column is for the delimited and python_list encodings; use labels.columns")
        elif not self.column:
            raise ValueError(f"labels.column: required with encoding {self.encoding} (the column of label tokens)")
        unknown = sorted(set(self.vocabulary.values()) - set(self.names)) + sorted(set(self.columns) - set(self.names))
        if unknown:
            raise ValueError(f"labels.vocabulary/columns name finding(s) not in labels.names: {unknown}")
        return self

    def column_of(self, name: str) -> str:
        return self.columns.get(name, name)


class Spec(Part):
    name: str
    description: str = ""
    reader: Literal["generic", "nih"] = Field("generic", description="nih: the built-in `nih` is read by "
                                              "cxr.data.metadata, not cxr.data.tabular (a copy of it is)")
    folders: list[str] = Field(default_factory=lambda: [""], description="where under ROOT the CSVs may be")
    metadata: list[Table] = Field(min_length=1)
    join: list[Join] = Field(default_factory=list)
    split: Split | None = None
    image: Image
    patient: Column
    study: Column | None = None
    date: Column | None = Field(None, description="the study date, kept as text (e.g. MIMIC's StudyDate)")
    view: View | None = None
    filters: list[View] = Field(default_factory=list, description="more columns that must hold a kept value")
    sex: Sex | None = None
    age: Age | None = None
    labels: Labels

    @model_validator(mode="after")
    def _filters_keep(self) -> Spec:
        for i, f in enumerate(self.filters):
            if not f.keep:
                raise ValueError(f"filters.{i}.keep: list the values of {f.column!r} to keep")
        return self

    def needed_columns(self) -> dict[str, str]:
        """Spec key → the column it names, for every column the rows must have."""
        need: dict[str, str] = {}
        if self.image.column:
            need["image.column"] = self.image.column
        else:
            for _, name, _, _ in string.Formatter().parse(self.image.pattern or ""):
                if name:
                    need[f"image.pattern {{{name}}}"] = name
        need["patient.column"] = self.patient.column
        for key, part in (("study", self.study), ("date", self.date), ("view", self.view), ("sex", self.sex),
                          ("age", self.age)):
            if part is not None:
                need[f"{key}.column"] = part.column
        for i, f in enumerate(self.filters):
            need[f"filters.{i}.column"] = f.column
        lab = self.labels
        if lab.encoding == "columns":
            for name in lab.names:
                need[f"labels.columns[{name}]"] = lab.column_of(name)
        else:
            need["labels.column"] = lab.column or ""
        return need


def locate(root: str, folder: str, names: list[str]) -> str | None:
    """The first of `names` (or `name.gz`) present in ROOT/folder, as a path relative to ROOT."""
    listed = set(storage.listdir(storage.join(root, folder) if folder else root))
    for name in names:
        for candidate in (name, name + ".gz"):
            if candidate in listed:
                return f"{folder}/{candidate}" if folder else candidate
    return None


def find_folder(spec: Spec, root: str) -> str:
    """The first of the spec's `folders` under ROOT that holds its first metadata file."""
    first = spec.metadata[0].names
    for folder in spec.folders:
        if locate(root, folder.strip("/"), first):
            return folder.strip("/")
    where = ", ".join(repr(f or ".") for f in spec.folders)
    raise FileNotFoundError(f"{root}: no {' or '.join(first)} (or .gz) in {where}: is this a {spec.name} root?")


def builtin_names(package: str = "cxr.data", folder: str = "specs") -> list[str]:
    """The YAML files shipped in `package`/`folder`, by name: the dataset specs unless another folder is named."""
    here = resources.files(package).joinpath(folder)
    return sorted(p.name[: -len(".yaml")] for p in here.iterdir() if p.name.endswith(".yaml"))


def read_named(name_or_path: str, what: str, package: str = "cxr.data", folder: str = "specs",
               kind: str | None = None) -> tuple[str, str]:
    """(text, source) of a built-in YAML file by name, else of a YAML file (path or fsspec URL): how a dataset
    spec and an evaluation's label map are both named. `kind`: what a built-in one is called (default `what`)."""
    names = builtin_names(package, folder)
    if name_or_path in names:
        where = f"{package.replace('.', '/')}/{folder}/{name_or_path}.yaml"
        return (resources.files(package).joinpath(folder, f"{name_or_path}.yaml").read_text("utf-8"),
                f"built-in {kind or what} {name_or_path} ({where})")
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path or "://" in name_or_path:
        source = redact(name_or_path)
        if not storage.exists(name_or_path):
            raise FileNotFoundError(f"{what} {source}: no such file")
        return storage.read_text(name_or_path), source
    close = difflib.get_close_matches(name_or_path, names, 1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise SpecError(f"{name_or_path!r} is not a built-in {kind or what} ({', '.join(names)}) nor a .yaml file{hint}")


def load(name_or_path: str) -> tuple[Spec, str]:
    """The spec and where it came from: a built-in name, else a YAML file (path or fsspec URL)."""
    text, source = read_named(name_or_path, "dataset spec", kind="spec")
    return parse(text, source), source


def parse(text: str, source: str, model: type[BaseModel] = Spec, what: str = "dataset spec",
          keys: str = "name, metadata, image, patient, labels, …") -> Any:
    """`text` validated as a `model` (a dataset spec, or another file in its style such as an evaluation's label
    map): every error names `source` and the dotted key."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a {what} is a mapping of keys ({keys})")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        known = _keys() if model is Spec else _fields(model)
        lines = "\n  ".join(_describe(err, known) for err in exc.errors())
        raise SpecError(f"{source}: invalid {what}:\n  {lines}") from None


def _fields(model: type[BaseModel]) -> list[str]:
    """Every key of `model` and of the models its fields hold (for "did you mean")."""
    import typing

    out, todo = set(), [model]
    while todo:
        m = todo.pop()
        for name, info in m.model_fields.items():
            out.add(name)
            todo += [t for t in (info.annotation, *typing.get_args(info.annotation))
                     if isinstance(t, type) and issubclass(t, BaseModel)]
            todo += [a for t in typing.get_args(info.annotation) for a in typing.get_args(t)
                     if isinstance(a, type) and issubclass(a, BaseModel)]
    return sorted(out)


def _describe(err: dict[str, Any], known: list[str] | None = None) -> str:
    """One line per error: the dotted key (list positions included), what is wrong, a close key if misspelt."""
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc[-1], known or _keys(), n=1)
        return f"{key}: unknown key" + (f" (did you mean {close[0]}?)" if close else "")
    if err["type"] == "missing":
        return f"{key}: required but missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "value_error":  # the spec's own checks name their key ("labels.column: …")
        return msg if not loc or msg.startswith(f"{loc[-1]}.") else f"{key}: {msg}"
    return f"{key}: {msg} (got {err.get('input')!r})"


def _keys() -> list[str]:
    models: list[type[BaseModel]] = [Spec, Table, Join, Split, Column, Image, View, Sex, Age, Labels]
    return sorted({k for m in models for k in m.model_fields})
