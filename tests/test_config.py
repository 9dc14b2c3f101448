"""Config files and `key=value` overrides: validated, typed like YAML, errors naming the key."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import fsspec
import pytest
import yaml

from cxr import config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
MINIMAL = {"data": {"manifest_uri": "demo-out/shards/manifest.json"}}


def write(tmp_path, raw) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return str(path)


@pytest.mark.parametrize("name", ["demo", "chexnet", "seed-mobilenet"])
def test_shipped_configs_are_valid(name):
    cfg = config.load(os.path.join(CONFIGS, f"{name}.yaml"))
    assert cfg.data.manifest_uri.endswith("manifest.json")


def test_chexnet_and_demo_settings():
    chexnet = config.load(os.path.join(CONFIGS, "chexnet.yaml"))
    assert (chexnet.model.name, chexnet.data.image_size, chexnet.optim.batch_size) == ("densenet121", 224, 16)
    assert (chexnet.optim.lr, chexnet.optim.plateau_factor, chexnet.optim.plateau_patience) == (1e-3, 0.1, 1)
    assert chexnet.scaling.use_gpu and chexnet.scaling.precision == "mixed_float16"
    demo = config.load(os.path.join(CONFIGS, "demo.yaml"))
    assert (demo.model.name, demo.data.image_size, demo.scaling.num_workers) == ("small_cnn", 128, 2)
    assert not demo.scaling.use_gpu
    seed = config.load(os.path.join(CONFIGS, "seed-mobilenet.yaml"))
    assert (seed.model.name, seed.data.image_size) == ("mobilenet_v2", 128)


def test_model_names_come_from_the_registry(tmp_path):
    from cxr.models import MODEL_NAMES

    for name in MODEL_NAMES:
        assert config.load(write(tmp_path, MINIMAL), [f"model.name={name}"]).model.name == name
    with pytest.raises(config.ConfigError, match=r"model.name: .*unknown model 'resnet50'; choose one of small_cnn, "
                                                 r"mobilenet_v2, densenet121, efficientnet_b0"):
        config.load(write(tmp_path, MINIMAL), ["model.name=resnet50"])


def test_overrides_are_typed_like_yaml_scalars(tmp_path):
    cfg = config.load(write(tmp_path, MINIMAL), [
        "optim.lr=3e-4", "scaling.num_workers=4", "scaling.use_gpu=true", "model.weights=null",
        "run.name=2024", "scaling.resources_per_worker={CPU: 2, GPU: 1}", "optim.early_stopping_patience=5",
        "data.augment.hflip=false",
    ])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.scaling.num_workers == 4 and cfg.scaling.use_gpu is True
    assert cfg.model.weights is None and cfg.run.name == "2024"
    assert cfg.scaling.resources_per_worker == {"CPU": 2.0, "GPU": 1.0}
    assert cfg.optim.early_stopping_patience == 5 and cfg.data.augment.hflip is False


def test_unknown_keys_are_named_with_a_suggestion(tmp_path):
    with pytest.raises(config.ConfigError, match=r"optim\.lrr: unknown key \(did you mean optim\.lr\?\)"):
        config.load(write(tmp_path, MINIMAL), ["optim.lrr=1e-3"])
    raw = {**MINIMAL, "scaling": {"num_worker": 2}}
    with pytest.raises(config.ConfigError, match=r"scaling\.num_worker: unknown key"):
        config.load(write(tmp_path, raw))
    with pytest.raises(config.ConfigError, match=r"optimiser: unknown key"):
        config.load(write(tmp_path, MINIMAL), ["optimiser.lr=1"])


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=fast", "optim.lr"),
    ("scaling.num_workers=two", "scaling.num_workers"),
    ("scaling.num_workers=0", "scaling.num_workers"),
    ("scaling.precision=fp8", "scaling.precision"),
    ("model.name=resnet", "model.name"),
    ("model.dropout=1.0", "model.dropout"),
    ("data.image_size=16", "data.image_size"),
])
def test_bad_values_name_the_key(tmp_path, override, key):
    with pytest.raises(config.ConfigError) as err:
        config.load(write(tmp_path, MINIMAL), [override])
    assert f"{key}: " in str(err.value)


def test_malformed_overrides_and_files(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(config.ConfigError, match="expected section.key=value"):
        config.load(path, ["optim.lr"])
    with pytest.raises(config.ConfigError, match="optim.lr is not a section"):
        config.apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr.x=1"])
    with pytest.raises(config.ConfigError, match="data: required but missing"):
        config.load(write(tmp_path, {"model": {"name": "small_cnn"}}))
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(write(tmp_path, "data: [unclosed"))
    secret = f"memory://reader:s3cr3t@{tmp_path.name}/bad.yaml"  # a URL's credentials never reach the message
    with fsspec.open(secret, "w") as fh:
        fh.write("data: [unclosed")
    with pytest.raises(config.ConfigError, match="not valid YAML") as bad:
        config.load(secret)
    assert "s3cr3t" not in str(bad.value) and "***@" in str(bad.value)
    with pytest.raises(config.ConfigError, match="top level must be a mapping"):
        config.load(write(tmp_path, "- a\n- b\n"))


def test_precision_default_follows_the_device(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert config.load(path, ["scaling.use_gpu=true"]).scaling.precision == "mixed_float16"
    assert config.load(path).scaling.precision == config.CPU_PRECISION
    assert config.load(path, ["scaling.precision=float32"]).scaling.precision == "float32"


def test_resolved_yaml_round_trips(tmp_path):
    cfg = config.load(write(tmp_path, MINIMAL), ["optim.lr=3e-4"])
    out = str(tmp_path / "out" / "resolved.yaml")
    config.write_resolved(cfg, out)
    again = config.load(out)
    assert again == cfg
    assert "precision: " + config.CPU_PRECISION in open(out).read()  # defaults are written out


@pytest.mark.parametrize("tracking_uri, expected", [
    ("sqlite:///demo-out/mlflow.db", "sqlite:///{cwd}/demo-out/mlflow.db"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("mlruns", "{cwd}/mlruns"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    (None, None),
])
def test_local_paths_become_the_drivers(tmp_path, monkeypatch, tracking_uri, expected):
    """Ray workers (and rank 0, which logs to MLflow) run elsewhere: relative paths must mean the driver's."""
    monkeypatch.chdir(tmp_path)
    cfg = config.with_absolute_paths(config.load(write(tmp_path, MINIMAL), [
        f"tracking.tracking_uri={'null' if tracking_uri is None else tracking_uri}", "run.storage_path=runs",
        "model.weights=s3://bucket/w.h5"]))
    assert cfg.tracking.tracking_uri == (expected and expected.format(cwd=tmp_path))
    assert cfg.data.manifest_uri == f"{tmp_path}/demo-out/shards/manifest.json"
    assert cfg.run.storage_path == f"{tmp_path}/runs" and cfg.model.weights == "s3://bucket/w.h5"


