"""Connecting to Ray: the cluster a job was submitted to, or a local one bound to loopback."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the job's cluster when there is one (RAY_ADDRESS, as `ray job submit` sets); else start one here.

    A local cluster listens on 127.0.0.1 only. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray's TF backend
    from writing the host's interface address into TF_CONFIG.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):  # a cluster node's environment is the pod's: never force single-node Ray here
        ray.init(log_to_driver=True)
        log.info("joined Ray cluster at %s", os.environ["RAY_ADDRESS"])
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(_node_ip_address="127.0.0.1", num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=True, runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                              "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}})
        log.info("started a local Ray on 127.0.0.1 with %s CPUs", ray.cluster_resources().get("CPU"))
