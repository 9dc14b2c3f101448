"""The generic metadata reader: a dataset spec + a root → one table of cxr's fields and every row's problems.

What `cxr.data.metadata` does for NIH's files, done from a spec (`cxr.data.spec`) for any CSV layout:
CheXpert's observation columns, MIMIC-CXR-JPG's joined label and split CSVs, PadChest's Python-list label
strings, a hospital's export. Real files are messier than papers: every defect becomes a `Problem` naming
file, line and value; rows with a fatal one are excluded and listed, never a crash. Each row's own checks are
all reported; the split checks and the image scan apply to the rows that passed them.
"""

from __future__ import annotations

import ast
import gzip
import io
import re
import string
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cxr import storage
from cxr.data.metadata import _patient_permutation, _take  # the one seeded patient split
from cxr.data.spec import Spec, SpecError, find_folder, locate

SPLITS = ("train", "val", "test")
PRIORITY = {"test": 3, "val": 2, "train": 1, "train_val": 1}  # a patient in two official splits keeps the highest

# Problem kinds that remove a row; the others (sex, age, study) are reported and the value recorded as unknown.
FATAL = {"bad_csv_row", "bad_image_path", "bad_patient_id", "duplicate_image", "view_filtered", "unparseable_labels",
         "unknown_label", "unknown_label_value", "missing_join", "not_in_split", "unknown_split",
         "patient_in_two_splits", "missing_image"}


@dataclass(frozen=True)
class Problem:
    file: str
    line: int  # in `file`, header = line 1
    image: str
    kind: str
    detail: str

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL


@dataclass
class TabularDataset:
    """A root read with a spec. `table` holds usable rows; `y` their labels (1, 0, NaN = uncertain)."""

    spec: Spec
    source: str
    root: str
    files: list[str]
    rows_read: int
    table: pd.DataFrame  # image, patient, study, date, view, sex, age, split, file, line
    y: np.ndarray  # float32 [rows, len(spec.labels.names)]
    problems: list[Problem] = field(default_factory=list)
    official_split: bool = False
    split_note: str = ""
    ignored_labels: Counter = field(default_factory=Counter)
    images_checked: bool = False


def _read_csv(root: str, rel: str, problems: list[Problem]) -> pd.DataFrame:
    """A CSV as text cells ('' for blank), `.gz` or not, with each row's `_line`; bytes that are not UTF-8 read
    as U+FFFD. A row with more fields than the header is a `bad_csv_row` (excluded); if the first is, the
    columns cannot be trusted and the file is refused. Lines count records (a quoted newline is not counted).
    """
    url = storage.join(root, rel)
    raw = storage.read_bytes(url)
    if rel.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{url}: not a readable gzip file ({exc})") from None
    text = raw.decode("utf-8-sig", errors="replace")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, index_col=False,
                         skip_blank_lines=False, on_bad_lines="warn")
    skipped: dict[int, str] = {}
    for w in caught:
        message = str(w.message)
        if "does not match length of data" in message:
            raise ValueError(f"{url}: line 2 has more fields than the header; are cells holding commas unquoted?")
        for m in re.finditer(r"Skipping line (\d+): (.*)", message):
            skipped[int(m.group(1))] = m.group(2)
    for line, why in sorted(skipped.items()):
        problems.append(Problem(rel, line, "", "bad_csv_row", f"{why} (more fields than the header)"))
    lines = np.setdiff1d(np.arange(2, len(df) + len(skipped) + 2), list(skipped))
    df["_line"] = lines
    blank = (df.drop(columns="_line") == "").all(axis=1).to_numpy()
    return df[~blank].reset_index(drop=True)


def _read_tables(spec: Spec, root: str, folder: str, files: list[str], problems: list[Problem]) -> pd.DataFrame:
    frames = []
    for table in spec.metadata:
        rel = locate(root, folder, table.names)
        if rel is None:
            if table.required:
                raise FileNotFoundError(f"{root}: {' or '.join(table.names)} (or .gz) not found in {folder or '.'}")
            continue
        df = _read_csv(root, rel, problems)
        df["_file"] = rel
        df["_split"] = table.split or ""
        files.append(rel)
        frames.append(df)
    return pd.concat(frames, ignore_index=True).fillna("")


