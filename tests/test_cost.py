"""Budget, accounting, live progress and notifications on real (tiny) runs against SeaweedFS,
with a real loopback HTTP receiver standing in for Slack & co (apprise `json://`).

The runs under test run in this process (`run_here`); only the attempts that are preempted by a
SIGTERM (and `runs watch`, which must see the run from outside) are child processes."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pogona_job.tools.locals3 import LocalS3, free_port
from tests.helpers import BUCKET, ROOT, job_env, out_key, run_here
from tests.helpers import JobProcess as Job
from tests.helpers import body as _get
from tests.helpers import events as _events
from tests.helpers import get_json as _json
from tests.helpers import is_event as _is
from tests.helpers import keys as _keys
from tests.helpers import maybe_json as _maybe_json
from tests.helpers import rows as _rows
from tests.loopback import Receiver, receiver

pytestmark = pytest.mark.slow  # every test here trains


@pytest.fixture()
def hook() -> Iterator[Receiver]:
    with receiver() as r:
        yield r


@pytest.fixture()
def env_for(s3: LocalS3, demo_uri: str, tmp_path: Path) -> Callable[..., dict[str, str]]:
    def make(run: str, work: str = "work", **extra: str) -> dict[str, str]:
        env = job_env(s3, tmp_path, POGONA_DATASET_URI=demo_uri, POGONA_RUN_ID=run, **extra)
        env["POGONA_WORK_DIR"] = str(tmp_path / work)
        return env

    return make


class Watcher:
    """`pogona-job runs watch RUN` in its own process, its JSON lines collected as they come."""

    def __init__(self, env: dict[str, str], run: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pogona_job", "runs", "watch", run],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def wait(self, timeout: float = 60) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return code


def test_watch_follows_a_live_run_and_a_dead_notify_endpoint_does_not_fail_it(
    env_for: Callable[..., dict[str, str]], s3_client: Any, hook: Receiver
) -> None:
    run = "cost-watched"
    dead = f"json://127.0.0.1:{free_port()}/down"
    env = env_for(
        run,
        POGONA_PROGRESS_INTERVAL_S="0.5",
        POGONA_NOTIFY=f"{dead} {hook.url}",
        POGONA_INSTANCE_TYPE="g6.2xlarge",
        POGONA_HOURLY_COST="0.98",
        POGONA_EPOCHS="4",  # 2 sanity epochs, then 2 full ones: the watcher sees each phase's epoch advance
    )
    watcher = Watcher(env, run)  # started first, from another process: it waits for the run to appear
    result = run_here(["run"], env)
    assert result.code == 0, result.stderr[-3000:]
    assert watcher.wait() == 0, watcher.proc.stderr.read() if watcher.proc.stderr else ""

    live = [line for line in watcher.lines if line["state"] == "running"]
    seen = {(line["phase"], line["epoch"]) for line in live}
    for phase in ("sanity", "full"):
        epochs = sorted(e for p, e in seen if p == phase)
        assert len(set(epochs)) >= 2, f"{phase}: the watcher never saw the epoch advance: {sorted(seen)}"
    assert {"eta_s", "elapsed_s", "attempt", "heartbeat", "batch", "metrics"} <= set(live[-1])
    assert watcher.lines[-1]["state"] == "succeeded" and watcher.lines[-1]["final"] is True

    prefix = out_key(env, run) + "/"
    assert not {prefix + "progress.json", prefix + "checkpoint/accounting.json"} & _keys(s3_client, prefix)
    manifest = _json(s3_client, prefix + "manifest.json")
    acc = manifest["accounting"]
    assert acc["instance"]["type"] == "g6.2xlarge" and acc["instance"]["source"] == "POGONA_INSTANCE_TYPE"
    assert [a["outcome"] for a in acc["attempts"]] == ["succeeded"] and acc["preemptions"] == 0
    assert acc["gpu_hours"] == 0  # trained on the CPU
    assert acc["estimated_cost_usd"] == pytest.approx(acc["wall_s"] / 3600 * 0.98, abs=1e-3)
    assert {"pull", "stage", "sanity", "verdict", "full", "evaluate"} <= set(acc["attempts"][0]["phases_s"])
    assert acc["summary"].startswith("4 epochs in ") and "on g6.2xlarge, 0 preemptions, ≈ US$" in acc["summary"]
    report = _get(s3_client, prefix + "report.md").decode()
    assert f"**Cost and time:** {acc['summary']}" in report and "## Cost and time" in report

    epochs = [e for e in _events(result.stderr) if e.get("event") == "epoch"]
    assert [(e["phase"], e["epoch"]) for e in epochs] == [("sanity", 1), ("sanity", 2), ("full", 3), ("full", 4)]
    for e in epochs:
        assert e["images_per_s"] > 0 and e["epoch_seconds"] > 0 and 0 <= e["dataloader_share"] <= 1
        assert e["eta_s"] >= 0
    assert [e["eta_s"] for e in epochs if e["phase"] == "full"][-1] == 0
    fields = ("phase", "epoch", "images_per_s", "epoch_seconds", "eta_s", "dataloader_share")
    print("epoch events:", [{k: e[k] for k in fields} for e in epochs], "watch lines:", len(watcher.lines))

    undelivered = [e for e in _events(result.stderr) if e.get("event") == "notification not delivered"]
    assert len(undelivered) == 1 and undelivered[0]["url_index"] == 0 and "down" not in json.dumps(undelivered)
    assert len(hook.messages) == 1
    msg = hook.messages[0]
    from pogona_job.evaluation.headline import Headline

    assert (msg["type"], msg["title"]) == ("success", f"pogona-train run {run}: succeeded")
    manifest = json.loads(_get(s3_client, prefix + "manifest.json"))
    promotion = manifest["promotion"]
    assert promotion["decision"] == "promote"  # the first run of its output prefix
    head = Headline.from_dict(manifest["metrics"])  # the shipped best.pt on val, not results.csv's last row
    assert head is not None
    assert msg["message"].splitlines() == [
        f"Model: {head.line()}",
        f"Champion: promoted: {promotion['reason']}",
        f"Cost: {acc['summary']}",
        f"Report: s3://{BUCKET}/{prefix}report.md",
        f"Manifest: s3://{BUCKET}/{prefix}manifest.json",
    ]


def test_budget_stops_at_an_epoch_boundary_and_publishes_best_so_far_as_partial(
    env_for: Callable[..., dict[str, str]], s3_client: Any, hook: Receiver
) -> None:
    run = "cost-partial"
    # 3.6 s: less than the pull and sanity epochs take, so the budget stops the training at the gate's epoch
    # (the sanity epochs are always judged; no full epoch fits).
    env = env_for(run, POGONA_EPOCHS="3", POGONA_MAX_HOURS="0.001", POGONA_NOTIFY=hook.url)
    latest_before = _maybe_json(s3_client, out_key(env, "latest.json"))
    champion_before = _maybe_json(s3_client, out_key(env, "champion.json"))
    result = run_here(["run"], env)
    assert result.code == 0, result.stderr[-3000:]

    events = _events(result.stderr)
    names = [(e.get("event"), e.get("phase")) for e in events]
    judged = max(i for i, (event, _) in enumerate(names) if event == "sanity criterion")
    warning = events[judged + 1]  # the projection comes right after the sanity verdict, before full training
    assert warning["event"] == "budget will not cover the full run" and warning["level"] == "warning"
    assert warning["epochs_that_fit"] == 0 and warning["budget"] == "POGONA_MAX_HOURS=0.001"
    assert names.index(("phase started", "full")) > judged + 1

    prefix = out_key(env, run) + "/"
    manifest = _json(s3_client, prefix + "manifest.json")
    assert manifest["status"] == "partial" and manifest["exit_code"] == 0
    assert manifest["failure"].startswith("Stopped by its budget after epoch 2 of 3")
    assert "POGONA_MAX_HOURS=0.001" in manifest["failure"]
    assert manifest["accounting"]["budget"]["stopped"] == manifest["failure"]
    assert [int(r["epoch"]) for r in _rows(s3_client, prefix + "results.csv")] == [1, 2]
    assert not [e for e in events if e.get("event") == "epoch" and e.get("phase") == "full"]
    for key in ("weights/best.pt", "report.md"):
        body = _get(s3_client, prefix + key)
        assert hashlib.sha256(body).hexdigest() == manifest["artifacts"][key]["sha256"], key
    # weights/best.onnx comes with the ship branch's export step; not on this branch yet.
    report = _get(s3_client, prefix + "report.md").decode()
    Path("/tmp/cost-partial-report.md").write_text(report)
    print(f"partial: {manifest['failure']} / {manifest['accounting']['summary']}")
    assert "**Status: PARTIAL**" in report and manifest["failure"] in report
    assert "Projection after the sanity epochs" in report
    assert _maybe_json(s3_client, out_key(env, "latest.json")) == latest_before  # never latest...
    assert _maybe_json(s3_client, out_key(env, "champion.json")) == champion_before  # ...never champion
    assert (latest_before or {}).get("run_id") != run

    assert len(hook.messages) == 1
    msg = hook.messages[0]
    assert (msg["type"], msg["title"]) == ("warning", f"pogona-train run {run}: partial (budget)")
    lines = msg["message"].splitlines()
    assert lines[1] == f"Why: {manifest['failure']}"
    assert lines[2] == "Champion: not considered (a partial run is never champion)"
    assert lines[3] == f"Cost: {manifest['accounting']['summary']}"

    again = run_here(["run"], env)  # the budget is spent: a retry redoes nothing
    assert again.code == 0 and "already partial" in again.stderr


def test_preempted_twice_reports_each_attempt_and_the_budget_counts_them_all(
    env_for: Callable[..., dict[str, str]], s3_client: Any, hook: Receiver
) -> None:
    run = "cost-preempted"
    common = {"POGONA_EPOCHS": "6", "POGONA_MAX_HOURS": "10", "POGONA_HOURLY_COST": "1.0", "POGONA_NOTIFY": hook.url}
    # A 1 h checkpoint interval: the full epochs get no checkpoint of their own, but a SIGTERM (the spot
    # notice) saves the last completed one all the same, so neither preemption costs a finished epoch.
    first = Job(env_for(run, "work-1", POGONA_CHECKPOINT_MIN_INTERVAL_S="3600", **common))
    first.wait_for(_is("epoch", phase="full", epoch=3))  # the first full epoch: 1-2 are the sanity epochs
    assert first.signal_and_wait(signal.SIGTERM) == 143, first.tail()
    assert hook.messages == []  # one preemption is churn, not news
    second = Job(env_for(run, "work-2", POGONA_CHECKPOINT_MIN_INTERVAL_S="3600", **common))  # a fresh machine
    second.wait_for(lambda e: e.get("event") == "epoch" and e.get("phase") == "full")  # its first epoch, resumed
    assert second.signal_and_wait(signal.SIGTERM) == 143, second.tail()
    assert [m["title"] for m in hook.messages] == [f"pogona-train run {run}: interrupted, will resume"]
    assert "Preempted 2 times" in hook.messages[0]["message"]
    third_env = env_for(run, "work-3", **common)
    third = run_here(["run"], third_env)
    assert third.code == 0, third.stderr[-3000:]

    prefix = out_key(third_env, run) + "/"  # all three attempts share the test's output prefix
    manifest = _json(s3_client, prefix + "manifest.json")
    acc = manifest["accounting"]
    attempts = acc["attempts"]
    assert [a["outcome"] for a in attempts] == ["interrupted", "interrupted", "succeeded"]
    assert all(a["wall_s"] > 0 and "sanity" in a["phases_s"] for a in attempts)
    assert acc["preemptions"] == 2
    done_first = attempts[0]["epochs"]["full"]
    assert done_first >= 3 and attempts[1]["resumed_from"]["full"] == done_first  # saved by the SIGTERM
    assert attempts[2]["resumed_from"]["full"] == attempts[1]["epochs"]["full"] > done_first
    assert [p["epochs_recomputed"] for p in acc["preemption_details"]] == [0, 0]
    assert acc["epochs_recomputed"] == 0
    total = sum(a["wall_s"] for a in attempts)
    assert acc["budget"]["used_s"] == pytest.approx(total, abs=0.2) and total > attempts[2]["wall_s"]
    assert acc["estimated_cost_usd"] == pytest.approx(total / 3600, abs=1e-3)
    assert "2 preemptions, 0 epochs recomputed" in acc["summary"]
    report = _get(s3_client, prefix + "report.md").decode()
    print(f"preempted twice: {acc['summary']}; attempts {[a['wall_s'] for a in attempts]} s")
    Path("/tmp/cost-preempted-report.md").write_text(report)
    assert "| Preempted attempt | Epochs recomputed after it |" in report and acc["summary"] in report
    assert [e for e in _rows(s3_client, prefix + "results.csv")] and len(hook.messages) == 2
    assert hook.messages[1]["title"] == f"pogona-train run {run}: succeeded"


def test_a_retry_that_finds_the_budget_spent_trains_no_further_and_publishes_partial(
    env_for: Callable[..., dict[str, str]], s3_client: Any
) -> None:
    run = "cost-spent"
    first = Job(env_for(run, "work-1", POGONA_EPOCHS="4"))
    first.wait_for(_is("checkpoint uploaded", checkpoint_phase="full", epoch=2))  # the gate's epoch: passed
    assert first.signal_and_wait(signal.SIGTERM) == 143, first.tail()
    # The retry's budget (3.6 s) is already spent by attempt 1: not one more epoch may run.
    second_env = env_for(run, "work-2", POGONA_EPOCHS="4", POGONA_MAX_HOURS="0.001")
    second = run_here(["run"], second_env)
    assert second.code == 0, second.stderr[-3000:]
    assert not [e for e in _events(second.stderr) if e.get("event") == "epoch" and e.get("phase") == "full"]

    prefix = out_key(second_env, run) + "/"
    manifest = _json(s3_client, prefix + "manifest.json")
    attempts = manifest["accounting"]["attempts"]
    done = attempts[0]["epochs"]["full"]
    assert manifest["status"] == "partial" and [a["outcome"] for a in attempts] == ["interrupted", "partial"]
    assert manifest["failure"].startswith(f"Stopped by its budget after epoch {done} of 4: the earlier attempts")
    assert [int(r["epoch"]) for r in _rows(s3_client, prefix + "results.csv")] == list(range(1, done + 1))
    body = _get(s3_client, prefix + "weights/best.pt")
    assert hashlib.sha256(body).hexdigest() == manifest["artifacts"]["weights/best.pt"]["sha256"]
    assert manifest["last_epoch_metrics"]["map50"] == float(
        _rows(s3_client, prefix + "results.csv")[-1]["metrics/mAP50(B)"]
    )


def test_gate_failure_and_a_failed_run_each_send_one_message(
    env_for: Callable[..., dict[str, str]], s3_client: Any, hook: Receiver
) -> None:
    gate_env = env_for("cost-gate", POGONA_SANITY_EPOCHS="2", POGONA_GATE_MIN_MAP50="1", POGONA_NOTIFY=hook.url)
    gate = run_here(["run"], gate_env)
    assert gate.code == 5, gate.stderr[-2000:]
    assert len(hook.messages) == 1
    msg = hook.messages[0]
    assert (msg["type"], msg["title"]) == ("failure", "pogona-train run cost-gate: sanity gate failed")
    lines = msg["message"].splitlines()
    assert lines[0] == f"Why: {gate.stderr.strip().splitlines()[-1]}"
    assert lines[1] == "Exit code: 5, phase: verdict"
    assert any(line.startswith("Signature: mAP@0.5 after the sanity epochs: observed ") for line in lines)
    assert lines[-2:] == [
        f"Report: s3://{BUCKET}/{out_key(gate_env, 'cost-gate', 'report.md')}",
        f"Manifest: s3://{BUCKET}/{out_key(gate_env, 'cost-gate', 'manifest.json')}",
    ]

    empty = env_for("cost-failed", POGONA_NOTIFY=hook.url)
    # Something under the prefix but no image: a dataset failure (an empty prefix is a configuration one, exit 2).
    s3_client.put_object(Bucket=BUCKET, Key="datasets/no-images-here/README.md", Body=b"notes, no images")
    empty["POGONA_DATASET_URI"] = f"s3://{BUCKET}/datasets/no-images-here"
    failed = run_here(["run"], empty)
    assert failed.code == 3, failed.stderr[-2000:]
    assert len(hook.messages) == 2
    msg = hook.messages[1]
    assert (msg["type"], msg["title"]) == ("failure", "pogona-train run cost-failed: failed")
    lines = msg["message"].splitlines()
    assert lines[0] == f"Why: {failed.stderr.strip().splitlines()[-1]}"
    assert lines[1].startswith("Exit code: 3, phase: ")
    assert lines[2].startswith("Cost: 0 epochs in ") and "unknown instance" in lines[2]
