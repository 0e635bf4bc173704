"""`pogona-job runs`: where the models stand, without opening JSON.

`runs` lists the runs under POGONA_OUTPUT_URI (run id, status, date, best.pt's mAP@0.5 on val with its
95% interval and epoch - the headline, evaluation/headline.py - champion mark); `runs show ID` prints one
manifest in readable form.
"""

from __future__ import annotations

from typing import Any

from pogona_job.evaluation.headline import Headline
from pogona_job.s3 import pointers, storage
from pogona_job.s3.storage import S3Path


def run_ids(client: Any, out: S3Path) -> list[str]:
    """Run ids under the output prefix: the folders that hold a manifest, a report or a checkpoint."""
    ids: set[str] = set()
    for obj in storage.list_objects(client, out):
        rel = obj.key.removeprefix(out.key + "/") if out.key else obj.key
        if "/" in rel:
            ids.add(rel.split("/", 1)[0])
    return sorted(ids)


def _map50(manifest: dict[str, Any]) -> str:
    """best.pt's mAP@0.5 on val with its interval and epoch (the headline), else best.pt's evaluation."""
    head = Headline.from_dict(manifest.get("metrics") or {})
    if head is not None:
        return head.short()
    overall = (manifest.get("evaluation") or {}).get("val", {}).get("overall")
    if overall:
        lo, hi = overall.get("ci", {}).get("map50") or (None, None)
        interval = f" ({lo:.2f}-{hi:.2f})" if lo is not None else ""
        return f"{overall['map50']:.3f}{interval}"
    return "-"  # never results.csv's last row: that is not the shipped model


def table(client: Any, out: S3Path) -> str:
    champion = pointers.read(client, out / "champion.json").value or {}
    rows = [("RUN", "STATUS", "DATE", "best.pt mAP@0.5 (95% CI) epoch", "CHAMPION")]
    found: list[tuple[str, tuple[str, str, str, str, str]]] = []
    for run_id in run_ids(client, out):
        manifest = storage.get_json(client, out / run_id / "manifest.json")
        if manifest is None or manifest.get("in_progress"):  # none yet, or the running holder's claim
            found.append(("~", (run_id, "in progress", "-", "-", "")))  # newest: still running, listed last
            continue
        mark = "★" + (" (forced)" if champion.get("forced") else "") if champion.get("run_id") == run_id else ""
        stamp = str(manifest.get("started_at") or manifest.get("finished_at") or "")
        date = str(manifest.get("finished_at") or manifest.get("started_at") or "-")[:19].replace("T", " ")
        found.append((stamp, (run_id, str(manifest.get("status", "?")), date, _map50(manifest), mark)))
    rows += [row for _, row in sorted(found, key=lambda x: (x[0], x[1][0]))]  # by date, oldest first
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if len(rows) == 1:
        lines.append(f"(no runs under {out.uri})")
    return "\n".join(lines)


def show(client: Any, out: S3Path, run_id: str) -> str | None:
    """One manifest as text; None when the run has no manifest."""
    m = storage.get_json(client, out / run_id / "manifest.json")
    if m is None:
        return None
    champion = pointers.read(client, out / "champion.json").value or {}
    lines = [
        f"Run {run_id}: {m.get('status')}" + (f" (exit {m['exit_code']})" if m.get("exit_code") else ""),
        f"  started {m.get('started_at')}, finished {m.get('finished_at')}",
    ]
    head = Headline.from_dict(m.get("metrics") or {})
    if head is not None:
        lines.append(f"  model: {head.line()}")
        last = head.last_epoch_text()
        if last:
            lines.append(f"  {last}")
    if m.get("failure"):
        lines.append(f"  failure: {m['failure']}")
    if champion.get("run_id") == run_id:
        lines.append("  ★ current champion" + (" (forced)" if champion.get("forced") else ""))
    lines.append(f"  model {m.get('model')}, dataset {(m.get('dataset') or {}).get('uri')}")
    lines.append(f"  classes: {', '.join(m.get('classes') or []) or '-'}")
    for split, ev in (m.get("evaluation") or {}).items():
        lines.append(f"  {split} ({ev['images']} images):")
        for scope, x in [("overall", ev["overall"]), *ev.get("per_modality", {}).items()]:
            ci = x.get("ci", {})
            lines.append(
                f"    {scope:<10} mAP@0.5 {_fmt(x['map50'], ci.get('map50'))}  "
                f"mAP@0.5-0.95 {_fmt(x['map50_95'], ci.get('map50_95'))}"
            )
        for name, c in (ev.get("per_class") or {}).items():
            lines.append(f"    class {name:<10} mAP@0.5 {c['map50']:.3f}  instances {int(c['instances'])}")
    export = m.get("export") or {}
    if export:
        state = "verified" if export.get("verified") else "NOT verified"
        lines.append(
            f"  export onnx: {state}, max |Δ mAP@0.5| {export.get('max_abs_delta_map50', 0):.4f} "
            f"(tolerance {export.get('tolerance')})"
        )
    promotion = m.get("promotion") or {}
    if promotion:
        lines.append(f"  promotion: {promotion.get('decision')} - {promotion.get('reason')}")
    lineage = m.get("lineage") or {}
    if lineage:
        lines.append(
            f"  lineage: commit {lineage.get('git_commit')}, image {lineage.get('image', {}).get('digest')}, "
            f"seed {lineage.get('seed')}, dataset {lineage.get('dataset', {}).get('fingerprint')}"
        )
    lines.append("  artifacts:")
    lines += [f"    {k}  {a['size']} B  sha256 {a['sha256'][:12]}" for k, a in (m.get("artifacts") or {}).items()]
    return "\n".join(lines)


def _fmt(value: float, bounds: list[float] | None) -> str:
    return f"{value:.3f}" + (f" ({bounds[0]:.2f}-{bounds[1]:.2f})" if bounds else "")
