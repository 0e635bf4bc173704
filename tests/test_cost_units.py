"""Instance detection against a loopback stand-in for the AWS metadata endpoints, the budget's
arithmetic, the summary line, notification payloads over a real loopback HTTP receiver, and
`runs watch` on a hand-written progress.json in SeaweedFS."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from pogona_job.config import Settings, effective_config
from pogona_job.errors import ConfigError
from pogona_job.run import budget, cloud
from pogona_job.tools.locals3 import LocalS3
from tests.helpers import BUCKET, job_env, run_here
from tests.loopback import TOKEN, metadata, receiver


def test_ecs_on_ec2_reads_launch_type_and_digest_then_imdsv2_with_a_token() -> None:
    with metadata(launch_type="EC2", instance_type="g6.2xlarge", lifecycle="spot") as stand_in:
        env = {
            "ECS_CONTAINER_METADATA_URI_V4": stand_in.base + "/ecs",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": stand_in.base,
        }
        found = cloud.detect(env)
    assert (found.type, found.lifecycle, found.launch_type, found.source) == ("g6.2xlarge", "spot", "EC2", "imds")
    assert found.image_digest == "sha256:" + "ab" * 32 and found.zone == "us-east-1b"
    assert found.label() == "g6.2xlarge (spot)"
    gets = [(m, p, h) for m, p, h in stand_in.requests if p.startswith("/latest/meta-data/")]
    assert gets and all(h.get("x-aws-ec2-metadata-token") == TOKEN for _, _, h in gets)
    assert stand_in.requests[2][:2] == ("PUT", "/latest/api/token")  # the token comes before any read


def test_fargate_needs_no_imds_and_the_override_wins() -> None:
    with metadata(launch_type="FARGATE") as stand_in:
        found = cloud.detect({"ECS_CONTAINER_METADATA_URI_V4": stand_in.base + "/ecs"})
        assert found.type == "fargate" and found.launch_type == "FARGATE"
        assert not [r for r in stand_in.requests if r[1].startswith("/latest")]
        env = {"ECS_CONTAINER_METADATA_URI_V4": stand_in.base + "/ecs", "IMAGE_DIGEST": "sha256:cafe"}
        pinned = cloud.detect(env, override="p5.48xlarge")
    assert (pinned.type, pinned.source, pinned.image_digest) == ("p5.48xlarge", "POGONA_INSTANCE_TYPE", "sha256:cafe")


def test_no_aws_signal_means_unknown_and_no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(cloud, "_http", lambda url, **_: calls.append(url) or "")
    monkeypatch.setattr(cloud, "_on_ec2_hardware", lambda: False)
    found = cloud.detect({"HOME": "/root"})
    assert (found.type, found.lifecycle, found.launch_type) == ("unknown", "unknown", "local")
    assert calls == []  # 169.254.169.254 was never asked
    assert cloud.detect({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, override="g5.xlarge").label() == "g5.xlarge"


def test_a_dead_metadata_endpoint_is_unknown_not_an_error() -> None:
    from pogona_job.tools.locals3 import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    found = cloud.detect({"AWS_BATCH_JOB_ID": "j", "AWS_EC2_METADATA_SERVICE_ENDPOINT": dead}, timeout=0.5)
    assert found.type == "unknown"


def test_budget_limit_is_the_tighter_of_hours_and_cost() -> None:
    limit, source = budget.budget_limit(Settings(max_hours=2, max_cost=1.0, hourly_cost=1.0))
    assert limit == 3600 and source.startswith("POGONA_MAX_COST")
    assert budget.budget_limit(Settings(max_hours=0.5))[0] == 1800
    assert budget.budget_limit(Settings()) == (None, "")
    with pytest.raises(ConfigError, match="POGONA_MAX_COST needs POGONA_HOURLY_COST"):
        budget.budget_limit(Settings(max_cost=3))


def test_summary_line_reads_like_the_issue() -> None:
    acc = {
        "instance": cloud.Instance(type="g6.2xlarge", lifecycle="spot").as_dict(),
        "wall_s": 48 * 60,
        "preemptions": 1,
        "epochs_recomputed": 2,
        "estimated_cost_usd": 0.4218,
    }
    assert (
        budget.summary_line(60, acc)
        == "60 epochs in 48 min on g6.2xlarge (spot), 1 preemption, 2 epochs recomputed, ≈ US$0.42"
    )
    acc.update(instance=cloud.Instance().as_dict(), preemptions=0, estimated_cost_usd=None, wall_s=42)
    assert budget.summary_line(1, acc) == "1 epoch in 42 s on unknown instance, 0 preemptions"


def test_notify_urls_are_masked_in_the_effective_config() -> None:
    cfg = effective_config(Settings(notify="slack://T1/B2/secret-token json://host/hook?x=1"))
    assert cfg["POGONA_NOTIFY"] == "slack://**** json://****"


def _progress(run: str, hb: float, interval: float = 1.0, epoch: int = 2) -> dict[str, Any]:
    return {
        "run_id": run,
        "phase": "full",
        "epoch": epoch,
        "epochs": 5,
        "interval_s": interval,
        "heartbeat_ts": hb,
    }


def test_watch_reports_stalled_when_the_heartbeat_is_old(s3: LocalS3, s3_client: Any, tmp_path: Path) -> None:
    put = s3_client.put_object
    put(Bucket=BUCKET, Key="watch/old-run/progress.json", Body=json.dumps(_progress("old-run", time.time() - 60)))
    put(Bucket=BUCKET, Key="watch/live-run/progress.json", Body=json.dumps(_progress("live-run", time.time(), 30)))
    env = job_env(s3, tmp_path, POGONA_OUTPUT_URI=f"s3://{BUCKET}/watch")
    stalled = run_here(["runs", "watch", "old-run", "--once"], env)
    line = json.loads(stalled.stdout.strip())
    assert (line["state"], line["epoch"], stalled.code) == ("stalled", 2, 1)
    live = json.loads(run_here(["runs", "watch", "live-run", "--once"], env).stdout.strip())
    assert live["state"] == "running"
    latest = json.loads(run_here(["runs", "watch", "--latest", "--once"], env).stdout.strip())
    assert latest["run_id"] == "live-run"  # written last
    both = run_here(["runs", "watch"], env)
    assert both.code == 2 and "run id or --latest" in both.stderr


def test_a_dead_notification_endpoint_is_logged_and_the_live_one_still_gets_it() -> None:
    from types import SimpleNamespace

    from pogona_job.run import notify
    from pogona_job.s3.storage import S3Path
    from pogona_job.tools.locals3 import free_port

    record = SimpleNamespace(
        accounting={"summary": "0 epochs in 3 s on unknown instance, 0 preemptions"},
        status="failed",
        exit_code=3,
        failure="The dataset is empty.",
        failed_phase="stage",
        full=None,
        watchdog={},
        verdict=None,
    )
    with receiver() as live:
        job = SimpleNamespace(
            record=record,
            run_id="r1",
            out=S3Path.parse("s3://b/runs/r1"),
            settings=Settings(notify=f"json://127.0.0.1:{free_port()}/x {live.url}"),
        )
        assert notify.send(job) is False  # one URL failed: reported, not raised
        assert len(live.messages) == 1
    msg = live.messages[0]
    assert msg["type"] == "failure" and msg["title"] == "pogona-train run r1: failed"
    assert msg["message"].splitlines() == [
        "Why: The dataset is empty.",
        "Exit code: 3, phase: stage",
        "Cost: 0 epochs in 3 s on unknown instance, 0 preemptions",
        "Report: s3://b/runs/r1/report.md",
        "Manifest: s3://b/runs/r1/manifest.json",
    ]


def test_the_terminal_display_renders_a_live_line_and_the_final_summary(capsys: pytest.CaptureFixture[str]) -> None:
    from pogona_job.run.livestatus import _RichDisplay

    display = _RichDisplay()
    display.show({**_progress("r", time.time()), "state": "running", "metrics": {"map50": 0.5}, "eta_s": 12.0})
    display.show({**_progress("r", time.time() - 99), "state": "stalled"})
    final = {"state": "succeeded", "final": True, "manifest": {"accounting": {"summary": "2 epochs in 9 s on x"}}}
    display.close(final)
    assert "Run finished: succeeded. 2 epochs in 9 s on x" in capsys.readouterr().out


def test_an_attempt_that_vanished_counts_as_a_preemption_and_its_lost_epochs_are_counted() -> None:
    from pogona_job.s3.storage import S3Path

    tracker = budget.Tracker(
        client=None,
        run=S3Path.parse("s3://b/runs/r"),
        settings=Settings(max_hours=1, hourly_cost=2.0),
        instance=cloud.Instance(type="g6.xlarge", lifecycle="spot"),
        device="0",
        scheduler_attempt=3,
        timings={"full": 5.0},
        started=time.monotonic(),  # not the test session's start
    )
    tracker.prior = [  # kill -9: its last periodic entry still says "running"
        {
            "id": "a",
            "wall_s": 1800.0,
            "outcome": "running",
            "epochs": {"sanity": 3, "full": 7},
            "gpus": 1,
            "hourly_cost": 2.0,
            "seconds_since_last_epoch": 0.0,
        },
    ]
    tracker.training_started("full", 5)  # the newest checkpoint held 5 epochs: 2 recomputed
    tracker.epoch_done("full", 6, 60.0, 0.25)
    acc = tracker.summary("succeeded")
    assert acc["preemptions"] == 1 and acc["epochs_recomputed"] == 2
    assert acc["preemption_details"][0]["by_phase"] == {"full": 2}
    assert acc["gpu_hours"] == pytest.approx((1800 + tracker.elapsed()) / 3600, abs=1e-3)
    assert acc["estimated_cost_usd"] == pytest.approx(1.0, abs=0.01)
    assert acc["input_bottleneck"] is True
    assert "Input-pipeline bottleneck (full)" in "\n".join(budget.report_lines(acc))
    # the budget counts the vanished attempt: 30 min used of 60, and a 31-minute epoch does not fit
    assert not tracker.should_stop("full", 6, 10, 60.0)
    assert tracker.should_stop("full", 6, 10, 31 * 60.0)
    assert tracker.stop_reason and "across 2 attempts" in tracker.stop_reason
    tracker.prior[0]["hourly_cost"] = None  # an unpriced attempt: the total is unknown, not understated
    assert tracker.summary("partial")["estimated_cost_usd"] is None