def _join(df: pd.DataFrame, rel: str, other: pd.DataFrame, on: list[str], spec_key: str,
          source: str) -> tuple[pd.DataFrame, dict[int, str]]:
    """Left join keeping the rows' order (the first of duplicate keys wins); row → why it found no partner."""
    for col in on:
        for name, frame in ((rel, other), ("the metadata", df)):
            if col not in frame.columns:
                raise SpecError(f"{source}: {spec_key}.keys: column {col!r} not in {name} "
                                f"(columns: {list(frame.columns)})")
    other = other.drop(columns="_line", errors="ignore").drop_duplicates(on, keep="first")
    merged = df.merge(other, how="left", on=on, suffixes=("", f" ({rel})"), indicator="_joined")
    keys = [merged[c].to_numpy(dtype=object) for c in on]
    unmatched = {int(i): f"no row in {rel} for " + ", ".join(f"{c}={k[i]}" for c, k in zip(on, keys, strict=True))
                 for i in np.flatnonzero((merged["_joined"] == "left_only").to_numpy())}
    return merged.drop(columns="_joined").fillna(""), unmatched


def _report_rows(out: pd.DataFrame, rows: dict[int, str], kind: str, keep: np.ndarray,
                 problems: list[Problem]) -> None:
    files, lines, images = _at(out)
    for i, detail in rows.items():
        if keep[i] or kind == "missing_join":
            problems.append(Problem(files[i], int(lines[i]), images[i], kind, detail))
        keep[i] = False


def _extract(values: pd.Series, regex: str | None) -> pd.Series:
    values = values.str.strip()
    if regex is None:
        return values
    search = re.compile(regex).search
    group = 1 if re.compile(regex).groups else 0
    found = [search(text) for text in values.to_numpy(dtype=object)]  # a list: Series.map costs 3x
    return pd.Series(["" if m is None else m.group(group) for m in found], index=values.index, dtype=object)


def _format(pattern: str, df: pd.DataFrame) -> pd.Series:
    """`pattern.format(**row)` of every row (cells stripped): by whole columns where the pattern is plain fields
    and `{col:.N}` prefixes, else row by row."""
    parts = list(string.Formatter().parse(pattern))
    if all(conv is None and re.fullmatch(r"(\.\d+)?", spec or "") and not re.search(r"[.\[]", name or "")
           for _, name, spec, conv in parts):
        out = pd.Series("", index=df.index, dtype=object)
        for literal, name, spec, _ in parts:
            out = out + literal  # Formatter.parse has undone {{ and }} already
            if name:
                cells = df[name].str.strip().to_numpy(dtype=object)
                out = out + (pd.Series(cells).str.slice(0, int(spec[1:])).to_numpy(dtype=object) if spec else cells)
        return out
    cols = sorted({name for _, name, _, _ in parts if name})
    return pd.Series([pattern.format(**dict(zip(cols, vals, strict=True)))
                      for vals in zip(*(df[c].str.strip() for c in cols), strict=True)], index=df.index)


def _image_paths(spec: Spec, df: pd.DataFrame, folder: str) -> pd.Series:
    img = spec.image
    paths = df[img.column].str.strip() if img.column else _format(img.pattern or "", df)
    for prefix in img.strip_prefixes:
        paths = paths.where(~paths.str.startswith(prefix), paths.str.slice(len(prefix)))
    paths = paths.str.lstrip("/")
    return paths.where(paths == "", folder + "/" + paths) if folder else paths


# A list of string literals without escapes, prefixes or odd white space: each literal's text is its value.
_QUOTED = re.compile(r"'([^'\\\r\n\x00]*)'|\"([^\"\\\r\n\x00]*)\"")
_PLAIN_LIST = re.compile(rf"\[[ \t]*(?:(?:{_QUOTED.pattern})(?:[ \t]*,[ \t]*(?:{_QUOTED.pattern}))*)?[ \t]*\]")


def _tokens(text: str, encoding: str, delimiter: str) -> list[str] | str:
    """The label tokens of a cell, or why it does not parse (never eval: ast.literal_eval reads literals only)."""
    if encoding == "python_list":
        if _PLAIN_LIST.fullmatch(text):  # the usual cell, "['a', 'b']": read without ast, the same result
            tokens = [(m.group(1) if m.group(1) is not None else m.group(2)).strip() for m in _QUOTED.finditer(text)]
            return [t for t in tokens if t] or "no labels"
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return "not a Python list literal"
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            return "not a list of strings"
        tokens = [v.strip() for v in value]
    else:
        tokens = [t.strip() for t in text.split(delimiter)]
    tokens = [t for t in tokens if t]
    return tokens if tokens else "no labels"


