"""`cxr prepare --dataset SPEC`: label sets, uncertain labels, excluded rows and DICOM/16-bit/JPEG roots."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from test_dicom import twelve_bit, write_dicom
from test_prepare import all_records, make_root

from cxr import cli, config, labels, storage
from cxr.data import images, manifest, pipeline, raw, shards, source, spec
from cxr.data.prepare import prepare

CHEXPERT = spec.load("chexpert")[0].labels.names
CSV_FINDINGS = spec.load("csv")[0].labels.names


@pytest.fixture(scope="module", autouse=True)
def _ray_down_after():
    yield
    import ray

    ray.shutdown()


def _pixels(seed: int, size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 128 + 100 * np.sin(5 * xx + seed) * np.cos(3 * yy + 2 * seed)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def chexpert_root(root) -> dict[str, list[str]]:
    """A CheXpert-v1.0-small root (root/CheXpert-v1.0-small/{train,valid}.csv + JPEGs); returns image → cells."""
    base = root / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT]
    cells: dict[str, list[str]] = {}
    tables = {"train.csv": [], "valid.csv": []}
    rng = np.random.default_rng(1)
    for p in range(1, 15):
        part, table = ("valid", "valid.csv") if p > 10 else ("train", "train.csv")
        rel = f"{part}/patient{p:05d}/study1/view1_frontal.jpg"
        values = [rng.choice(["1.0", "0.0", "", "-1.0"]) for _ in CHEXPERT]
        frontal = "Lateral" if p == 3 else "Frontal"
        if p == 5:
            values[2] = "2.0"  # not a CheXpert code: unknown_label_value
        tables[table].append([f"CheXpert-v1.0-small/{rel}", "Female", str(40 + p), frontal, "AP", *values])
        cells[rel] = values
        if p != 7:  # patient 7's image is missing
            os.makedirs(base / os.path.dirname(rel), exist_ok=True)
            (base / rel).write_bytes(_jpeg(_pixels(p)))
    cells["valid/patient00011/study1/view1_frontal.jpg"][4] = "-1.0"  # at least one uncertain in test
    tables["valid.csv"][0][5 + 4] = "-1.0"
    for name, rows in tables.items():
        (base / name).write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return cells


def _expected(values: list[str]) -> list[int]:
    return [{"1.0": 1, "0.0": 0, "": 0, "-1.0": -1}[v] for v in values]


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory) -> tuple[str, str, dict[str, list[str]], dict]:
    base = tmp_path_factory.mktemp("chexpert")
    cells = chexpert_root(base / "root")
    out = str(base / "shards")
    summary = prepare(str(base / "root"), out, shards.Params(size=32, codec="png", images_per_shard=3),
                      num_workers=1, progress=False, dataset="chexpert")
    return str(base / "root"), out, cells, summary


def test_chexpert_root_prepares_with_its_label_set_and_uncertain_labels(chexpert):
    root, out, cells, summary = chexpert
    m = json.loads(storage.read_text(summary["manifest"]))
    assert m["labels"] == list(CHEXPERT)
    assert m["dataset"]["name"] == "chexpert" and "built-in spec chexpert" in m["dataset"]["source"]
    assert m["dataset"]["spec"] == spec.load("chexpert")[0].model_dump(mode="json")
    # Excluded rows, counted by kind in the summary and the manifest, each named by file and line.
    kinds = {"missing_image": 1, "unknown_label_value": 1, "view_filtered": 1}
    assert summary["excluded_counts"] == m["excluded_counts"] == kinds
    excluded = {e["image"]: e for e in m["excluded_by_metadata"]}
    assert excluded["CheXpert-v1.0-small/train/patient00005/study1/view1_frontal.jpg"]["line"] == 6
    assert {e["kind"] for e in excluded.values()} == set(kinds) and all(e["file"] for e in excluded.values())
    recs = all_records(out, m)
    usable = {f"CheXpert-v1.0-small/{k}": v for k, v in cells.items()
              if not any(k.startswith(f"train/patient0000{p}/") for p in (3, 5, 7))}
    assert set(recs) == set(usable) and summary["images"] == len(usable) == 11
    assert all(recs[i]["labels"] == _expected(v) for i, v in usable.items())  # -1 where the CSV had -1.0
    assert any(-1 in r["labels"] for r in recs.values())
    test = {i for i, r in recs.items() if r["split"] == "test"}
    assert test == {i for i in usable if "/valid/" in i}  # valid.csv is the official test split
    for split, info in m["splits"].items():
        mine = [r["labels"] for r in recs.values() if r["split"] == split]
        for j, name in enumerate(CHEXPERT):
            assert info["label_counts"][name] == sum(v[j] == 1 for v in mine)
            assert info["uncertain_counts"][name] == sum(v[j] == -1 for v in mine)
        # Text patient ids become stable int64 keys: in the shards, the manifest and Manifest.patient_ids.
        ids = {shards.patient_key(i.split("/")[2]) for i, r in recs.items() if r["split"] == split}
        assert {r["patient"] for r in recs.values() if r["split"] == split} == ids
        assert manifest.load(out).patient_ids(split) == sorted(ids) == info["patient_ids"]
    loaded = manifest.load(out)
    assert loaded.findings == tuple(CHEXPERT) and loaded.dataset["name"] == "chexpert"


def _labels_by_index(ds) -> dict[int, list[float]]:
    return {int(k): y.tolist() for _, ys, ks in ds for y, k in zip(ys.numpy(), ks.numpy(), strict=True)}


@pytest.mark.parametrize("policy,fill", [("ignore", -1.0), ("ones", 1.0), ("zeros", 0.0)])
def test_uncertain_policy_in_shard_and_raw_modes(chexpert, policy, fill):
    root, out, _, _ = chexpert
    m = manifest.load(out)
    stored = [r for s in m.shards("train") for r in _shard_labels(s.url)]
    shard = _labels_by_index(pipeline.make_dataset(out, "train", 4, image_size=32, uncertain=policy))
    assert shard == {k: [fill if v < 0 else float(v) for v in y] for k, y in enumerate(stored)}
    # Raw mode reads the same rows in the same order from the root itself (item k there is item k here).
    rawds = pipeline.make_raw_dataset(root, "train", 4, image_size=32, raw_size=32, dataset="chexpert",
                                      uncertain=policy)
    assert _labels_by_index(rawds) == shard
    for mode in ("shards", "raw"):
        data = config.Data(source=mode, manifest_uri=out, root=root, dataset="chexpert", uncertain=policy)
        positives, n = source.for_config(data).label_counts(data, "train")
        y = np.array(stored)
        assert n == len(stored) and positives == ((y == 1) | ((y < 0) & (policy == "ones"))).sum(axis=0).tolist()
        assert source.findings(data) == tuple(CHEXPERT)


def _shard_labels(url: str) -> list[list[int]]:
    import tensorflow as tf

    local = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cxr-spec-{os.getpid()}.tfrecord")
    with open(local, "wb") as fh:
        fh.write(storage.read_bytes(url))
    try:
        return [list(tf.train.Example.FromString(r.numpy()).features.feature["labels"].int64_list.value)
                for r in tf.data.TFRecordDataset(local)]
    finally:
        os.remove(local)


def test_a_config_naming_another_dataset_than_the_manifest_is_refused(chexpert):
    _, out, _, _ = chexpert
    data = config.Data(manifest_uri=out, dataset="nih")
    with pytest.raises(ValueError, match=r"data.dataset is 'nih' but .* prepared from dataset 'chexpert'"):
        source.findings(data)
    assert source.findings(config.Data(manifest_uri=out)) == tuple(CHEXPERT)  # unset: the manifest's


def test_csv_spec_root_of_dicom_16bit_png_and_jpeg(tmp_path):
    """A hospital export: DICOM (MONOCHROME1 among them), a 12-bit PNG and a JPEG through predict's one path."""
    root = tmp_path / "export"
    os.makedirs(root / "img")
    p = [_pixels(s) for s in range(6)]
    files = {
        "img/a.dcm": write_dicom(p[0]),
        "img/b.dcm": write_dicom(twelve_bit(p[1]), photometric="MONOCHROME1", bits_stored=12),
        "img/c.png": None,  # 16-bit words, 12 bits used
        "img/d.jpg": _jpeg(p[3]),
        "img/e.dcm": write_dicom(p[4]),
    }
    buf = io.BytesIO()
    Image.fromarray(twelve_bit(p[2])).save(buf, format="PNG")
    files["img/c.png"] = buf.getvalue()
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    header = "path,patient_id,study_id,view,sex,age,split," + ",".join(CSV_FINDINGS)
    rows = ["img/a.dcm,P1,S1,PA,F,63,train,1,0,-1,,0,0", "img/b.dcm,P2,S2,AP,male,70,train,0,1,0,0,0,1",
            "img/c.png,P3,S3,PA,M,55,val,0,0,1,0,-1,0", "img/d.jpg,P4,S4,PA,F,,test,1,1,0,0,0,0",
            "img/e.dcm,P5,S5,LL,F,50,test,0,0,0,0,0,0",  # lateral: view_filtered
            "img/gone.dcm,P6,S6,PA,F,50,train,0,0,0,0,0,0"]  # missing_image
    (root / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    out = str(tmp_path / "shards")
    s = prepare(str(root), out, shards.Params(size=48, codec="png"), num_workers=1, progress=False, dataset="csv")
    assert s["quarantined"] == 0 and s["excluded_counts"] == {"missing_image": 1, "view_filtered": 1}
    m = json.loads(storage.read_text(s["manifest"]))
    recs = all_records(out, m)
    assert set(recs) == {"img/a.dcm", "img/b.dcm", "img/c.png", "img/d.jpg"}
    assert recs["img/a.dcm"]["labels"] == [1, 0, -1, -1, 0, 0]  # blank is uncertain in the csv spec
    assert {r: recs[r]["split"] for r in recs} == {"img/a.dcm": "train", "img/b.dcm": "train", "img/c.png": "val",
                                                   "img/d.jpg": "test"}
    assert m["splits"]["train"]["uncertain_counts"]["Effusion"] == 1
    assert m["splits"]["train"]["uncertain_counts"]["Pneumothorax"] == 1
    for rel, rec in recs.items():
        stored = np.asarray(Image.open(io.BytesIO(rec["image"])))
        assert np.array_equal(stored, images.preprocess(files[rel], 48))  # predict's path, exactly
    got = {r: np.asarray(Image.open(io.BytesIO(recs[r]["image"]))).astype(int) for r in recs}
    assert np.array_equal(got["img/a.dcm"], p[0])
    assert np.abs(got["img/b.dcm"] - (255 - p[1].astype(int))).max() <= 1  # MONOCHROME1: inverted, 12 bits
    assert np.abs(got["img/c.png"] - p[2]).max() <= 1  # rescaled from 12 bits, not from 16
    assert np.abs(got["img/d.jpg"] - p[3]).max() <= 8  # JPEG q95
    # A label edited in the CSV: the re-run rewrites the shard that holds it, not keeps its stale labels.
    (root / "labels.csv").write_text("\n".join([header, rows[0].replace(",1,0,-1,,0,0", ",1,0,1,,0,0"), *rows[1:]]))
    again = prepare(str(root), out, shards.Params(size=48, codec="png"), num_workers=1, progress=False, dataset="csv")
    assert again["shards_written"] == 1 and again["shards_kept"] == 2
    assert all_records(out, json.loads(storage.read_text(again["manifest"])))["img/a.dcm"]["labels"][2] == 1


def test_nih_prepare_output_keeps_its_keys(tmp_path):
    """NIH's manifest, splits and receipts have exactly the keys they had before label sets (no dataset, no
    uncertain counts); the bytes were compared against the previous code's output when this was written."""
    root = tmp_path / "nih"
    make_root(root, n_patients=6, per_patient=2)
    s = prepare(str(root), str(tmp_path / "out"), shards.Params(size=32, images_per_shard=5), num_workers=1,
                progress=False)
    m = json.loads(storage.read_text(s["manifest"]))
    assert list(m) == ["format", "labels", "preprocessing", "source", "splits", "quarantine", "notes",
                       "excluded_by_metadata"]
    assert m["labels"] == list(labels.FINDINGS) and "excluded_counts" not in s
    for info in m["splits"].values():
        assert list(info) == ["images", "patients", "patient_ids", "label_counts", "shards"]
        assert list(info["label_counts"]) == [*labels.FINDINGS, labels.NO_FINDING]
    for name in os.listdir(tmp_path / "out" / "_parts"):
        receipt = json.loads((tmp_path / "out" / "_parts" / name).read_text())
        assert list(receipt) == ["split", "name", "records", "sha256", "bytes", "images", "patients", "label_counts",
                                 "no_finding", "quarantine", "notes", "params", "seconds"]
    loaded = manifest.load(s["manifest"])
    assert loaded.findings == labels.FINDINGS and loaded.dataset is None
    assert raw.split_rows(str(root), "train")[0][1].shape == (labels.NUM_FINDINGS,)


def test_cli_prepare_dataset_reports_excluded_rows_by_kind(chexpert, tmp_path, capsys):
    root = chexpert[0]
    assert cli.main(["prepare", root, str(tmp_path / "out"), "--dataset", "chexpert", "--size", "32",
                     "--num-workers", "1"]) == 0
    assert "excluded by metadata 3 (missing_image 1, unknown_label_value 1, view_filtered 1)" in capsys.readouterr().out


def test_config_dataset_and_uncertain_are_checked_before_anything_runs(tmp_path, monkeypatch):
    def load(*overrides: str) -> config.Config:
        return config.validate(config.apply_overrides({"data": {"manifest_uri": "m"}}, overrides))

    with pytest.raises(config.ConfigError, match=r"data.dataset: .*'chexpret' is neither a built-in dataset spec"):
        load("data.dataset=chexpret")
    with pytest.raises(config.ConfigError, match=r"data.uncertain"):
        load("data.uncertain=maybe")
    monkeypatch.chdir(tmp_path)
    cfg = config.with_absolute_paths(load("data.dataset=specs/mine.yaml"))
    assert cfg.data.dataset == str(tmp_path / "specs" / "mine.yaml")
    cfg = config.with_absolute_paths(load())
    assert cfg.data.dataset is None  # unset: the manifest's (shards) or nih (raw)
    # The resolved config travels to the workers as plain data: unset must stay unset there (it was "nih" once,
    # which the workers then read as a contradiction of a CheXpert manifest).
    assert config.validate(cfg.model_dump(mode="json")).data.dataset is None


def test_raw_mode_of_a_spec_root_matches_its_shards_patients_and_fingerprint(chexpert):
    root, out, _, summary = chexpert
    rawdata = config.Data(source="raw", root=root, dataset="chexpert")
    shard_data = config.Data(manifest_uri=out)
    for split in ("train", "test"):
        patients = source.RAW.patients(rawdata, split)
        assert patients.dtype == np.int64 and np.array_equal(patients, source.SHARDS.patients(shard_data, split))
        assert np.array_equal(source.RAW.patient_ids(rawdata, split), source.SHARDS.patient_ids(shard_data, split))
        raw_values, shard_values = source.RAW.attributes(rawdata, split), source.SHARDS.attributes(shard_data, split)
        for key in ("sex", "age", "view"):  # what subgroups group by, read either way in the same order
            np.testing.assert_array_equal(raw_values[key], shard_values[key], err_msg=key)
        assert set(shard_values["sex"]) == {"F"} and np.isin(shard_values["age"], np.arange(41, 55)).all()
    m = json.loads(storage.read_text(summary["manifest"]))
    assert source.fingerprint(rawdata) == m["source"]["fingerprint"]
    tags = source.data_tags(rawdata)  # a raw run says how to read its root again
    assert tags["cxr.data.dataset"] == "chexpert" and source.data_config(root, 32, tags).dataset == "chexpert"
    assert "cxr.data.dataset" not in source.data_tags(config.Data(source="raw", root=root))
