# The image every Ray pod runs (head, workers, job submitters, the retrain scheduler): the cxr package, its
# jobs and configs. Tag it with the project version (pyproject.toml): REGISTRY/cxr:0.1.0. The GPU variant is
# the same image plus TensorFlow's CUDA wheels: --build-arg TF_EXTRA=and-cuda, tagged 0.1.0-gpu
# (docs/cluster.md; the overlays' `images:` name both tags).
# Base pinned by digest (the multi-arch index; a Dockerfile comment cannot share the FROM line):
# python:3.11-slim as published 2026-08-05, Python 3.11.15 on Debian trixie.
FROM python:3.11-slim@sha256:90744cff8f32887f075c47d747a173ff333e9e98801667af93c357fa9f5e28ff
ARG TF_EXTRA=""
# Never RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 here: it makes Ray single-node, so every worker pod's
# `ray start --address` would abort; cxr sets it for its own local mode only (cxr/cluster.py).
# No MALLOC_TOP_PAD_ here: cxr's raw mode sets glibc's top pad (16 MiB) in the processes that decode images
# (cxr/heap.py); image-wide it would also pad the raylet, GCS and every idle Ray worker.
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /opt/cxr
# Every install is held to requirements.lock: each runtime dependency, transitively, at the tested version.
COPY pyproject.toml README.md requirements.lock ./
COPY cxr ./cxr
RUN pip install --constraint requirements.lock . \
    && if [ -n "$TF_EXTRA" ]; then pip install --constraint requirements.lock "tensorflow[$TF_EXTRA]==2.21.*"; fi
COPY jobs ./jobs
COPY configs ./configs
# uid 1000 is the runAsUser of every cxr pod (k8s/); the pods mount emptyDirs at /tmp and at this HOME, because
# their root filesystem is read-only.
RUN groupadd --gid 1000 ray && useradd --create-home --home-dir /home/ray --uid 1000 --gid 1000 ray
ENV HOME=/home/ray
# Numeric: under runAsNonRoot the kubelet can only verify a numeric USER; a name is rejected in any pod
# that does not set runAsUser itself (KubeRay's default submitter pod, a sidecar, a debug pod).
USER 1000:1000
