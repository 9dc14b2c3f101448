"""The retrain CronJob's pod: start this slot's retraining RayJob from the suspended template and follow it.

The slot is the UTC date (or $CXR_SLOT): the RayJob is named cxr-retrain-SLOT and its entrypoint gets the slot
literally, so every retry of that RayJob, and a re-run of the CronJob the same day, works on the same run; only
then may it retry (--backoff-limit). The template cleans up with shutdownAfterJobFinishes (KubeRay refuses a
suspended RayJob without it); the round gets deletionRules instead: its cluster goes after the template's
ttlSecondsAfterFinished, the RayJob itself (with its submitter Job) after --keep-days. If the slot's RayJob
already exists it is followed, not created again; if another round is still active, this scheduler's or the
RayCronJob's (whose RayJobs carry only the label ray.io/cronjob-name), the slot is skipped. The exit status is
the round's: 0 when its Ray job succeeded. Standard library only: it runs in a small Python image with the
pod's ServiceAccount token (Role: create, get, list rayjobs).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
SLOT_PLACEHOLDER = '"$(date -u +%F)"'  # what the template's entrypoint passes to --slot
TERMINAL = {"Complete", "Failed", "ValidationFailed"}
TEMPLATE_LABEL = "cxr.io/template"
ROUND_LABEL = ("cxr.io/job", "retrain")  # the template's and so every round's this scheduler creates
CRONJOB_LABEL = "ray.io/cronjob-name"  # the only label KubeRay's RayCronJob gives the RayJobs it creates


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


Api = Callable[[str, str, dict | None], dict]  # (method, path, body) -> response object; raises ApiError


def in_cluster_api() -> Api:
    """Requests to the API server with this pod's ServiceAccount token and CA."""
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
    base = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    context = ssl.create_default_context(cafile=f"{SERVICE_ACCOUNT}/ca.crt")

    def call(method: str, path: str, body: dict | None = None) -> dict:
        with open(f"{SERVICE_ACCOUNT}/token") as fh:  # re-read: the kubelet rotates projected tokens
            token = fh.read().strip()
        request = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                         headers={"Authorization": f"Bearer {token}", "Accept": "application/json",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, exc.read().decode(errors="replace")[:500]) from None

    return call


def slot_of(value: str | None, now: datetime.datetime | None = None) -> str:
    """The slot: `value` if given (YYYY-MM-DD), else today's UTC date."""
    if not value:
        return (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%d")
    datetime.date.fromisoformat(value)  # raises ValueError on anything but a real date
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError(f"slot {value!r} is not YYYY-MM-DD")
    return value


def rayjob_for_slot(template: dict, name: str, slot: str, backoff_limit: int = 1, keep_days: int = 14) -> dict:
    """The RayJob to create: the template's spec, not suspended, with the slot in its name and entrypoint, its
    retries, and deletion rules in place of shutdownAfterJobFinishes."""
    spec = copy.deepcopy(template["spec"])
    spec.pop("suspend", None)
    entrypoint = spec["entrypoint"]
    if entrypoint.count(SLOT_PLACEHOLDER) != 1:
        raise ValueError(f"the template's entrypoint must pass --slot {SLOT_PLACEHOLDER} once: {entrypoint!r}")
    spec["entrypoint"] = entrypoint.replace(SLOT_PLACEHOLDER, slot)
    spec["backoffLimit"] = backoff_limit  # safe now: every attempt gets the same literal slot
    if spec.pop("shutdownAfterJobFinishes", None) is not True:
        raise ValueError("the template must set shutdownAfterJobFinishes: true (a suspended RayJob needs it)")
    cluster_s, keep_s = spec.pop("ttlSecondsAfterFinished", 0), keep_days * 86400
    ended = ({"jobStatus": "SUCCEEDED"}, {"jobDeploymentStatus": "Failed"})  # every end but a Ray job stopped by hand
    spec["deletionStrategy"] = {"deletionRules": [
        {"policy": policy, "condition": {**when, "ttlSeconds": ttl}}
        for policy, ttl in (("DeleteCluster", cluster_s), ("DeleteSelf", keep_s)) for when in ended]}
    labels = {k: v for k, v in template["metadata"].get("labels", {}).items() if k != TEMPLATE_LABEL}
    labels["cxr.io/slot"] = slot
    return {"apiVersion": template["apiVersion"], "kind": template["kind"],
            "metadata": {"name": f"{name}-{slot}", "labels": labels}, "spec": spec}


def is_round(item: dict, cronjob: str) -> bool:
    """A retraining round: made by this scheduler (the template's labels) or by the RayCronJob `cronjob`."""
    labels = item["metadata"].get("labels", {})
    if TEMPLATE_LABEL in labels:
        return False
    return labels.get(ROUND_LABEL[0]) == ROUND_LABEL[1] or labels.get(CRONJOB_LABEL) == cronjob


def run(api: Api, namespace: str, template_name: str, name: str, slot: str, poll_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep, backoff_limit: int = 1, keep_days: int = 14,
        cronjob: str = "cxr-retrain-weekly") -> int:
    """Create (or find) the slot's RayJob and wait for it to finish; print one line; return the exit status."""
    rayjobs = f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
    wanted = f"{name}-{slot}"
    active = [item["metadata"]["name"] for item in api("GET", rayjobs, None)["items"]
              if item["metadata"]["name"] != wanted and is_round(item, cronjob)
              and item.get("status", {}).get("jobDeploymentStatus") not in TERMINAL]
    if active:
        print(f"{wanted}: skipped, another retraining round is still active: {', '.join(sorted(active))}")
        return 1
    template = api("GET", f"{rayjobs}/{template_name}", None)
    body = rayjob_for_slot(template, name, slot, backoff_limit, keep_days)
    try:
        api("POST", rayjobs, body)
        print(f"{wanted}: created", flush=True)
    except ApiError as exc:
        if exc.status != 409:
            raise
        print(f"{wanted}: exists already, following it", flush=True)
    while True:
        status = api("GET", f"{rayjobs}/{wanted}", None).get("status", {})
        if status.get("jobDeploymentStatus") in TERMINAL:
            break
        sleep(poll_s)
    ok = status.get("jobStatus") == "SUCCEEDED"
    detail = f" ({status['message']})" if status.get("message") else ""
    print(f"{wanted}: {status.get('jobDeploymentStatus')}, Ray job {status.get('jobStatus') or 'not run'}{detail}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", required=True, help="the suspended RayJob to copy")
    parser.add_argument("--name", required=True, help="the new RayJob's name, before -SLOT")
    parser.add_argument("--poll-seconds", type=float, default=60.0)
    parser.add_argument("--backoff-limit", type=int, default=1, help="the round's retries (each resumes the run)")
    parser.add_argument("--keep-days", type=int, default=14, help="days a finished round's RayJob is kept")
    parser.add_argument("--cronjob", default="cxr-retrain-weekly", help="the RayCronJob whose rounds count too")
    args = parser.parse_args(argv)
    with open(f"{SERVICE_ACCOUNT}/namespace") as fh:
        namespace = fh.read().strip()
    return run(in_cluster_api(), namespace, args.template, args.name, slot_of(os.environ.get("CXR_SLOT")),
               args.poll_seconds, backoff_limit=args.backoff_limit, keep_days=args.keep_days, cronjob=args.cronjob)


if __name__ == "__main__":
    sys.exit(main())
