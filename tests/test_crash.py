"""The crash-point harness: kill -9 the job at chosen requests, restart it on a NEW machine (a fresh
POGONA_WORK_DIR: everything must come back from the bucket), and check that the run still ends
exactly right.

A mitmproxy addon (tests/pause_addon.py) holds one chosen request - a checkpoint file, a set.json,
a pointer, the gate, an artifact, the manifest, latest.json, the clean-up - and the test kills the
job's whole process group while that request is in flight. Each restart is the next AWS Batch
attempt of the same job, so it may take the dead attempt's lease over at once. The legs run in
order on one run id, each restart going further, so one training budget covers every point.

At the end: results.csv has rows 1..N exactly once (and sanity 1..S), every manifest artifact
matches its sha256, the report counts N epochs, latest.json names the run, and no checkpoint
object (nor the lease) is left behind.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

from pogona_job.tools.locals3 import LocalS3
from tests.conftest import BUCKET, FaultProxy, job_env
from tests.helpers import JobProcess, objects, run_here
from tests.helpers import body as _body
from tests.helpers import epochs as _epochs

EPOCHS, SANITY = 3, 2  # one training: epochs 1-2 are the sanity epochs, judged at the end of epoch 2

# (name, regex on "METHOD path", which match in that leg). Order matters: each leg starts where the
# previous kill left the run and must reach its own crash point.
CRASH_POINTS = [
    ("the gate", r"^PUT .*/checkpoint/gate\.json", 1),  # epoch 1's set is stored: the restart judges at 2
    ("the gate epoch's checkpoint file", r"^PUT .*/checkpoint/full/2-[0-9a-f]+/last\.pt", 1),
    ("the gate epoch's set.json", r"^PUT .*/checkpoint/full/2-[0-9a-f]+/set\.json", 1),  # gate.json: not re-judged
    ("the gate epoch's pointer", r"^PUT .*/checkpoint/full/pointer\.json", 1),
    ("the final set's results.csv", r"^PUT .*/checkpoint/full/3-[0-9a-f]+/results\.csv", 1),
    ("the final pointer", r"^PUT .*/checkpoint/full/pointer\.json", 1),  # resumed past the gate: read back
    ("an artifact", r"^PUT .*/weights/best\.pt", 1),
    ("the results artifact", r"^PUT .*/[0-9a-f]{8}/results\.csv", 1),
    ("the manifest", r"^PUT .*/manifest\.json", 2),  # the 1st is the holder's claim at the start,
    ("latest.json", r"^PUT .*/latest\.json", 1),
    ("champion.json", r"^PUT .*/champion\.json", 1),
    ("the checkpoint clean-up", r"^POST .*\?delete", 1),
]


class PauseProxy(FaultProxy):
    """mitmdump in reverse mode in front of the S3 server, holding the request that matches this leg's rule
    (one proxy for every leg: the rule is a control file the addon reads again when it changes)."""

    def __init__(self, upstream: str, tmp: Path) -> None:
        self.control = tmp / "pause-rule.json"
        super().__init__(upstream, "", tmp, addon="pause_addon.py", env={"PAUSE_CONTROL": str(self.control)})

    def hold(self, leg: int, match: str, nth: int) -> None:
        """From now on, hold the `nth` request of leg `leg` that matches."""
        self.control.write_text(json.dumps({"leg": leg, "match": match, "nth": nth}))

    def paused(self, leg: int) -> str | None:
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith(f"PAUSED {leg} "):
                return line.replace(f"PAUSED {leg} ", "PAUSED ", 1)
        return None


def test_a_kill_9_at_every_crash_point_still_ends_in_one_exact_run(
    s3: LocalS3, demo_uri: str, s3_client: Any, tmp_path: Path
) -> None:
    output = f"crash-{secrets.token_hex(4)}"
    run = secrets.token_hex(4)  # 8 hex digits: the results-artifact crash point matches on it
    prefix = f"{output}/{run}/"

    def env(attempt: int, endpoint: str) -> dict[str, str]:
        work = tmp_path / f"machine-{attempt}"  # a new spot instance every time: nothing local survives
        e = job_env(
            s3, work, POGONA_DATASET_URI=demo_uri, POGONA_RUN_ID=run, POGONA_OUTPUT_URI=f"s3://{BUCKET}/{output}"
        )
        e.update(
            POGONA_EPOCHS=str(EPOCHS),
            POGONA_SANITY_EPOCHS=str(SANITY),
            AWS_BATCH_JOB_ID="crash-harness",
            AWS_BATCH_JOB_ATTEMPT=str(attempt),
            AWS_ENDPOINT_URL_S3=endpoint,
        )
        return e

    seen: list[str] = []
    proxy = PauseProxy(s3.endpoint, tmp_path)
    try:
        for attempt, (name, match, nth) in enumerate(CRASH_POINTS, start=1):
            proxy.hold(attempt, match, nth)
            leg = JobProcess(env(attempt, proxy.endpoint), log=tmp_path / f"leg-{attempt}.log")
            deadline = time.monotonic() + 300
            while proxy.paused(attempt) is None and leg.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            paused = proxy.paused(attempt)
            leg.kill()
            assert paused, f"leg {attempt} never reached {name} (exit {leg.proc.returncode}):\n{leg.tail()}"
            seen.append(paused)
            manifest = objects(s3_client, prefix, relative=True).get("manifest.json")
            if name in ("latest.json", "champion.json", "the checkpoint clean-up"):
                assert json.loads(_body(s3_client, prefix + "manifest.json"))["status"] == "succeeded"
            else:
                # only the holder's claim (`interrupted`), never a result, before the run's own manifest
                status = json.loads(_body(s3_client, prefix + "manifest.json"))["status"] if manifest else None
                claimed = status in (None, "interrupted")
                assert claimed, f"a killed attempt published a manifest at {name}"
            if attempt > 1:  # every restart came from the bucket, never from a local file
                came_back = {"checkpoint restored", "run already finished; nothing redone"}
                assert any(e.get("event") in came_back for e in leg.events()), leg.tail()
    finally:
        proxy.stop()

    final = run_here(["run"], env(len(CRASH_POINTS) + 1, s3.endpoint))
    assert final.code == 0, final.stderr[-3000:]
    print("crash points hit:\n  " + "\n  ".join(seen))

    manifest = json.loads(_body(s3_client, prefix + "manifest.json"))
    assert manifest["status"] == "succeeded" and manifest["run_id"] == run
    for key, meta in manifest["artifacts"].items():
        body = _body(s3_client, prefix + key)
        assert (len(body), hashlib.sha256(body).hexdigest()) == (meta["size"], meta["sha256"]), key
    assert {"results.csv", "sanity/results.csv", "weights/best.pt", "weights/last.pt"} <= set(manifest["artifacts"])
    assert _epochs(s3_client, prefix + "results.csv") == list(range(1, EPOCHS + 1))
    assert _epochs(s3_client, prefix + "sanity/results.csv") == list(range(1, SANITY + 1))
    report = _body(s3_client, prefix + "report.md").decode()
    full = report[report.index("### Full training") :]
    assert re.search(rf"\({EPOCHS} epochs\)", full), full[:600]
    latest = json.loads(_body(s3_client, f"{output}/latest.json"))
    assert latest["run_id"] == run
    champion = json.loads(_body(s3_client, f"{output}/champion.json"))  # the first run of the prefix
    assert (
        champion["run_id"] == run and champion["weights_sha256"] == manifest["artifacts"]["weights/best.pt"]["sha256"]
    )
    left = set(objects(s3_client, prefix, relative=True))
    assert not {k for k in left if k.startswith("checkpoint/") or k == "lease.json"}, sorted(left)
