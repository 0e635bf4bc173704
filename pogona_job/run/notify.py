"""One message per terminal state, through apprise (Slack, Teams, Discord, email, SNS, ntfy,
`json://` webhooks ...): POGONA_NOTIFY holds one or more apprise URLs.

States: succeeded (the headline: best.pt on val with its interval and epoch, champion decision when
known), final-verdict-failed (best.pt below POGONA_MIN_FINAL_MAP50), failed (the sentence, exit code, phase),
partial (the budget's reason), gate failure (the failed criteria: the signature of a model that
is not learning), interrupted-and-will-resume (only from the second preemption on, so spot churn
does not spam). Every message carries the report and manifest links and the cost line.
A notification never fails the job: errors are logged and the job goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pogona_job.config import notify_urls
from pogona_job.errors import SanityFailed
from pogona_job.logs import get_logger

log = get_logger()


@dataclass
class Message:
    state: str  # succeeded | partial | failed | final-verdict-failed | gate-failed | interrupted
    title: str
    body: str
    kind: str  # apprise NotifyType value: success | warning | failure | info


def compose(job: Any) -> Message | None:
    """The message for how this attempt ended, or None when nobody should be told."""
    rec = job.record
    acc = getattr(rec, "accounting", None) or {}
    base = f"{job.out.uri}"
    links = [f"Report: {base}/report.md", f"Manifest: {base}/manifest.json"]
    cost = [f"Cost: {acc['summary']}"] if acc.get("summary") else []
    name = f"pogona-train run {job.run_id}"
    head = getattr(rec, "headline", None)
    headline = [f"Model: {head.line()}"] if head is not None else []
    if rec.status == "succeeded" or rec.status == "partial":
        lines = headline or ["Model: not evaluated (no best.pt evaluation on val)"]
        if rec.status == "succeeded":
            lines.append(f"Champion: {_champion_text(rec.promotion)}")
            return Message("succeeded", f"{name}: succeeded", "\n".join([*lines, *cost, *links]), "success")
        reason = (acc.get("budget") or {}).get("stopped") or rec.failure or "stopped by its budget"
        lines += [f"Why: {reason}", "Champion: not considered (a partial run is never champion)"]
        return Message("partial", f"{name}: partial (budget)", "\n".join([*lines, *cost, *links]), "warning")
    if rec.status == "interrupted":
        preemptions = int(acc.get("preemptions", 0))
        if preemptions < 2:
            return None
        lines = [
            f"Preempted {preemptions} times; it will resume from its last checkpoint on the next attempt.",
            f"Phase: {rec.failed_phase or '-'}",
        ]
        return Message("interrupted", f"{name}: interrupted, will resume", "\n".join([*lines, *cost, *links]), "info")
    if rec.failed_phase == "final verdict":
        lines = [f"Why: {rec.failure}", "Exit code: 5, phase: final verdict", *headline]
        lines.append("Champion and latest.json: untouched (a run below the floor is never promoted)")
        return Message(
            "final-verdict-failed",
            f"{name}: failed the final verdict",
            "\n".join([*lines, *cost, *links]),
            "failure",
        )
    if rec.exit_code == SanityFailed.exit_code:
        lines = [f"Why: {rec.failure}", f"Exit code: 5, phase: {rec.failed_phase or 'verdict'}"]
        lines += _signature(rec)
        return Message("gate-failed", f"{name}: sanity gate failed", "\n".join([*lines, *cost, *links]), "failure")
    lines = [f"Why: {rec.failure}", f"Exit code: {rec.exit_code}, phase: {rec.failed_phase or '-'}"]
    return Message("failed", f"{name}: failed", "\n".join([*lines, *cost, *links]), "failure")


def _champion_text(promotion: dict[str, Any]) -> str:
    """The promotion decision and its one-sentence reason (promotion.decide)."""
    if not promotion:
        return "not decided by this run"
    verdict = "promoted" if promotion.get("decision") == "promote" else "not promoted"
    return f"{verdict}: {promotion['reason']}" if promotion.get("reason") else verdict


def _signature(rec: Any) -> list[str]:
    """What the failing gate saw: the watchdog's trip and each failed criterion with its numbers."""
    out: list[str] = []
    if rec.watchdog.get("tripped"):
        out.append(f"Watchdog: {rec.watchdog['tripped']}")
    if rec.verdict is not None:
        for c in rec.verdict.criteria:
            if not c.passed:
                out.append(f"Signature: {c.name}: observed {c.observed}, needs {c.threshold}")
    return out


def send(job: Any) -> bool:
    """Tell POGONA_NOTIFY how this attempt ended; True when every URL took it. Never raises."""
    urls = notify_urls(job.settings.notify)
    if not urls:
        return True
    try:
        message = compose(job)
        if message is None:
            return True
        import apprise

        logging.getLogger("apprise").setLevel(logging.CRITICAL)  # its errors carry the URL (and its token)
        ok = True
        for i, url in enumerate(urls):  # one apprise object per URL: a dead endpoint does not hide the others
            sender = apprise.Apprise()
            if not sender.add(url):
                log.warning("notification URL not understood by apprise", url_index=i, scheme=url.split("://")[0])
                ok = False
                continue
            sent = bool(sender.notify(title=message.title, body=message.body, notify_type=message.kind))
            ok &= sent
            if not sent:
                log.warning("notification not delivered", url_index=i, scheme=url.split("://")[0], state=message.state)
        if ok:
            log.info("notification sent", state=message.state, urls=len(urls))
        return ok
    except Exception as exc:  # a notification must never fail the job
        log.warning("notification failed", reason=f"{type(exc).__name__}: {str(exc)[:200]}")
        return False
