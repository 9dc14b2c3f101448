# The image every Ray pod runs (head and workers): the cxr package, its jobs and configs.
# GPU nodes: build with --build-arg TF_EXTRA=and-cuda to pull TensorFlow's CUDA wheels.
FROM python:3.11-slim
ARG TF_EXTRA=""
# Never RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 here: it makes Ray single-node, so every worker pod's
# `ray start --address` would abort; cxr sets it for its own local mode only (cxr/cluster.py).
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /opt/cxr
COPY pyproject.toml README.md ./
COPY cxr ./cxr
RUN pip install . && if [ -n "$TF_EXTRA" ]; then pip install "tensorflow[$TF_EXTRA]==2.21.*"; fi
COPY jobs ./jobs
COPY configs ./configs
RUN useradd --create-home --uid 1000 ray
USER ray
