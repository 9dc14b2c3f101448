"""The metadata stage: an NIH-shaped dataset root → one validated table with patient-disjoint splits.

A root (local path or fsspec URL) holds `Data_Entry_2017.csv` or `Data_Entry_2017_v2020.csv`, optionally
`BBox_List_2017.csv`, `train_val_list.txt` / `test_list.txt`, and images in `images/` or the Kaggle
layout `images_0NN/images/`. Every quirk of the real release is handled here, once, so later stages see
clean rows. Nothing is dropped silently: each defect becomes a `Problem`; rows with a fatal one are
excluded from the table and listed.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from PIL import Image

from cxr import labels, storage
from cxr.redact import redact

log = logging.getLogger(__name__)

DATA_ENTRY = "Data_Entry_2017_v2020.csv"  # the 2020 re-release: corrected ages, no trailing comma
DATA_ENTRY_2017 = "Data_Entry_2017.csv"
CSV_NAMES = (DATA_ENTRY, DATA_ENTRY_2017)
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
BBOX_NAME = "BBox_List_2017.csv"
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
SPLITS = ("train", "val", "test")
MAX_ENCODING_REPORTS = 100  # lines with non-UTF-8 bytes listed per file; a file in another encoding has them all
MAX_AGE = 120  # the 2017 file has ages up to 414; no patient is older than this

COLUMNS = {"Image Index": "image", "Finding Labels": "labels", "Follow-up #": "followup", "Patient ID": "patient",
           "Patient Age": "age", "Patient Gender": "sex", "View Position": "view"}

# Problem kinds that remove a row (or a split-list entry) from the dataset. Others are reported only.
FATAL = {
    "missing_image",
    "unreadable_image",
    "duplicate_image",
    "unknown_label",
    "bad_patient_id",
    "not_in_split_list",
    "in_both_lists",
    "patient_in_both_lists",
}


@dataclass(frozen=True)
class Problem:
    image: str
    kind: str
    detail: str

    @property
    def fatal(self) -> bool:
        return self.kind in FATAL


@dataclass
class Dataset:
    """A loaded dataset root. `table` holds usable rows only; `problems` says what was excluded and why."""

    root: str
    csv_name: str
    rows_read: int
    table: pd.DataFrame  # image, patient, followup, age, sex, view, labels, split, path, + one column/finding
    bboxes: pd.DataFrame  # image, finding, x, y, w, h
    problems: list[Problem] = field(default_factory=list)
    images_present: bool = False
    official_split: bool = False

    @property
    def y(self) -> np.ndarray:
        """Multi-hot label matrix [rows, 14] in canonical finding order."""
        return self.table[list(labels.FINDINGS)].to_numpy(dtype=np.uint8)

    def split(self, name: str) -> pd.DataFrame:
        return self.table[self.table["split"] == name]


def _find_csv(root: str) -> str:
    present = set(storage.listdir(root))
    for name in CSV_NAMES:
        if name in present:
            return name
    raise FileNotFoundError(
        f"{root}: no metadata CSV; expected one of {', '.join(CSV_NAMES)} (found: {sorted(present)[:10]})"
    )


def _read_text(url: str, problems: list[Problem]) -> str:
    """A metadata file as text; every line holding bytes that are not UTF-8 is reported by file, line and column.

    One bad byte must not make 112,120 rows unreadable: it is read as U+FFFD (a row it breaks fails its own
    checks). A bad byte in the first line is an error: the header's columns cannot be trusted.
    """
    raw = storage.read_bytes(url)
    name = url.rsplit("/", 1)[-1]
    reported: set[int] = set()
    start = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark is not data
    while True:
        try:
            raw[start:].decode("utf-8")
            break
        except UnicodeDecodeError as exc:
            at = start + exc.start
            line = raw.count(b"\n", 0, at) + 1
            column = at - (raw.rfind(b"\n", 0, at) + 1) + 1
            where = f"line {line}, column {column}: byte 0x{raw[at]:02x} is not UTF-8"
            if line == 1:
                raise ValueError(f"{redact(url)}: {where} (in the header; save the file as UTF-8)") from None
            if line not in reported:
                problems.append(Problem(name, "bad_encoding", f"{name} {where}; read as U+FFFD"))
                reported.add(line)
            if len(reported) == MAX_ENCODING_REPORTS:
                problems.append(Problem(name, "bad_encoding", f"{name}: more lines after line {line} are not "
                                        "UTF-8 and are not listed (is the file in another encoding?)"))
                break
            start = at + max(1, exc.end - exc.start)
    return raw.decode("utf-8-sig", errors="replace")


def _read_data_entry(url: str, problems: list[Problem]) -> pd.DataFrame:
    text = _read_text(url, problems)
    df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{url}: missing column(s) {missing}; header is {list(df.columns)}")
    extra = [c for c in df.columns[len(COLUMNS):] if str(c).startswith("Unnamed") and (df[c] != "").any()]
    if extra:
        raise ValueError(f"{url}: unexpected values in unnamed column(s) {extra}")
    df = df[list(COLUMNS)].rename(columns=COLUMNS)
    df["row"] = np.arange(2, len(df) + 2)  # line number in the file, for messages
    return df


def _parse_age(text: str) -> float:
    """NIH ages are integers ('57'); early releases wrote '057Y'. Months/days count as under one year."""
    m = re.fullmatch(r"\s*(\d+)\s*([YMD]?)\s*", text)
    if not m:
        return float("nan")
    value, unit = int(m.group(1)), m.group(2)
    return float(value) if unit in ("", "Y") else 0.0


def _locate_images(root: str) -> dict[str, str]:
    """Image index → URL, from `images/` and the Kaggle `images_0NN/images/` folders."""
    found: dict[str, str] = {}
    for entry in storage.listdir(root):
        if entry == "images":
            folder = storage.join(root, "images")
        elif re.fullmatch(r"images_\d{3}", entry):
            folder = storage.join(root, entry, "images")
        else:
            continue
        for name in storage.listdir(folder):
            if name.lower().endswith(".png"):
                found.setdefault(name, storage.join(folder, name))
    return found


def _read_list(url: str, problems: list[Problem]) -> list[str] | None:
    if not storage.exists(url):
        return None
    text = _read_text(url, problems)
    return [line.strip() for line in text.splitlines() if line.strip()]


def _label_matrix(df: pd.DataFrame, problems: list[Problem]) -> tuple[np.ndarray, np.ndarray]:
    """Multi-hot matrix and a row-is-valid mask; unknown labels become problems naming row and label."""
    y = np.zeros((len(df), labels.NUM_FINDINGS), dtype=np.uint8)
    ok = np.ones(len(df), dtype=bool)
    cache: dict[str, tuple[np.ndarray, list[str]]] = {}
    for i, (text, image, row) in enumerate(zip(df["labels"], df["image"], df["row"], strict=True)):
        if text not in cache:
            cache[text] = labels.parse(text)
        vec, unknown = cache[text]
        if unknown:
            ok[i] = False
            problems.append(Problem(image, "unknown_label", f"row {row}: unknown label(s) {unknown} in {text!r}"))
        y[i] = vec
    return y, ok


def _check_rows(df: pd.DataFrame, problems: list[Problem]) -> np.ndarray:
    """Duplicate indices, bad patient ids, impossible ages. Returns the keep-mask."""
    keep = np.ones(len(df), dtype=bool)
    dup = df["image"].duplicated(keep="first").to_numpy()
    first = df.drop_duplicates("image", keep="first").set_index("image")
    for i in np.flatnonzero(dup):
        r = df.iloc[i]
        same = (first.loc[r["image"], ["labels", "patient"]] == r[["labels", "patient"]]).all()
        what = "identical to" if same else "conflicts with"
        problems.append(Problem(r["image"], "duplicate_image",
                                f"row {r['row']}: duplicate Image Index, {what} an earlier row; kept the first"))
    keep &= ~dup

    pid = pd.to_numeric(df["patient"], errors="coerce")
    for i in np.flatnonzero(pid.isna().to_numpy() & keep):
        r = df.iloc[i]
        problems.append(Problem(r["image"], "bad_patient_id", f"row {r['row']}: Patient ID {r['patient']!r}"))
        keep[i] = False
    df["patient"] = pid.fillna(-1).astype(np.int64)

    ages = df["age"].map(_parse_age)
    bad_age = (ages.isna() | (ages < 0) | (ages > MAX_AGE)).to_numpy()
    for i in np.flatnonzero(bad_age & keep):
        r = df.iloc[i]
        problems.append(Problem(r["image"], "impossible_age",
                                f"row {r['row']}: Patient Age {r['age']!r}; recorded as unknown"))
    df["age"] = ages.where(~bad_age)
    df["followup"] = pd.to_numeric(df["followup"], errors="coerce").fillna(-1).astype(np.int64)
    return keep


def _patient_permutation(patients: np.ndarray, seed: int) -> np.ndarray:
    unique = np.unique(patients)
    return unique[np.random.default_rng(seed).permutation(len(unique))]


def _take(n: int, fraction: float) -> int:
    """Patients for a split of `fraction`: at least one when there is anything to take."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, int(round(fraction * n))))


