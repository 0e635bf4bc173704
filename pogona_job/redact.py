"""Masking of secrets in any text the job shows or stores: the bottom layer, imported by errors and logs.

The endpoint may carry credentials (`AWS_ENDPOINT_URL_S3=http://user:password@host:port`), and every
library that fails quotes the URL it was given: botocore, obstore, urllib3. So the job masks at the two
places all text leaves through, whoever wrote it: a JobError's sentence (stderr, the log, the manifest,
report.md) and every log line.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

# `scheme://user:password@host` (or `scheme://token@host`): the userinfo is a secret wherever a URL is quoted.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@'\"<>]+@")
_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _known_secrets() -> list[str]:
    """Values that must never be quoted: the endpoint URL's userinfo (raw and decoded) and the AWS secrets."""
    found: list[str] = []
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        try:
            parts = urlsplit(os.environ.get(name) or "")
            userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
        except ValueError:
            continue
        password = userinfo.partition(":")[2]  # the user name alone is no secret (and may be a common word)
        for value in (userinfo, password):
            found += [value, unquote(value)]
    found += [os.environ.get(name) or "" for name in _SECRET_VARIABLES]
    # Longest first, so a password inside a userinfo is not left half masked; short values would mask noise.
    return sorted({v for v in found if len(v) >= 4}, key=len, reverse=True)


def redact(text: str) -> str:
    """The text with every URL's userinfo and every known secret value replaced by `****`.

    Applied to every JobError sentence and every log line, whoever wrote the message (botocore, obstore,
    urllib3 quote the URL they were given, credentials included).
    """
    text = _USERINFO.sub(r"\1****@", text)
    for secret in _known_secrets():
        text = text.replace(secret, "****")
    return text
