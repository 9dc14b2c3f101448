"""Credentials pasted into URLs never leave the process: not to disk, MLflow, Ray's logs or the terminal.

A real run: `cxr train` against a live `mlflow server` reached as http://user:password@host, with initial
weights fetched over HTTP from a presigned-style URL (X-Amz-Credential, X-Amz-Signature, token). Afterwards
every file the run, the MLflow server and Ray wrote, and every line printed, is searched for the secrets.
"""

from __future__ import annotations

import functools
import glob
import http.server
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest
from conftest import ROOT, free_port, quiet_env, tiny_run

from cxr.redact import RedactingFilter, redact


@pytest.mark.parametrize("text, expected", [
    ("http://user:pw@mlflow:5000", "http://***@mlflow:5000"),
    ("s3://AKIA:SECRET@bucket/key", "s3://***@bucket/key"),
    ("https://b.s3.amazonaws.com/w.h5?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12",
     "https://b.s3.amazonaws.com/w.h5?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***"),
    ("https://acct.blob.core.windows.net/c/w.h5?sv=2024&sig=abc%3D&se=2026", "https://acct.blob.core.windows.net/c/w.h5?sv=2024&sig=***&se=2026"),
    ("fetch http://h/x?token=t0k&page=2 failed", "fetch http://h/x?token=***&page=2 failed"),
    ("two: http://a:b@h1/ and ftp://c@h2/x", "two: http://***@h1/ and ftp://***@h2/x"),
    ("plain /data/nih/images and s3://bucket/k?versionId=3", "plain /data/nih/images and s3://bucket/k?versionId=3"),
    ("user@example.org wrote a=b", "user@example.org wrote a=b"),
])
def test_redact(text, expected):
    assert redact(text) == expected


def test_log_filter_masks_arguments_and_tracebacks():
    record = logging.LogRecord("cxr", logging.INFO, __file__, 1, "loaded %s", ("http://u:p4ss@h/x?sig=s1g",), None)
    assert RedactingFilter().filter(record) and record.getMessage() == "loaded http://***@h/x?sig=***"
    try:
        raise OSError("cannot read http://h/x?X-Amz-Signature=deadbeef")
    except OSError:
        record = logging.LogRecord("cxr", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    RedactingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "deadbeef" not in text and "X-Amz-Signature=***" in text


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the request line carries the query string: not our log to keep
        pass


def _serve(directory: str) -> tuple[http.server.ThreadingHTTPServer, int]:
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(_QuietHandler,
                                                                                   directory=directory))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, port


def _files_containing(roots: list[str], needles: list[str]) -> list[str]:
    found = []
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                try:
                    with open(path, "rb") as fh:
                        data = fh.read()
                except OSError:
                    continue
                found += [f"{path}: {n}" for n in needles if n.encode() in data or n.encode() in path.encode()]
    return found


@pytest.mark.slow
def test_no_credentials_on_disk_in_mlflow_logs_or_stdout(phantom_shards, mlflow_server, tmp_path,
                                                         tmp_path_factory):
    import keras

    from cxr.models import build_model

    password, signature, credential, token = (f"{kind}{secrets.token_hex(8)}" for kind in
                                              ("pw", "sig", "AKIA", "tok"))
    serve = tmp_path / "serve"
    serve.mkdir()
    keras.mixed_precision.set_global_policy("float32")
    build_model("small_cnn", 64, 0.1).save_weights(str(serve / "init.weights.h5"))
    server, port = _serve(str(serve))
    weights = (f"http://127.0.0.1:{port}/init.weights.h5?X-Amz-Algorithm=AWS4-HMAC-SHA256"
               f"&X-Amz-Credential={credential}%2F20261201%2Fus-east-1%2Fs3%2Faws4_request"
               f"&X-Amz-Signature={signature}&token={token}")
    tracking = mlflow_server.replace("http://", f"http://cxr-user:{password}@")
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    work = tmp_path / "cwd"
    work.mkdir()
    try:
        cmd = [sys.executable, "-m", "cxr.cli", "train", "--config", os.path.join(ROOT, "configs", "demo.yaml"),
               *tiny_run(phantom_shards, str(tmp_path / "runs"), "secretive", tracking, epochs=1),
               f"model.weights={weights}"]
        out = subprocess.run(cmd, cwd=work, env=quiet_env(RAY_TMPDIR=ray_tmp), capture_output=True, text=True,
                             timeout=600)
        printed = out.stdout + out.stderr
        assert out.returncode == 0, printed[-4000:]
        assert f"loaded model weights from http://127.0.0.1:{port}/init.weights.h5?" in printed  # it was used
        needles = [password, signature, credential, token]
        assert not [n for n in needles if n in printed], printed[-4000:]
        mlflow_base = glob.glob(str(tmp_path_factory.getbasetemp() / "mlflow*"))
        leaks = _files_containing([str(tmp_path), ray_tmp, *mlflow_base], needles)
        assert not leaks, leaks[:20]

        from mlflow.tracking import MlflowClient

        client = MlflowClient(mlflow_server)
        run = client.search_runs([client.get_experiment_by_name("cxr-tests").experiment_id],
                                 filter_string="tags.`mlflow.runName` = 'secretive'")[0]
        assert run.data.params["model.weights"].startswith(f"http://127.0.0.1:{port}/init.weights.h5?")
        assert "X-Amz-Signature=***" in run.data.params["model.weights"]
        assert run.data.params["tracking.tracking_uri"] == mlflow_server.replace("http://", "http://***@")
    finally:
        server.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