def _assign_splits(df: pd.DataFrame, root: str, seed: int, val_fraction: float, test_fraction: float,
                   problems: list[Problem], in_csv: set[str]) -> tuple[np.ndarray, np.ndarray, bool]:
    """Split per row ('' where excluded) and the keep-mask. Patient-disjoint by construction.

    `df` holds the rows still usable; `in_csv` every image the CSV names, so that a listed image excluded for
    another reason (already reported) is not reported again as missing from the CSV.
    """
    split = np.full(len(df), "", dtype=object)
    keep = np.ones(len(df), dtype=bool)
    train_val = _read_list(storage.join(root, TRAIN_VAL_LIST), problems)
    test = _read_list(storage.join(root, TEST_LIST), problems)
    official = train_val is not None and test is not None
    if (train_val is None) != (test is None):
        have = TRAIN_VAL_LIST if train_val is not None else TEST_LIST
        raise ValueError(f"{root}: {have} is present without its partner list; provide both or neither")

    if official:
        for name, entries in (("train_val_list.txt", train_val), ("test_list.txt", test)):
            for image in entries:
                if image not in in_csv:
                    problems.append(Problem(image, "not_in_csv", f"listed in {name} but has no row in the CSV"))
        in_tv = df["image"].isin(set(train_val)).to_numpy()
        in_test = df["image"].isin(set(test)).to_numpy()
        for i in np.flatnonzero(in_tv & in_test):
            problems.append(Problem(df["image"].iat[i], "in_both_lists",
                                    "listed in both train_val_list.txt and test_list.txt"))
        for i in np.flatnonzero(~in_tv & ~in_test):
            problems.append(Problem(df["image"].iat[i], "not_in_split_list",
                                    f"row {df['row'].iat[i]}: in neither split list"))
        keep &= in_tv ^ in_test
        test_patients = set(df.loc[in_test & keep, "patient"])
        leak = in_tv & keep & df["patient"].isin(test_patients).to_numpy()
        for i in np.flatnonzero(leak):
            problems.append(Problem(df["image"].iat[i], "patient_in_both_lists",
                                    f"patient {df['patient'].iat[i]} also has images in test_list.txt; "
                                    "excluded from training to keep splits patient-disjoint"))
        keep &= ~leak
        split[in_test & keep] = "test"
        pool = in_tv & keep
        order = _patient_permutation(df.loc[pool, "patient"].to_numpy(), seed)
        val_patients = set(order[: _take(len(order), val_fraction)])
        is_val = df["patient"].isin(val_patients).to_numpy()
        split[pool & is_val] = "val"
        split[pool & ~is_val] = "train"
    else:
        order = _patient_permutation(df["patient"].to_numpy(), seed)
        n_test = _take(len(order), test_fraction)
        n_val = _take(len(order) - n_test, val_fraction)
        test_p, val_p = set(order[:n_test]), set(order[n_test:n_test + n_val])
        patients = df["patient"]
        split[:] = "train"
        split[patients.isin(val_p).to_numpy()] = "val"
        split[patients.isin(test_p).to_numpy()] = "test"
    return split, keep, official


