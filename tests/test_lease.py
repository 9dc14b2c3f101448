"""One retraining round per slot at a time: the slot lease, across real processes, on a local path and on S3.

A holder process runs `cxr.retrain.retrain` with its round's work replaced by a wait (so that it holds the
lease as long as the test needs, without training); the second round is the real `cxr retrain` command.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, quiet_env

from cxr import lease as leasemod
from cxr.retrain import resolve_slot

SLOT = "2026-12-06"
TICK = int(datetime.datetime(2026, 12, 6, 2, 0, tzinfo=datetime.UTC).timestamp()) // 60  # KubeRay: Unix()/60
TIMING = {"CXR_LEASE_TTL_S": "4", "CXR_LEASE_HEARTBEAT_S": "0.5"}

# The first round: retrain() exactly as `cxr retrain` calls it, with the work of the round replaced by a wait
# for the file STOP (after writing STARTED into its run directory).
HOLDER = """
import os, sys, time
from cxr import config, retrain
storage, slot, started, stop, config_path = sys.argv[1:6]

def round_(cfg, slot, name, prepare, params):
    os.makedirs(os.path.join(storage, name), exist_ok=True)
    with open(os.path.join(storage, name, "work"), "w") as fh:
        fh.write("first round")
    open(started, "w").close()
    while not os.path.exists(stop):
        time.sleep(0.05)
    return retrain.Outcome(slot, "promoted", f"retrain {slot}: promoted (stand-in)")

retrain._round = round_
cfg = config.load(config_path, [f"run.storage_path={storage}", "run.name=weekly"])
outcome = retrain.retrain(cfg, slot=slot)
print(outcome.line, flush=True)
sys.exit(outcome.exit_code)
"""


def _holder(storage: str, slot: str, tmp_path, name: str = "a") -> tuple[subprocess.Popen, str, str]:
    started, stop = str(tmp_path / f"{name}.started"), str(tmp_path / f"{name}.stop")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, storage, slot, started, stop,
                             os.path.join(ROOT, "configs", "demo.yaml")], cwd=tmp_path,
                            env=quiet_env(**TIMING), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(started):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the first round never started"
        time.sleep(0.05)
    return proc, started, stop


def _cli_retrain(storage: str, slot: str, tmp_path) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "cxr.cli", "retrain", "--config",
                          os.path.join(ROOT, "configs", "demo.yaml"), "--slot", slot, f"run.storage_path={storage}",
                          "run.name=weekly", f"tracking.tracking_uri={tmp_path / 'mlruns'}"],
                         cwd=tmp_path, env=quiet_env(**TIMING), capture_output=True, text=True, timeout=120)
    return out, time.monotonic() - t0


def _lease(storage: str) -> dict:
    with open(leasemod.lease_url(storage, f"weekly-{SLOT}")) as fh:
        return json.load(fh)


def test_a_second_round_of_a_running_slot_exits_and_leaves_the_first_alone(tmp_path):
    storage = str(tmp_path / "runs")
    # The first round is started by a RayCronJob (its RayJob's name carries the tick), the second by hand.
    first, _, stop = _holder(storage, f"cxr-retrain-weekly-{TICK}", tmp_path)
    try:
        held = _lease(storage)
        assert held["slot"] == SLOT and held["holder"]["pid"] == first.pid
        out, took = _cli_retrain(storage, SLOT, tmp_path)
        line = out.stdout.strip().splitlines()[-1]
        assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
        assert line.startswith(f"retrain {SLOT}: slot {SLOT} is already running (held by pid {first.pid} "), line
        assert line.endswith("this round did nothing"), line
        assert took < 30, f"a live holder must be refused at once, not after {took:.1f} s"
        # The first round is untouched: its lease, renewed meanwhile, and its work.
        time.sleep(1.2)
        now = _lease(storage)
        assert now["token"] == held["token"] and now["renewed_at"] > held["renewed_at"]
        with open(os.path.join(storage, f"weekly-{SLOT}", "work")) as fh:
            assert fh.read() == "first round"
        assert first.poll() is None
        assert not os.path.exists(tmp_path / "mlruns"), "the refused round reached MLflow"
    finally:
        open(stop, "w").close()
        output = first.communicate(timeout=60)[0]
    assert first.returncode == 0 and f"retrain {SLOT}: promoted (stand-in)" in output, output[-3000:]
    assert not os.path.exists(leasemod.lease_url(storage, f"weekly-{SLOT}")), "the lease outlived its round"


def test_a_dead_holder_never_blocks_the_schedule(tmp_path):
    storage = str(tmp_path / "runs")
    url = leasemod.lease_url(storage, f"weekly-{SLOT}")
    dead, _, _ = _holder(storage, SLOT, tmp_path, "dead")
    dead.send_signal(signal.SIGKILL)  # a driver killed with its node: no release
    dead.communicate(timeout=30)
    assert os.path.exists(url)

    # Its holder ran on this host and is gone: the next round takes the lease at once.
    t0 = time.monotonic()
    second, _, stop = _holder(storage, SLOT, tmp_path, "second")
    assert time.monotonic() - t0 < 30
    open(stop, "w").close()
    output = second.communicate(timeout=60)[0]
    assert second.returncode == 0 and "taking over a stale lease (held by pid" in output, output[-3000:]

    # A holder on another pod that went silent (a KubeRay retry starts on a new cluster): the next round waits
    # for the lease to expire (TTL 4 s after its last renewal), then takes it over.
    renewed = time.time() - 2.0
    with open(url, "w") as fh:
        json.dump({"token": "other", "slot": SLOT, "renewed_at": renewed, "ttl_s": 4.0, "heartbeat_s": 0.5,
                   "holder": {"host": "cxr-retrain-weekly-29900000-head-x2l4v", "pid": 1}}, fh)
    third, _, stop = _holder(storage, SLOT, tmp_path, "third")
    waited = time.time() - renewed
    open(stop, "w").close()
    output = third.communicate(timeout=60)[0]
    assert third.returncode == 0 and "taking over a stale lease" in output, output[-3000:]
    assert 4.0 <= waited < 30, f"took over {waited:.1f} s after the last renewal, TTL is 4 s"


def test_a_round_whose_lease_was_taken_over_stops(tmp_path):
    """A holder that could not renew in time (its lease expired and another round took it over) learns so at its
    next renewal and stops its round: exit 1, "failed (LeaseLost: ...)", the successor's lease untouched."""
    storage = str(tmp_path / "runs")
    url = leasemod.lease_url(storage, f"weekly-{SLOT}")
    first, _, stop = _holder(storage, SLOT, tmp_path)
    try:
        taken = {**_lease(storage), "token": "successor", "renewed_at": time.time()}
        with open(url + ".tmp", "w") as fh:
            json.dump(taken, fh)
        os.replace(url + ".tmp", url)  # what a successor's take-over leaves (as one atomic replace)
        output = first.communicate(timeout=30)[0]
    finally:
        open(stop, "w").close()
        if first.poll() is None:
            first.kill()
    line = output.strip().splitlines()[-1]
    assert first.returncode == 1, output[-3000:]
    assert line.startswith(f"retrain {SLOT}: failed (LeaseLost: slot {SLOT}: "), output[-3000:]
    assert _lease(storage)["token"] == "successor", "the stopped round released its successor's lease"