@pytest.mark.parametrize("weights, expected", [
    ("models:/nih@champion", "models:/nih@champion"), ("runs:/0123/model", "runs:/0123/model"),
    ("ckpt/checkpoint_000002", "{cwd}/ckpt/checkpoint_000002")])
def test_a_model_uri_to_fine_tune_is_no_local_path(tmp_path, monkeypatch, weights, expected):
    """`model.weights=models:/NAME@champion` (fine-tuning a registered model) stays the URI it names."""
    monkeypatch.chdir(tmp_path)
    cfg = config.with_absolute_paths(config.load(write(tmp_path, MINIMAL), [f"model.weights={weights}"]))
    assert cfg.model.weights == expected.format(cwd=tmp_path)


def test_overrides_may_follow_options_and_anything_else_is_refused(capsys):
    from cxr.cli import parse

    args = parse(["retrain", "--config", "c.yaml", "optim.lr=1e-4", "--slot", "2026-12-01", "optim.epochs=4"])
    assert args.slot == "2026-12-01" and args.overrides == ["optim.lr=1e-4", "optim.epochs=4"]
    for argv in (["retrain", "--config", "c.yaml", "--slot", "s", "--bogus"],
                 ["retrain", "--config", "c.yaml", "a=1", "--slot", "s", "stray"],
                 ["inspect", "root", "optim.epochs=4"]):  # inspect takes no overrides
        with pytest.raises(SystemExit) as exit_:
            parse(argv)
        assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_every_option_of_every_command_says_what_it_does_and_its_default():
    from cxr import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert len(commands) >= 9
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.dest == "verbose":
                continue
            assert action.help, f"cxr {name} {action.option_strings or action.dest}: no help text"
            shown = sub._get_formatter()._get_help_string(action)
            if action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in shown, f"cxr {name} {action.option_strings}: default {action.default!r} unsaid"
        assert "(default: None)" not in text and "(default: False)" not in text, f"cxr {name}"