def _read_bboxes(root: str, images: set[str], problems: list[Problem]) -> pd.DataFrame:
    """NIH's BBox list: header `Image Index,Finding Label,Bbox [x,y,w,h],,,`, floats, 'Infiltrate'."""
    url = storage.join(root, BBOX_NAME)
    cols = ["image", "finding", "x", "y", "w", "h"]
    if not storage.exists(url):
        return pd.DataFrame(columns=cols)
    text = _read_text(url, problems)
    raw = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, header=0)
    if raw.shape[1] < 6:
        raise ValueError(f"{url}: expected at least 6 columns (image, label, x, y, w, h), got {list(raw.columns)}")
    extra = raw.iloc[:, 6:]
    bad_extra = (extra != "").any(axis=1).to_numpy() if extra.shape[1] else np.zeros(len(raw), bool)
    df = raw.iloc[:, :6].copy()
    df.columns = cols
    keep = np.ones(len(df), dtype=bool)
    for c in ("x", "y", "w", "h"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    for i, r in enumerate(df.itertuples(index=False)):
        line = i + 2
        finding = labels.canonical(r.finding)
        if finding is None:
            problems.append(Problem(r.image, "unknown_bbox_label", f"{BBOX_NAME} line {line}: {r.finding!r}"))
            keep[i] = False
        elif any(np.isnan([r.x, r.y, r.w, r.h])) or r.w <= 0 or r.h <= 0 or bad_extra[i]:
            problems.append(Problem(r.image, "bad_bbox", f"{BBOX_NAME} line {line}: unusable box values"))
            keep[i] = False
        elif r.image not in images:
            problems.append(Problem(r.image, "bbox_not_in_csv", f"{BBOX_NAME} line {line}: image has no CSV row"))
            keep[i] = False
        else:
            df.iat[i, 1] = finding
    return df[keep].reset_index(drop=True)


def _scan_one(image: str, url: str) -> list[Problem]:
    """Decode an image as the shard writer will (same checks, same limits); report what it will have to convert,
    what it will quarantine, and content that is not what the file's name says."""
    from cxr.data import images

    try:
        data = storage.read_bytes(url)
        images.decode(data)
        with Image.open(io.BytesIO(data)) as im:  # the header only: its mode, for the report
            mode = im.mode
    except Exception as exc:  # noqa: BLE001 - any failure means the shard writer cannot use the file
        return [Problem(image, "unreadable_image", f"{url}: {type(exc).__name__}: {exc}")]
    found = []
    note = images.content_mismatch(url, data)
    if note is not None:
        found.append(Problem(image, "extension_mismatch", note))
    if mode in ("RGBA", "LA"):
        found.append(Problem(image, "rgba_image", f"mode {mode}; converted to 8-bit grayscale when prepared"))
    elif mode in ("I;16", "I;16B", "I;16L", "I"):
        found.append(Problem(image, "16bit_image", f"mode {mode}; rescaled to 8-bit when prepared"))
    elif mode != "L":
        found.append(Problem(image, "unusual_mode", f"mode {mode}; converted to 8-bit grayscale when prepared"))
    return found


def _scan_images(df: pd.DataFrame, workers: int, problems: list[Problem], progress: bool) -> np.ndarray:
    keep = np.ones(len(df), dtype=bool)
    todo = [(i, img, path) for i, (img, path) in enumerate(zip(df["image"], df["path"], strict=True)) if path]
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda t: (t[0], _scan_one(t[1], t[2])), todo)
        for i, found in tqdm(results, total=len(todo), desc="scan images", unit="img", disable=not progress):
            problems.extend(found)
            keep[i] = not any(p.fatal for p in found)
    return keep