def test_the_lease_is_compare_and_set_on_s3(s3, monkeypatch):
    """Two leases on SeaweedFS: the second is refused; once the first is silent past its TTL the second takes
    over, and the first, renewing late, learns it lost the slot."""
    monkeypatch.setenv("CXR_LEASE_TTL_S", "2")
    monkeypatch.setenv("CXR_LEASE_HEARTBEAT_S", "0.5")
    url = s3.url("runs/.leases/weekly-2026-12-06.json")
    first = leasemod.SlotLease(url, SLOT)
    first.acquire()
    second = leasemod.SlotLease(url, SLOT)
    with pytest.raises(leasemod.SlotBusy, match=f"slot {SLOT} is already running"):
        second.acquire()
    first.renew()
    time.sleep(2.2)  # the first stops renewing: expired
    second.acquire()
    with pytest.raises(leasemod.LeaseLost):
        first.renew()
    assert json.loads(s3.client().get_object(Bucket=s3.bucket, Key="runs/.leases/weekly-2026-12-06.json")["Body"]
                      .read())["token"] == second.token
    with second:
        pass
    third = leasemod.SlotLease(url, SLOT)
    third.acquire()  # released: free at once
    with third:
        pass


def test_slot_of_a_scheduled_rayjobs_name() -> None:
    assert resolve_slot(SLOT) == SLOT
    assert resolve_slot(f"cxr-retrain-{SLOT}") == SLOT  # the CronJob's RayJob
    assert resolve_slot(f"cxr-retrain-weekly-{TICK}") == SLOT  # the RayCronJob's RayJob (KubeRay's name formula)
    assert resolve_slot(f"cxr-retrain-weekly-{TICK + 22 * 60 - 1}") == SLOT  # 23:59 UTC: still that day
    assert resolve_slot(None, datetime.datetime(2026, 12, 6, 23, 59, tzinfo=datetime.UTC)) == SLOT
    for bad in ("cxr-retrain", "cxr-retrain-2026-13-01", "cxr-retrain-7", "next sunday"):
        with pytest.raises(ValueError, match="slot"):
            resolve_slot(bad)