# ------------------------------------------------------------------ the reference and `cxr config --show`

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "configuration.md")


def _cxr(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_the_configuration_reference_is_the_schemas():
    with open(DOC) as fh:
        doc = fh.read()
    assert doc == config.reference(), f"docs/configuration.md is not the schema's: regenerate it with " \
                                      f"`{config.REFERENCE_COMMAND}`"


def test_the_reference_gives_every_key_a_type_its_default_and_a_meaning():
    """Checked against a validated config, not against the walk that wrote the reference."""
    rows = {}
    for line in config.reference().splitlines():
        if line.startswith("| `"):
            key, kind, default, meaning = (cell.strip() for cell in line.strip().strip("|").split(" | "))
            rows[key.strip("`")] = (kind, default, meaning)

    def leaves(node: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in node.items():
            nested = isinstance(value, dict) and key != "resources_per_worker"
            out.update(leaves(value, f"{prefix}{key}.") if nested else {f"{prefix}{key}": value})
        return out

    resolved = leaves(config.validate(MINIMAL).model_dump(mode="json"))
    assert set(rows) == set(resolved)
    for key, value in resolved.items():
        kind, default, meaning = rows[key]
        assert kind and len(meaning) > 10, key
        if key not in ("data.manifest_uri", "scaling.precision"):  # given by MINIMAL; chosen by the device
            assert default == f"`{json.dumps(value)}`", key


def test_config_show_resolves_a_file_and_overrides_and_names_a_bad_key(tmp_path):
    path = write(tmp_path, MINIMAL)
    shown = _cxr(tmp_path, "config", "--show", "--config", path, "optim.lr=3e-4", "run.name=x")
    assert shown.returncode == 0, shown.stderr
    resolved = yaml.safe_load(shown.stdout)
    assert (resolved["optim"]["lr"], resolved["run"]["name"]) == (3e-4, "x")
    assert resolved["data"]["manifest_uri"] == f"{tmp_path}/demo-out/shards/manifest.json"  # as cxr train has it
    assert resolved["scaling"]["precision"] == config.CPU_PRECISION and config.validate(resolved)
    bad = _cxr(tmp_path, "config", "--show", "--config", path, "optim.lrr=1")
    assert bad.returncode == 2 and "optim.lrr: unknown key (did you mean optim.lr?)" in bad.stderr, bad.stderr
    gone = _cxr(tmp_path, "train", "--config", "configs/nope.yaml")  # was: "configs/nope.yaml: no such object"
    assert gone.returncode == 2 and "cxr train: error: no such file: configs/nope.yaml" in gone.stderr, gone.stderr
    assert _cxr(tmp_path, "config", "--doc").stdout == config.reference()  # the command the reference names


def test_train_help_points_at_the_reference(capsys):
    from cxr.cli import parse

    with pytest.raises(SystemExit):
        parse(["train", "-h"])
    assert "docs/configuration.md" in " ".join(capsys.readouterr().out.split())