def load(root: str, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
         scan_images: bool = False, workers: int = 8, progress: bool = False) -> Dataset:
    """Read and validate a dataset root; see the module docstring."""
    root = root.rstrip("/") if "://" in root else root
    csv_name = _find_csv(root)
    problems: list[Problem] = []
    df = _read_data_entry(storage.join(root, csv_name), problems)
    rows_read = len(df)

    keep = _check_rows(df, problems)
    y, labels_ok = _label_matrix(df, problems)
    keep &= labels_ok
    for j, name in enumerate(labels.FINDINGS):
        df[name] = y[:, j]

    located = _locate_images(root)
    images_present = bool(located)
    df["path"] = [located.get(name, "") for name in df["image"]]
    if images_present:
        for i in np.flatnonzero(keep & (df["path"] == "").to_numpy()):
            problems.append(Problem(df["image"].iat[i], "missing_image",
                                    f"row {df['row'].iat[i]}: no file in images/ or images_0NN/images/"))
            keep[i] = False
        in_csv = set(df["image"])
        for image in sorted(set(located) - in_csv):
            problems.append(Problem(image, "image_not_in_csv", f"{located[image]} has no row in {csv_name}"))
    if scan_images and images_present:
        keep &= _scan_images(df, workers, problems, progress)

    split, split_keep, official = _assign_splits(
        df[keep].reset_index(drop=True), root, seed, val_fraction, test_fraction, problems, set(df["image"]))
    table = df[keep].reset_index(drop=True)
    table["split"] = split
    table = table[split_keep].reset_index(drop=True)
    _assert_disjoint(table)
    bboxes = _read_bboxes(root, set(df["image"]), problems)
    return Dataset(root=root, csv_name=csv_name, rows_read=rows_read, table=table, bboxes=bboxes,
                   problems=problems, images_present=images_present, official_split=official)


