"""Publishing rules, in-process against SeaweedFS: a succeeded manifest is final, a job without the
lease writes nothing, a retry of a succeeded run completes latest.json and the clean-up."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from pogona_job.config import Settings
from pogona_job.errors import LeaseLost, TransientFailure
from pogona_job.run import job as jobmod
from pogona_job.run import publish
from pogona_job.run.signals import StopFlag
from pogona_job.run.state import Job, RunRecord
from pogona_job.s3 import pointers
from pogona_job.s3.storage import S3Path
from pogona_job.tools.locals3 import LocalS3
from tests.conftest import BUCKET


@pytest.fixture()
def job(s3: LocalS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3_client: Any) -> Job:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    output = f"s3://{BUCKET}/publish-{secrets.token_hex(4)}"
    settings = Settings(dataset_uri=f"s3://{BUCKET}/datasets/x", output_uri=output, work_dir=tmp_path)
    record = RunRecord(run_id="r", attempt=1, output_uri=output, config={}, model="m", classes=["c"])
    out = S3Path.parse(output) / "r"
    return Job(settings, "r", 1, s3_client, out, tmp_path, record, StopFlag(25), sums={})


def _read(s3_client: Any, path: S3Path) -> dict[str, Any]:
    return json.loads(s3_client.get_object(Bucket=path.bucket, Key=path.key)["Body"].read())


SUCCEEDED = {"status": "succeeded", "run_id": "r", "finished_at": "2026-01-01T00:00:00+00:00"}


def test_a_succeeded_manifest_is_never_rewritten(job: Job, s3_client: Any) -> None:
    pointers.write(s3_client, job.out / "manifest.json", SUCCEEDED, expected=None)
    job.record.status, job.record.failure = "failed", "something after success"
    with pytest.raises(LeaseLost):  # only another holder can have written it: this job is not the run's
        publish.publish(job)
    assert _read(s3_client, job.out / "manifest.json") == SUCCEEDED


def test_a_failure_after_the_succeeded_manifest_publishes_nothing(
    job: Job, s3_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    job.final = True
    job.lease = type("HeldLease", (), {"lost": None})()
    published: list[str] = []
    monkeypatch.setattr(jobmod, "publish_failure", lambda j: published.append("failure"))
    code = jobmod._finish_failed(job, TransientFailure("latest.json could not be written"))
    assert code == 75 and published == []  # the retry completes latest.json; nothing rewrites the run


def test_a_job_without_the_lease_publishes_nothing(job: Job, monkeypatch: pytest.MonkeyPatch) -> None:
    published: list[str] = []
    monkeypatch.setattr(jobmod, "publish_failure", lambda j: published.append("failure"))
    assert job.lease is None  # refused: acquire() raised before it was set
    jobmod._finish_failed(job, TransientFailure("busy"))
    assert published == []


def test_a_retry_of_a_succeeded_run_completes_latest_json_and_the_clean_up(job: Job, s3_client: Any) -> None:
    """Killed after the manifest, even at the DELETE of progress.json: the retry leaves only the manifest."""
    pointers.write(s3_client, job.out / "manifest.json", SUCCEEDED, expected=None)
    pointers.write(s3_client, job.out / "progress.json", {"heartbeat_ts": 1.0, "interval_s": 1}, expected=None)
    s3_client.put_object(Bucket=BUCKET, Key=f"{job.out.key}/checkpoint/full/pointer.json", Body=b"{}")
    pointers.write(s3_client, job.out / "lease.json", {"holder": "killed-after-the-manifest"}, expected=None)
    publish.complete_finished(job, SUCCEEDED)
    latest = _read(s3_client, S3Path.parse(job.settings.output_uri or "") / "latest.json")
    assert latest["run_id"] == "r"
    left = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=f"{job.out.key}/").get("Contents", [])
    assert [o["Key"].removeprefix(job.out.key + "/") for o in left] == ["manifest.json"]
