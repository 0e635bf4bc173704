"""Champion/challenger: `champion.json` names the model to deploy, and only a better-or-equal run moves it.

`latest.json` keeps meaning "newest successful run". A new run becomes champion only when:
1. it succeeded and its export verified (no export at all is not a failure: best.pt is the model);
2. on ONE evaluation set - this run's val (and test) split, both models evaluated in this process
   with the same settings - no modality's mAP@0.5 is worse than the champion's by more than
   POGONA_PROMOTION_MARGIN and the overall mAP@0.5-0.95 is not worse; and the paired bootstrap says
   so with 95% confidence (the lower bound of each difference is above -margin). When the point
   estimate passes but the interval reaches past the margin, the sets are too small to tell and the
   champion stays;
3. its dataset passed validation without dropped images (or POGONA_PROMOTE_LENIENT allows it).
The first run becomes champion. POGONA_PROMOTE=never|always overrides; `always` is recorded as forced.

`champion.json` moves with a compare-and-swap on the one the decision was made against: of two runs
finishing together, one wins, the other re-reads, finds a champion it was not compared with, and stays.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pogona_job.evaluation import uncertainty
from pogona_job.logs import get_logger
from pogona_job.s3 import pointers
from pogona_job.s3.storage import S3Path

if TYPE_CHECKING:
    from pogona_job.evaluation.scoring import SplitRun

log = get_logger()
CHAMPION = "champion.json"


def champion_path(output_uri: str) -> S3Path:
    return S3Path.parse(output_uri) / CHAMPION


def compare(
    challenger: dict[str, SplitRun], champion: dict[str, SplitRun], *, margin: float, resamples: int = 1000
) -> dict[str, Any]:
    """Paired comparison on the same images: per split, overall and per modality, with 95% intervals.

    Each check is "ok", "regressed" (point estimate past the limit) or "unsure" (point ok, interval past it)."""
    checks: list[dict[str, Any]] = []
    splits: dict[str, Any] = {}
    for split, new in challenger.items():
        old = champion[split]
        overall = uncertainty.paired_deltas(new.per, old.per, count=resamples, groups=new.groups)
        modalities = {
            m: uncertainty.paired_deltas(
                per, old.per.aligned(per.files), keys=("map50",), count=resamples, groups=new.groups
            )
            for m, per in new.by_modality().items()
        }
        splits[split] = {"images": len(new.per), "overall": overall, "per_modality": modalities}
        for m, d in modalities.items():
            checks.append(_check(split, m, "map50", d["map50"], limit=-margin, tolerance=margin))
        checks.append(_check(split, "overall", "map50_95", overall["map50_95"], limit=0.0, tolerance=margin))
    return {"margin": margin, "splits": splits, "checks": checks}


def _check(
    split: str, scope: str, metric: str, d: dict[str, float], *, limit: float, tolerance: float
) -> dict[str, Any]:
    """Point delta must be >= limit; the paired interval's lower bound must be >= -tolerance.

    "regressed" only when the interval itself says worse (its upper bound below 0): a point estimate past
    the limit with an interval that still holds "no difference" is noise at this size ("unsure": the
    champion stays either way, and the reason says too few images instead of claiming a regression)."""
    if d["delta"] < limit - 1e-12 and d["high"] < 0:
        verdict = "regressed"
    elif d["delta"] < limit - 1e-12 or d["low"] < -tolerance - 1e-12:
        verdict = "unsure"
    else:
        verdict = "ok"
    return {"split": split, "scope": scope, "metric": metric, **d, "verdict": verdict}


_LABEL = {"map50": "mAP@0.5", "map50_95": "mAP@0.5-0.95"}


def decide(
    *,
    mode: str,
    succeeded: bool,
    export: dict[str, Any],
    dropped: int,
    allow_lenient: bool,
    champion: dict[str, Any] | None,
    comparison: dict[str, Any] | None,
    classes: list[str] | None = None,
    dataset_fingerprint: str | None = None,
) -> dict[str, Any]:
    """The decision and its reason in one sentence (pure: every input is a recorded fact).

    A champion is compared only with runs on the same task (the same class names, in order); a run on
    another task under the same output prefix is told so. A champion trained on another version of the
    dataset is still compared (both evaluated on this run's images) and the reason says so."""
    against = champion.get("run_id") if champion else None
    other_task = champion is not None and classes is not None and list(champion.get("classes") or []) != classes
    note = ""
    theirs = champion.get("dataset_fingerprint") if champion else None
    if theirs and dataset_fingerprint and theirs != dataset_fingerprint and not other_task:
        note = (
            f" The champion was trained on another version of the dataset (fingerprint {str(theirs)[:12]}, this "
            f"run {dataset_fingerprint[:12]}); both models were evaluated on this run's images."
        )

    def out(promote: bool, reason: str, forced: bool = False) -> dict[str, Any]:
        return {
            "decision": "promote" if promote else "keep",
            "forced": forced,
            "reason": reason + (note if champion is not None and comparison is not None else ""),
            "other_task": other_task,
            "compared_against": against,
            "mode": mode,
            "comparison": comparison,
        }

    if mode == "never":
        return out(False, "Not promoted: POGONA_PROMOTE=never.")
    if mode == "always":
        return out(True, "Promoted by force (POGONA_PROMOTE=always), whatever the comparison says.", forced=True)
    if not succeeded:
        return out(False, "Not promoted: the run did not succeed.")
    # An export check on a model that predicts nothing is not meaningful (0 vs 0): it neither verifies nor
    # blocks; such a model is stopped by the final verdict (POGONA_MIN_FINAL_MAP50) before it gets here.
    if export and export.get("meaningful") is not False and not export.get("verified"):
        return out(
            False,
            f"Not promoted: the ONNX export differs from best.pt by {export.get('max_abs_delta_map50', 0):.3f} "
            f"mAP@0.5, more than the tolerance {export.get('tolerance', 0):.3f}.",
        )
    if dropped and not allow_lenient:
        return out(
            False,
            f"Not promoted: the dataset lost {dropped} images to lenient validation "
            "(set POGONA_PROMOTE_LENIENT=true to allow it).",
        )
    if champion is None:
        return out(True, "Promoted: the first successful run becomes champion.")
    if other_task:
        return out(
            False,
            f"Not promoted: the champion {against} detects other classes "
            f"({', '.join(champion.get('classes') or []) or 'none recorded'}; this run: {', '.join(classes or [])}), "
            "so it is another task: give this task its own POGONA_OUTPUT_URI, or POGONA_PROMOTE=always to "
            "replace that champion.",
        )
    if comparison is None:
        return out(False, f"Not promoted: the champion {against} could not be evaluated on this run's data.")
    checks = comparison["checks"]
    regressed = [c for c in checks if c["verdict"] == "regressed"]
    if regressed:
        worst = min(regressed, key=lambda c: c["delta"])
        return out(
            False,
            f"Not promoted: {worst['scope']} {_LABEL[worst['metric']]} on {worst['split']} is "
            f"{-worst['delta']:.3f} below the champion {against} ({worst['delta']:+.3f}, 95% interval "
            f"{worst['low']:+.3f} to {worst['high']:+.3f}; margin {comparison['margin']:.3f}).",
        )
    unsure = [c for c in checks if c["verdict"] == "unsure"]
    if unsure:
        c = min(unsure, key=lambda c: c["low"])
        n = comparison["splits"][c["split"]]["images"]
        return out(
            False,
            f"Not promoted: too few images to tell ({n} in {c['split']}): {c['scope']} {_LABEL[c['metric']]} "
            f"differs by {c['delta']:+.3f} but its 95% interval {c['low']:+.3f} to {c['high']:+.3f} reaches "
            f"below -{comparison['margin']:.3f}; the champion {against} stays.",
        )
    return out(
        True,
        f"Promoted: not worse than the champion {against} with 95% confidence on every modality "
        f"(lowest bound {min(c['low'] for c in checks):+.3f}, margin {comparison['margin']:.3f}).",
    )


def pointer_for(manifest: dict[str, Any], out: S3Path, imgsz: int) -> dict[str, Any]:
    """What champion.json says: where the deployable model is, its checksums and its scores."""
    promotion = manifest.get("promotion") or {}
    val = (manifest.get("evaluation") or {}).get("val", {}).get("overall", {})
    art = manifest.get("artifacts") or {}
    onnx = "weights/best.onnx" in art
    return {
        "run_id": manifest["run_id"],
        "manifest": (out / "manifest.json").uri,
        "weights": (out / "weights/best.pt").uri,
        "weights_sha256": art.get("weights/best.pt", {}).get("sha256"),
        "onnx": (out / "weights/best.onnx").uri if onnx else None,
        "onnx_sha256": art["weights/best.onnx"]["sha256"] if onnx else None,
        "metrics": {k: val.get(k) for k in ("map50", "map50_95")} | {"ci": val.get("ci", {})},
        "classes": manifest.get("classes"),
        "dataset_fingerprint": (manifest.get("dataset") or {}).get("fingerprint"),
        "headline": manifest.get("metrics"),  # evaluation/headline.Headline.as_dict(): best.pt on val
        "imgsz": imgsz,
        "forced": bool(promotion.get("forced")),
        "reason": promotion.get("reason"),
        "previous": promotion.get("compared_against"),
        "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def promote(client: Any, output_uri: str, manifest: dict[str, Any], imgsz: int) -> bool:
    """After the manifest: move champion.json to this run, only if it still names the champion we compared
    with (compare-and-swap). Reads only the manifest, so a retry after a kill between the manifest and the
    swap finishes it. Returns whether this run won."""
    promotion = manifest.get("promotion") or {}
    if manifest.get("status") != "succeeded" or promotion.get("decision") != "promote":
        return False
    run_id, against = str(manifest["run_id"]), promotion.get("compared_against")
    new = pointer_for(manifest, S3Path.parse(output_uri) / run_id, imgsz)
    lost: list[str] = []

    def swap(current: dict[str, Any] | None) -> dict[str, Any] | None:
        holder = current.get("run_id") if current else None
        if holder == run_id:
            return None  # a retry after the swap already happened
        if holder != against and not promotion.get("forced"):
            lost.append(str(holder))
            return None
        return new

    won = pointers.update(client, champion_path(output_uri), swap) is not None
    if won:
        log.info("champion moved", champion=run_id, previous=against)
    elif lost:  # the manifest keeps the decision made against `against`; champion.json is the authority
        log.warning("not promoted after all: another run became champion first", champion=lost[0], compared=against)
    return won


def report_lines(promotion: dict[str, Any]) -> list[str]:
    if not promotion:
        return []
    verdict = "PROMOTED" if promotion["decision"] == "promote" else "NOT PROMOTED"
    if promotion.get("forced"):
        verdict += " (forced)"
    out = ["## Promotion", "", f"**{verdict}**. {promotion['reason']}", ""]
    comparison = promotion.get("comparison")
    if comparison:
        out += [
            f"Champion `{promotion.get('compared_against')}` and this run, both evaluated here on this run's "
            "images; Δ = this run - champion, with the paired-bootstrap 95% interval.",
            "",
            "| Split | Scope | Metric | Champion | This run | Δ (95% interval) | Check |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in comparison["checks"]:
            out.append(
                f"| {c['split']} | {c['scope']} | {_LABEL[c['metric']]} | {c['champion']:.3f} | "
                f"{c['challenger']:.3f} | {c['delta']:+.3f} ({c['low']:+.3f} to {c['high']:+.3f}) | {c['verdict']} |"
            )
        for split, s in comparison["splits"].items():
            d = s["overall"]["map50"]
            out.append(
                f"| {split} | overall | mAP@0.5 | {d['champion']:.3f} | {d['challenger']:.3f} | "
                f"{d['delta']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f}) | (info) |"
            )
        out.append("")
    return out
