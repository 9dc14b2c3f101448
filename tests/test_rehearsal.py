"""Scheduled retraining rehearsed on a real two-node Ray cluster with token auth, S3 and an MLflow server.

The scenario runs in tests/rehearsal.py inside private network and pid namespaces (every socket on 127.0.0.1,
only this cluster's processes in sight); this test checks what it recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, VENV_BIN

pytestmark = pytest.mark.slow


def test_scheduled_retraining_on_a_two_node_cluster(tmp_path):
    work, result_path = tmp_path / "work", tmp_path / "result.json"
    work.mkdir()
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(["unshare", "--net", "--pid", "--fork", "--mount-proc", sys.executable,
                             os.path.join(ROOT, "tests", "rehearsal.py"), str(work), str(result_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the namespace's init, and with it everything inside
        out, _ = proc.communicate()
        pytest.fail(f"the rehearsal did not finish in 15 minutes:\n{out[-6000:]}")
    assert proc.returncode == 0, out[-6000:]
    r = json.loads(result_path.read_text())
    print("\n".join(f"{t:7.1f} s  {what}" for t, what in r["events"]))  # the timeline, kept in the test log

    assert r["unauthenticated"] == 401  # the job API refuses requests without the token
    first, second, again = r["first"], r["second"], r["again"]
    assert first["status"] == "SUCCEEDED", first["logs"][-4000:]
    assert "retrain 2026-11-24: promoted" in first["logs"] and "the first registered model becomes champion" in \
        first["logs"]
    assert second["status"] == "SUCCEEDED", second["logs"][-4000:]
    assert "retrain 2026-12-01: kept champion" in second["logs"], second["logs"][-3000:]
    assert len(r["second_resumes"]) == 1 and r["second_resumes"][0] >= 1  # resumed from a checkpoint on S3
    assert again["status"] == "SUCCEEDED" and "retrain 2026-11-24: already done" in again["logs"]

    versions = r["versions"]
    assert [v["version"] for v in versions] == ["1", "2"]  # one per slot: the re-submitted slot added none
    assert versions[0]["aliases"] == ["champion"] and versions[1]["aliases"] == []
    assert versions[1]["tags"]["cxr.decision"] == "kept champion"
    assert float(versions[1]["tags"]["cxr.decision.ci_low"]) <= 0.0  # the rule: kept unless the gain is sure
    assert versions[1]["tags"]["cxr.decision.champion_version"] == "1"
    runs = r["runs"]
    assert set(runs) == {"weekly-2026-11-24", "weekly-2026-12-01"}
    for name, run in runs.items():
        assert run["status"] == "FINISHED", name
        assert run["tags"]["cxr.cluster.nodes"] == "2", name  # the cluster had both nodes at the start
    # Ray Train's workers ran on both nodes; in the second slot also on the replacement of the killed one.
    assert runs["weekly-2026-11-24"]["tags"]["cxr.cluster.train_nodes"] == "2"
    assert runs["weekly-2026-12-01"]["tags"]["cxr.cluster.train_nodes"] == "3"
    for run in runs.values():
        assert run["tags"]["cxr.data"].startswith("s3://") and run["tags"]["cxr.data.source"] == "shards"


def test_the_rehearsal_refuses_to_run_outside_its_namespaces(tmp_path):
    """Outside them its cluster's fixed ports and its clean-up would meet other people's processes."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "rehearsal.py"), str(tmp_path / "work"),
                          str(tmp_path / "result.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "unshare --net --pid --fork --mount-proc" in out.stderr, out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written