def _assert_disjoint(table: pd.DataFrame) -> None:
    per_patient = table.groupby("patient")["split"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        raise AssertionError(f"patients in more than one split: {list(leaked.index[:10])}")


def _label_counts(frame: pd.DataFrame) -> dict[str, int]:
    counts = {name: int(frame[name].sum()) for name in labels.FINDINGS}
    counts[labels.NO_FINDING] = int((frame[list(labels.FINDINGS)].sum(axis=1) == 0).sum())
    return counts


def patient_overlap(table: pd.DataFrame) -> int:
    """Number of patients that appear in more than one split (0 by construction)."""
    return int((table.groupby("patient")["split"].nunique() > 1).sum())


def summary(ds: Dataset) -> dict:
    """The facts `cxr inspect` reports, as plain JSON-able data."""
    t = ds.table
    bbox_per = Counter(ds.bboxes["finding"]) if len(ds.bboxes) else Counter()
    return {
        "root": ds.root,
        "csv": ds.csv_name,
        "rows": ds.rows_read,
        "usable_rows": len(t),
        "excluded_rows": ds.rows_read - len(t),
        "patients": int(t["patient"].nunique()),
        "images_present": ds.images_present,
        "official_split": ds.official_split,
        "label_counts": _label_counts(t),
        "view_positions": {k: int(v) for k, v in t["view"].value_counts().sort_index().items()},
        "splits": {
            name: {"images": len(part), "patients": int(part["patient"].nunique()),
                   "label_counts": _label_counts(part)}
            for name in SPLITS
            for part in [ds.split(name)]
        },
        "patient_overlap": patient_overlap(t),
        "bboxes": {"total": len(ds.bboxes),
                   "images": int(ds.bboxes["image"].nunique()) if len(ds.bboxes) else 0,
                   "per_finding": {name: int(bbox_per.get(name, 0)) for name in labels.FINDINGS}},
        "problem_counts": dict(sorted(Counter(p.kind for p in ds.problems).items())),
        "problems": [asdict(p) for p in ds.problems],
    }
