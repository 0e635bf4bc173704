"""Where the job runs: instance type, spot or on-demand, and the image digest, read from the
environment rather than guessed.

Sources, first answer wins:
- `POGONA_INSTANCE_TYPE` (the infra templates set it; on Kubernetes from the node's
  `node.kubernetes.io/instance-type` label);
- ECS / AWS Batch: the task metadata endpoint v4 (`$ECS_CONTAINER_METADATA_URI_V4/task`), whose
  `LaunchType` tells EC2 from Fargate and whose container `ImageID` is the image digest;
- EC2 (also under ECS/Batch on EC2): IMDSv2 - a PUT for a session token, then GETs of
  `meta-data/instance-type` and `meta-data/instance-life-cycle` (`spot` / `on-demand`).
IMDS is only asked when something says we are on AWS compute (ECS metadata, AWS Batch, an
`Amazon EC2` DMI vendor, or an explicit `AWS_EC2_METADATA_SERVICE_ENDPOINT`): a laptop or a
test never probes 169.254.169.254. `AWS_EC2_METADATA_DISABLED=true` switches IMDS off, as in botocore.
Every request has a short timeout; any failure means "unknown", never an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pogona_job.logs import get_logger

log = get_logger()
IMDS_DEFAULT = "http://169.254.169.254"
TIMEOUT_S = 1.0
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # link-local: never via a proxy
_DMI = (Path("/sys/class/dmi/id/sys_vendor"), Path("/sys/class/dmi/id/board_vendor"))


@dataclass
class Instance:
    type: str = "unknown"
    lifecycle: str = "unknown"  # spot | on-demand | unknown
    launch_type: str = "unknown"  # EC2 | FARGATE | kubernetes | local | unknown
    source: str = "none"  # where the type came from
    zone: str = "unknown"
    image_digest: str = "unknown"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def label(self) -> str:
        """`g6.2xlarge (spot)` or `unknown instance`."""
        if self.type == "unknown":
            return "unknown instance"
        return f"{self.type} ({self.lifecycle})" if self.lifecycle != "unknown" else self.type


def _http(url: str, *, method: str = "GET", headers: Mapping[str, str] | None = None, timeout: float) -> str:
    request = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    with _DIRECT.open(request, timeout=timeout) as response:
        return str(response.read().decode())


def ecs_task(env: Mapping[str, str], timeout: float = TIMEOUT_S) -> dict[str, Any] | None:
    """The ECS task metadata v4 `/task` document, or None when not on ECS (or it does not answer)."""
    base = env.get("ECS_CONTAINER_METADATA_URI_V4")
    if not base:
        return None
    try:
        task = json.loads(_http(base.rstrip("/") + "/task", timeout=timeout))
        container = json.loads(_http(base.rstrip("/"), timeout=timeout))
    except (OSError, ValueError) as exc:
        log.warning("ECS task metadata did not answer", reason=str(exc)[:200])
        return None
    task["_container"] = container
    return task if isinstance(task, dict) else None


def imds(env: Mapping[str, str], timeout: float = TIMEOUT_S) -> dict[str, str]:
    """instance-type and instance-life-cycle over IMDSv2 (token first); {} when unavailable."""
    base = (env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or IMDS_DEFAULT).rstrip("/")
    try:
        token = _http(
            f"{base}/latest/api/token",
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
            timeout=timeout,
        )
        auth = {"X-aws-ec2-metadata-token": token}
        out = {"instance-type": _http(f"{base}/latest/meta-data/instance-type", headers=auth, timeout=timeout)}
        for key in ("instance-life-cycle", "placement/availability-zone"):
            with contextlib.suppress(OSError):  # older instances may lack a field
                out[key] = _http(f"{base}/latest/meta-data/{key}", headers=auth, timeout=timeout)
        return {k: v.strip() for k, v in out.items()}
    except OSError as exc:
        log.info("EC2 instance metadata (IMDSv2) did not answer", reason=str(exc)[:200])
        return {}


def _on_ec2_hardware() -> bool:
    for path in _DMI:
        try:
            if "amazon" in path.read_text().lower():
                return True
        except OSError:
            continue
    return False


def detect(env: Mapping[str, str] | None = None, override: str | None = None, timeout: float = TIMEOUT_S) -> Instance:
    """The instance this attempt runs on; "unknown" fields where no source exists (a laptop)."""
    env = os.environ if env is None else env
    found = Instance()
    task = ecs_task(env, timeout)
    if task is not None:
        found.launch_type = str(task.get("LaunchType") or "unknown").upper()
        found.zone = str(task.get("AvailabilityZone") or "unknown")
        found.image_digest = str(task["_container"].get("ImageID") or "unknown")
        if found.launch_type == "FARGATE":
            found.type, found.source = "fargate", "ecs-task-metadata"
    elif env.get("KUBERNETES_SERVICE_HOST"):
        found.launch_type = "kubernetes"
    ec2_signal = (
        (task is not None and found.launch_type != "FARGATE")
        or bool(env.get("AWS_BATCH_JOB_ID"))
        or bool(env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT"))
        or _on_ec2_hardware()
    )
    if ec2_signal and found.type == "unknown" and env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        meta = imds(env, timeout)
        if meta.get("instance-type"):
            found.type, found.source = meta["instance-type"], "imds"
            found.lifecycle = meta.get("instance-life-cycle", "unknown") or "unknown"
            found.zone = meta.get("placement/availability-zone", found.zone)
            if found.launch_type == "unknown":
                found.launch_type = "EC2"
    if override:
        found.type, found.source = override, "POGONA_INSTANCE_TYPE"
    if env.get("IMAGE_DIGEST"):
        found.image_digest = env["IMAGE_DIGEST"]
    if found.launch_type == "unknown" and found.type == "unknown":
        found.launch_type = "local"
    return found


_DETECTED: Instance | None = None


def instance(override: str | None = None) -> Instance:
    """`detect()` once per process (the metadata does not change under a running job)."""
    global _DETECTED
    if _DETECTED is None:
        _DETECTED = detect()
    return replace(_DETECTED, type=override, source="POGONA_INSTANCE_TYPE") if override else _DETECTED


def image_digest() -> str:
    """The running image's digest: IMAGE_DIGEST if set, else ECS task metadata's ImageID, else "unknown"."""
    return os.environ.get("IMAGE_DIGEST") or instance().image_digest
