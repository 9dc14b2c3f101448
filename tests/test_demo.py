"""`make demo`'s recipe, run as the Makefile says: synth → prepare → train --promote → evaluate → explain, and
what its users are told to look at. On the phantoms, whose lesion boxes are known exactly, the
demo model's Grad-CAM boxes must localize better than a fixed centred box at T(IoBB) = 0.5."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, user_env

pytestmark = pytest.mark.slow


def demo_recipe() -> tuple[list[list[str]], int]:
    """The `demo:` target's cxr commands (the venv's cxr as `python -m cxr.cli`, configs/ from the repo) and the
    number of lines make itself prints (each command, each echo)."""
    text = open(os.path.join(ROOT, "Makefile")).read()
    body = re.search(r"^demo:.*\n((?:\t.*\n)+)", text, re.M)
    assert body, "Makefile has no demo target"
    commands, recipe = [], body.group(1).splitlines()
    for line in recipe:
        line = line.strip().replace("$(DEMO)", "demo-out")
        if not line.startswith("$(VENV)/bin/cxr "):
            continue
        argv = [a if not a.startswith("configs/") else os.path.join(ROOT, a) for a in shlex.split(line)[1:]]
        commands.append([sys.executable, "-m", "cxr.cli", *argv])
    return commands, len(recipe)


def test_the_demo_trains_registers_evaluates_and_localizes_better_than_a_centred_box(tmp_path):
    commands, made = demo_recipe()
    assert [c[3] for c in commands] == ["synth", "prepare", "train", "evaluate", "explain"]
    lines = {}
    for argv in commands:
        raw = subprocess.run(argv, cwd=tmp_path, env=user_env(), capture_output=True, timeout=1200)
        # Bytes: a progress bar redraws its line with \r, which text mode would turn into line breaks.
        lines[argv[3]] = raw.stdout.count(b"\n") + raw.stderr.count(b"\n")
        out = subprocess.CompletedProcess(argv, raw.returncode, raw.stdout.decode(), raw.stderr.decode())
        assert out.returncode == 0, f"{argv[3]}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        assert "WARNING" not in out.stderr, f"{argv[3]} warned:\n{out.stderr[-3000:]}"
        if argv[3] == "train":
            assert "decision: PROMOTED" in out.stdout, out.stdout[-3000:]

    demo = tmp_path / "demo-out"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{demo}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("cxr-demo").experiment_id])
    p = run.data.params
    assert p["optim.lr_schedule"] == "cosine"
    epochs, peak, floor = int(p["optim.epochs"]), float(p["optim.lr"]), float(p["optim.min_lr"])
    lrs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "epoch/train/lr"), key=lambda m: m.step)]
    assert lrs == pytest.approx([floor + (peak - floor) * (1 + math.cos(math.pi * e / epochs)) / 2
                                 for e in range(epochs)], rel=1e-9)  # each epoch trained at its cosine rate
    assert run.data.tags["cxr.data.synthetic"] == "true"  # `cxr predict` warns of a model trained on phantoms
    assert run.data.metrics["best_val_auroc_mean"] >= 0.94  # the goal is 0.96; docs/benchmarks.md has the seeds
    report = json.loads((demo / "report" / "report.json").read_text())
    assert report["model"]["registered"]["name"] == "cxr-demo"
    assert report["auroc"]["mean"]["low"] <= report["auroc"]["mean"]["auroc"] <= report["auroc"]["mean"]["high"]
    for figure in ("roc.png", "pr.png", "reliability.png"):
        assert (demo / "report" / figure).stat().st_size > 10_000

    loc = json.loads((demo / "explain" / "localization.json").read_text())
    ours = loc["model_scores"]["IoBB"]["0.5"]["acc"]["mean"]
    centred = loc["centred_box"]["IoBB"]["0.5"]["acc"]["mean"]
    assert ours > centred, (ours, centred)
    assert loc["data"]["errors"] == 0 and loc["data"]["images"] > 50
    assert sorted(p.name for p in (demo / "explain" / "sheets").iterdir())  # contact sheets to look at
    printed = made + sum(lines.values())
    # 78 before scoring moved to the workers; test scoring and evaluate show a progress bar (one line each once
    # done), and explain's scoring one.
    assert printed <= 84, f"the demo printed {printed} lines: make {made}, {lines}"
