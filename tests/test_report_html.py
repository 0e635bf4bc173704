"""report.html, the model card and the error gallery, as a user opening the bucket gets them.

One real tiny run (module-scoped); the HTML is opened in a real headless Chromium (Debian's
`chromium`, installed by `make chromium`, which `.ci/run` calls).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BUCKET, Result, job_env, out_key, run_cli

RUN = "html-run"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=5000",
]
# Injected into a copy of the page: records every image's decoding, every fetch and every fetch the
# page's Content-Security-Policy refused, into an attribute that --dump-dom prints.
PROBE = """<script>
const refused = [];
document.addEventListener('securitypolicyviolation', e => refused.push(e.blockedURI));
window.addEventListener('load', () => setTimeout(() => {
  const imgs = [...document.images];
  document.documentElement.setAttribute('data-probe', JSON.stringify({
    images: imgs.length,
    undecoded: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    fetched: performance.getEntriesByType('resource').map(r => r.name),
    refused: refused,
    title: document.querySelector('h1') ? document.querySelector('h1').textContent : null,
  }));
}, 300));
</script>"""


@pytest.fixture(scope="module")
def env(s3: Any, demo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return job_env(s3, tmp_path_factory.mktemp("html"), POGONA_DATASET_URI=demo_uri, POGONA_RUN_ID=RUN)


@pytest.fixture(scope="module")
def finished(env: dict[str, str]) -> Result:
    result = run_cli(["run"], env, timeout=900)
    assert result.code in (0, 5), result.stderr[-2000:]
    return result


def _get(s3_client: Any, env: dict[str, str], key: str) -> dict[str, Any]:
    obj: dict[str, Any] = s3_client.get_object(Bucket=BUCKET, Key=out_key(env, RUN, key))
    return obj


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed: `make chromium` (apt-get install chromium) must run before the tests.")
    pytest.skip("chromium is not installed here (run `make chromium`); CI installs it and fails without it.")


def open_in_chromium(page: Path, tmp_path: Path) -> dict[str, Any]:
    """The page as Chromium renders it, with the probe's findings."""
    text = page.read_text(encoding="utf-8")
    # The probe is a script: allow inline scripts in the copy, keep every other restriction of the page.
    probed = text.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
    probed = probed.replace("<head>", "<head>" + PROBE, 1)
    copy = tmp_path / f"probed-{page.name}"
    copy.write_text(probed, encoding="utf-8")
    proc = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", copy.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r"data-probe=\"([^\"]*)\"", proc.stdout)
    assert found, f"the page did not finish loading in Chromium: {proc.stdout[:500]}"
    import html

    probe: dict[str, Any] = json.loads(html.unescape(found.group(1)))
    return probe


def test_report_html_and_md_are_stored_with_their_content_types(
    finished: Result, env: dict[str, str], s3_client: Any
) -> None:
    assert _get(s3_client, env, "report.html")["ContentType"].startswith("text/html")
    assert _get(s3_client, env, "report.md")["ContentType"].startswith("text/markdown")
    assert _get(s3_client, env, "model_card.md")["ContentType"].startswith("text/markdown")
    manifest = json.loads(_get(s3_client, env, "manifest.json")["Body"].read())
    assert {"report.html", "model_card.md"} <= set(manifest["artifacts"])


def test_report_html_renders_in_chromium_with_every_image_decoded_and_nothing_fetched(
    finished: Result, env: dict[str, str], s3_client: Any, tmp_path: Path
) -> None:
    page = tmp_path / "report.html"
    page.write_bytes(_get(s3_client, env, "report.html")["Body"].read())
    md = _get(s3_client, env, "report.md")["Body"].read().decode()
    probe = open_in_chromium(page, tmp_path)
    assert probe["title"] == f"Training Log - {RUN}"
    plots = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(plots) >= 3 and any(p.startswith("plots/errors/") for p in plots)
    assert probe["images"] == len(plots), "every image of report.md is in the page"
    assert probe["undecoded"] == []
    assert [u for u in probe["fetched"] if not u.startswith("data:")] == []
    assert probe["refused"] == []
    # The first screen reads like report.md: the same headings, in the same order.
    headings = re.findall(r"^#{1,3} (.+)$", md, flags=re.M)
    text = page.read_text()
    positions = [text.find(f">{h.replace('&', '&amp;')}<") for h in headings[:6]]
    assert all(p > 0 for p in positions) and positions == sorted(positions)


def test_the_chromium_probe_sees_a_page_that_fetches_from_outside(tmp_path: Path) -> None:
    """The check above is not vacuous: an outside image in such a page is caught."""
    from pogona_job.run.html_report import to_html

    page = tmp_path / "leaky.html"
    page.write_text(to_html("# t\n", {}, "t").replace("</body>", '<img alt="x" src="http://127.0.0.1:9/x.png"></body>'))
    probe = open_in_chromium(page, tmp_path)
    assert probe["undecoded"] == ["x"]
    assert probe["refused"] == ["http://127.0.0.1:9/x.png"]


def test_the_report_has_an_error_gallery_with_counts_by_kind_and_its_pictures(
    finished: Result, env: dict[str, str], s3_client: Any
) -> None:
    md = _get(s3_client, env, "report.md")["Body"].read().decode()
    assert "### Error analysis of best.pt on val (confidence >= 0.25, POGONA_CONF)" in md
    row = re.search(r"^\| all \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", md, flags=re.M)
    assert row, md
    images, labels, missed, _alarms, wrong, poor = map(int, row.groups())
    assert images > 0 and labels > 0 and missed + wrong + poor <= labels
    for key in re.findall(r"\((plots/errors/[^)]+)\)", md):
        body = _get(s3_client, env, key)
        assert body["ContentType"] == "image/png" and body["ContentLength"] > 200


def test_the_model_card_is_linked_from_the_report_and_states_data_conf_and_how_to_run(
    finished: Result, env: dict[str, str], s3_client: Any
) -> None:
    md = _get(s3_client, env, "report.md")["Body"].read().decode()
    assert "[Model card](model_card.md)" in md
    card = _get(s3_client, env, "model_card.md")["Body"].read().decode()
    manifest = json.loads(_get(s3_client, env, "manifest.json")["Body"].read())
    assert f"# Model card - {RUN}" in card
    assert "**Deployment confidence**: 0.25" in card
    assert manifest["dataset"]["fingerprint"] in card
    val = manifest["evaluation"]["val"]
    lo, hi = val["overall"]["ci"]["map50"]
    assert f"{val['overall']['map50']:.3f} ({lo:.3f}-{hi:.3f})" in card
    assert f"pogona-job predict --model {RUN}" in card
    assert "## Known limits" in card