def _label_matrix(spec: Spec, df: pd.DataFrame, problems: list[Problem], ignored: Counter,
                  images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = spec.labels
    names = lab.names
    y = np.zeros((len(df), len(names)), dtype=np.float32)
    ok = np.ones(len(df), dtype=bool)
    files, lines = df["_file"].to_numpy(), df["_line"].to_numpy()
    if lab.encoding == "columns":
        blank = {"negative": 0.0, "uncertain": np.nan, "positive": 1.0}[lab.blank]
        codes = {**{v: 1.0 for v in lab.positive}, **{v: 0.0 for v in lab.negative},
                 **{v: np.nan for v in lab.uncertain}}
        for j, name in enumerate(names):
            col = lab.column_of(name)
            inverse, uniq = pd.factorize(df[col].str.strip().to_numpy(dtype=object))  # hashing: no string sort
            value = np.full(len(uniq), np.nan, dtype=np.float32)
            known = np.ones(len(uniq), dtype=bool)
            for u, text in enumerate(uniq):
                try:
                    value[u] = blank if text == "" else codes[float(text)]
                except (ValueError, KeyError):
                    known[u] = False
            y[:, j] = value[inverse]
            for i in np.flatnonzero(~known[inverse]):
                ok[i] = False
                problems.append(Problem(files[i], int(lines[i]), images[i], "unknown_label_value",
                                        f"{col} = {str(uniq[inverse[i]])!r} (codes: positive {lab.positive}, negative "
                                        f"{lab.negative}, uncertain {lab.uncertain})"))
        return y, ok
    index = {name: j for j, name in enumerate(names)}
    vocab = {**{n: n for n in names}, **lab.vocabulary}
    silent = set(lab.none) | set(lab.ignore)
    # each distinct cell parsed once (uniques in order of first appearance, so `ignored` keeps its order)
    codes, uniq = pd.factorize(df[lab.column].to_numpy(dtype=object))
    rows_of = np.bincount(codes, minlength=len(uniq))
    y_of = np.zeros((len(uniq), len(names)), dtype=np.float32)
    bad: dict[int, tuple[str, str]] = {}
    for u, text in enumerate(uniq):
        tokens = _tokens(text, lab.encoding, lab.delimiter)
        if isinstance(tokens, str):
            bad[u] = ("unparseable_labels", f"{lab.column} = {text[:120]!r}: {tokens}")
            continue
        unknown = [t for t in tokens if t not in vocab and t not in silent]
        if unknown and lab.unknown == "exclude":
            bad[u] = ("unknown_label", f"{lab.column}: unknown label(s) {unknown} in {text[:120]!r}")
            continue
        for t in unknown:
            ignored[t] += int(rows_of[u])
        for t in tokens:
            if t in vocab:
                y_of[u, index[vocab[t]]] = 1.0
    y = y_of[codes]
    ok = ~np.isin(codes, list(bad))
    for i in np.flatnonzero(~ok):
        kind, detail = bad[int(codes[i])]
        problems.append(Problem(files[i], int(lines[i]), images[i], kind, detail))
    return y, ok


def _check_columns(spec: Spec, df: pd.DataFrame, source: str, files: list[str]) -> None:
    missing = [f"{key}: column {col!r}" for key, col in spec.needed_columns().items() if col not in df.columns]
    if missing:
        raise SpecError(f"{source}: {'; '.join(missing)} not in {' + '.join(files)} "
                        f"(columns: {[c for c in df.columns if not c.startswith('_')]})")


def _at(out: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """File, line and image of every row, as arrays: a problem per row must not cost a pandas lookup."""
    return out["file"].to_numpy(dtype=object), out["line"].to_numpy(), out["image"].to_numpy(dtype=object)


def _row_checks(spec: Spec, df: pd.DataFrame, folder: str, problems: list[Problem]) -> tuple[pd.DataFrame, np.ndarray]:
    """cxr's fields of every row and the keep-mask; each defect reported once per row and kind."""
    out = pd.DataFrame({"image": _image_paths(spec, df, folder), "file": df["_file"], "line": df["_line"]})
    out["patient"] = _extract(df[spec.patient.column], spec.patient.regex)
    out["study"] = _extract(df[spec.study.column], spec.study.regex) if spec.study else ""
    out["date"] = _extract(df[spec.date.column], spec.date.regex) if spec.date else ""
    out["view"] = df[spec.view.column].str.strip() if spec.view else ""
    keep = np.ones(len(df), dtype=bool)
    files, lines, images = _at(out)

    def cells(column: str) -> np.ndarray:
        return df[column].to_numpy(dtype=object)

    def report(mask: np.ndarray, kind: str, detail) -> None:  # detail: row index → text
        for i in np.flatnonzero(mask):
            problems.append(Problem(files[i], int(lines[i]), images[i], kind, detail(i)))
        if kind in FATAL:
            keep[mask] = False

    report((out["image"] == "").to_numpy(), "bad_image_path", lambda i: "empty image path")
    dup = (out["image"].duplicated(keep="first") & (out["image"] != "")).to_numpy()
    report(dup, "duplicate_image", lambda i: "the same image as an earlier row; kept the first")
    patient_cells = cells(spec.patient.column)
    report((out["patient"] == "").to_numpy(), "bad_patient_id",
           lambda i: f"{spec.patient.column} = {patient_cells[i]!r}"
           + (f" does not match {spec.patient.regex!r}" if spec.patient.regex else ""))
    if spec.study:
        study_cells = cells(spec.study.column)
        report((out["study"] == "").to_numpy(), "bad_study_id",
               lambda i: f"{spec.study.column} = {study_cells[i]!r}; recorded as unknown")
    for part in ([spec.view] if spec.view and spec.view.keep else []) + list(spec.filters):
        values = df[part.column].str.strip()
        shown = values.to_numpy(dtype=object)
        report((~values.isin(part.keep or [])).to_numpy(), "view_filtered",
               lambda i, c=part.column, v=shown, k=part.keep: f"{c} = {v[i]!r}, not one of {k}")
    if spec.sex:
        raw = df[spec.sex.column].str.strip()
        out["sex"] = raw.map(spec.sex.values).fillna("")
        sexes = raw.to_numpy(dtype=object)
        report((raw == "").to_numpy(), "missing_sex", lambda i: f"{spec.sex.column} is blank")
        report(((raw != "") & (out["sex"] == "")).to_numpy(), "unknown_sex",
               lambda i: f"{spec.sex.column} = {sexes[i]!r}, not one of {list(spec.sex.values)}; recorded as unknown")
    else:
        out["sex"] = ""
    if spec.age:
        raw = df[spec.age.column].str.strip()
        age = pd.to_numeric(raw, errors="coerce")
        bad = (raw != "") & (age.isna() | (age < 0) | (age > spec.age.max))
        out["age"] = age.where(~bad)
        report((raw == "").to_numpy(), "missing_age", lambda i: f"{spec.age.column} is blank")
        ages = raw.to_numpy(dtype=object)
        report(bad.to_numpy(), "unknown_age", lambda i: f"{spec.age.column} = {ages[i]!r}; recorded as unknown")
    else:
        out["age"] = np.nan
    return out, keep


def _official_splits(spec: Spec, root: str, folder: str, df: pd.DataFrame, out: pd.DataFrame, keep: np.ndarray,
                     source: str, problems: list[Problem], files: list[str]) -> tuple[pd.DataFrame, bool, str]:
    """The official split per row ('' where none) from the files' own splits or the spec's split column/CSV."""
    split = df["_split"].copy()
    sp = spec.split
    if sp is None:
        return df.assign(_official=split), bool((split != "").any()), ""
    if sp.file:
        rel = locate(root, folder, [sp.file])
        if rel is None:
            if sp.required:
                raise FileNotFoundError(f"{root}: official split file {sp.file} (or .gz) not found in {folder or '.'}")
            return df.assign(_official=split), False, f"no official split: {sp.file} absent"
        files.append(rel)
        other = _read_csv(root, rel, problems)
        if sp.column not in other.columns:
            raise SpecError(f"{source}: split.column: column {sp.column!r} not in {rel} "
                            f"(columns: {list(other.columns)})")
        other = other[[*sp.keys, sp.column]].rename(columns={sp.column: "_split_value"})
        df, unmatched = _join(df, rel, other, sp.keys, "split", source)
        _report_rows(out, unmatched, "not_in_split", keep, problems)
        values = df["_split_value"].str.strip()
    elif sp.column in df.columns:
        values = df[sp.column].str.strip()
    elif sp.required:
        raise SpecError(f"{source}: split.column: column {sp.column!r} not in {' + '.join(files)}")
    else:
        return df.assign(_official=split), False, f"no official split: no column {sp.column}"
    mapped = values.map(sp.values)
    unknown = mapped.isna().to_numpy() & keep
    files_, lines, images = _at(out)
    given = values.to_numpy(dtype=object)
    for i in np.flatnonzero(unknown):
        problems.append(Problem(files_[i], int(lines[i]), images[i], "unknown_split",
                                f"split {given[i]!r} is not one of {list(sp.values)}"))
    keep &= ~unknown
    return df.assign(_official=mapped.fillna("")), True, ""


def _assign(out: pd.DataFrame, official: np.ndarray, has_official: bool, keep: np.ndarray, seed: int,
            val_fraction: float, test_fraction: float, problems: list[Problem]) -> np.ndarray:
    """Final split per row: official (a patient in two keeps its highest: test, val, train) + seeded val."""
    split = np.full(len(out), "", dtype=object)
    patients = out["patient"].to_numpy()
    files, lines, images = _at(out)
    if has_official:
        rank = np.array([PRIORITY.get(s, 0) for s in official])
        best = pd.Series(np.where(keep, rank, 0)).groupby(patients).transform("max").to_numpy()
        leak = keep & (rank < best)
        for i in np.flatnonzero(leak):
            problems.append(Problem(files[i], int(lines[i]), images[i],
                                    "patient_in_two_splits", f"patient {patients[i]} is in official split "
                                    f"{official[i]} and another; kept only in the other (patient-disjoint splits)"))
        keep &= ~leak
        for i in np.flatnonzero(keep & (rank == 0)):  # a file without a split among files with one
            problems.append(Problem(files[i], int(lines[i]), images[i],
                                    "not_in_split", "no official split for this row"))
            keep[i] = False
        split[keep] = official[keep]
        pool = keep & (official == "train_val")
        order = _patient_permutation(patients[pool], seed)
        val_p = set(order[: _take(len(order), val_fraction)])
        is_val = np.array([p in val_p for p in patients], dtype=bool)
        split[pool & is_val] = "val"
        split[pool & ~is_val] = "train"
    else:
        order = _patient_permutation(patients[keep], seed)
        n_test = _take(len(order), test_fraction)
        n_val = _take(len(order) - n_test, val_fraction)
        test_p, val_p = set(order[:n_test]), set(order[n_test:n_test + n_val])
        split[keep] = ["test" if p in test_p else "val" if p in val_p else "train" for p in patients[keep]]
    return split


def _scan(root: str, out: pd.DataFrame, keep: np.ndarray, workers: int, problems: list[Problem]) -> None:
    """Rows whose image file does not exist under ROOT (decoding stays with `cxr prepare`)."""
    todo = np.flatnonzero(keep)
    files, lines, images = _at(out)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = list(pool.map(lambda i: storage.exists(storage.join(root, images[i])), todo))
    for i, there in zip(todo, found, strict=True):
        if not there:
            problems.append(Problem(files[i], int(lines[i]), images[i], "missing_image",
                                    f"no file {images[i]} under the root"))
            keep[i] = False


def load(spec: Spec, root: str, source: str = "", seed: int = 0, val_fraction: float = 0.1,
         test_fraction: float = 0.2, scan_images: bool = False, workers: int = 8) -> TabularDataset:
    """Read and validate a root with a spec; see the module docstring."""
    source = source or f"spec {spec.name}"
    root = root.rstrip("/") if "://" in root else root
    folder = find_folder(spec, root)
    files: list[str] = []
    problems: list[Problem] = []
    df = _read_tables(spec, root, folder, files, problems)
    rows_read = len(df) + len(problems)  # + the metadata rows that did not parse
    unmatched: dict[int, str] = {}
    for j, join in enumerate(spec.join):
        rel = locate(root, folder, [join.file])
        if rel is None:
            raise FileNotFoundError(f"{root}: {join.file} (or .gz), joined by spec {spec.name}, not found")
        files.append(rel)
        df, missing = _join(df, rel, _read_csv(root, rel, problems), join.keys, f"join.{j}", source)
        unmatched = {**missing, **unmatched}
    _check_columns(spec, df, source, files)
    out, keep = _row_checks(spec, df, folder, problems)
    _report_rows(out, dict(sorted(unmatched.items())), "missing_join", keep, problems)
    ignored: Counter = Counter()
    y, labels_ok = _label_matrix(spec, df, problems, ignored, out["image"].to_numpy(dtype=object))
    keep &= labels_ok
    df, has_official, note = _official_splits(spec, root, folder, df, out, keep, source, problems, files)
    if scan_images:
        _scan(root, out, keep, workers, problems)
    out["split"] = _assign(out, df["_official"].to_numpy(dtype=object), has_official, keep, seed, val_fraction,
                           test_fraction, problems)
    problems.sort(key=lambda p: (files.index(p.file) if p.file in files else len(files), p.line))
    return TabularDataset(spec=spec, source=source, root=root, files=files, rows_read=rows_read,
                          table=out[keep].reset_index(drop=True), y=y[keep], problems=problems,
                          official_split=has_official, split_note=note, ignored_labels=ignored,
                          images_checked=scan_images)
