"""mitmproxy addon: a reverse proxy in front of SeaweedFS that fails a share of S3 requests.

Configured by environment variables of the mitmdump process:
  FAULTS       comma list of kind:share, kinds 503 (SlowDown), 500 (InternalError), reset, slow,
               301 / 307 (the bucket lives elsewhere), 301bare (a 301 with no region header),
               400 (InvalidRequest), flip (one byte of a response body changed),
               conflict (a listing naming keys `<prefix>a` and `<prefix>a/b`, as AWS S3 can hold)
  FAULTS_MATCH regex on "METHOD path?query" selecting which requests may fail (default: all)
  FAULTS_SEED  seed of the deterministic choice; FAULTS_SLOW_S delay of a slow response
  FAULTS_MAX   stop injecting after this many faults (default: no limit)
  FAULTS_ONCE  "1": at most one fault per distinct "METHOD path" (each object's first read fails once)
Every injected fault is printed as one line "FAULT <kind> <METHOD> <path>".
"""

from __future__ import annotations

import asyncio
import os
import random
import re

from mitmproxy import http

_XML = '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'


class Faults:
    def __init__(self) -> None:
        self.rules = [
            (kind, float(share)) for kind, share in (r.split(":") for r in os.environ.get("FAULTS", "").split(",") if r)
        ]
        self.match = re.compile(os.environ.get("FAULTS_MATCH", ".*"))
        self.rng = random.Random(int(os.environ.get("FAULTS_SEED", "0")))
        self.slow_s = float(os.environ.get("FAULTS_SLOW_S", "2"))
        self.left = int(os.environ.get("FAULTS_MAX", "-1"))
        self.once = os.environ.get("FAULTS_ONCE") == "1"
        self.faulted: set[str] = set()

    def _pick(self, flow: http.HTTPFlow) -> str | None:
        line = f"{flow.request.method} {flow.request.path}"
        if self.left == 0 or not self.match.search(line) or (self.once and line in self.faulted):
            return None
        roll, edge = self.rng.random(), 0.0
        for kind, share in self.rules:
            edge += share
            if roll < edge:
                if kind != "flip":  # a flip counts once it is applied (a 404 has no body to flip)
                    self.left -= 1
                    self.faulted.add(line)
                return kind
        return None

    async def request(self, flow: http.HTTPFlow) -> None:
        kind = self._pick(flow)
        if kind is None:
            return
        if kind != "flip":
            print(f"FAULT {kind} {flow.request.method} {flow.request.path}", flush=True)
        if kind == "503":
            body = _XML.format(code="SlowDown", message="Please reduce your request rate.")
            flow.response = http.Response.make(503, body, {"Content-Type": "application/xml"})
        elif kind == "500":
            body = _XML.format(code="InternalError", message="We encountered an internal error.")
            flow.response = http.Response.make(500, body, {"Content-Type": "application/xml"})
        elif kind == "reset":
            flow.kill()
        elif kind == "slow":
            await asyncio.sleep(self.slow_s)
        elif kind == "400":
            body = _XML.format(code="InvalidRequest", message="The request is not valid.")
            flow.response = http.Response.make(400, body, {"Content-Type": "application/xml"})
        elif kind == "301bare":  # the bucket lives elsewhere, and the server does not say where
            flow.response = http.Response.make(301, b"", {})
        elif kind in ("301", "307"):
            code = "PermanentRedirect" if kind == "301" else "TemporaryRedirect"
            body = _XML.format(
                code=code, message="The bucket you are attempting to access must be addressed elsewhere."
            )
            headers = {"Content-Type": "application/xml", "x-amz-bucket-region": "eu-west-1"}
            flow.response = http.Response.make(int(kind), body, headers)
        elif kind == "conflict":
            prefix = flow.request.query.get("prefix", "")
            entries = "".join(
                f"<Contents><Key>{prefix}{key}</Key><LastModified>2026-11-25T10:00:00.000Z</LastModified>"
                f'<ETag>"{"0" * 32}"</ETag><Size>1</Size><StorageClass>STANDARD</StorageClass></Contents>'
                for key in ("a", "a/b")
            )
            body = (
                '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>b</Name>'
                f"<Prefix>{prefix}</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>"
                f"<IsTruncated>false</IsTruncated>{entries}</ListBucketResult>"
            )
            flow.response = http.Response.make(200, body, {"Content-Type": "application/xml"})
        elif kind == "flip":
            flow.metadata["flip"] = True  # done on the response, same length: only a content check can tell

    def response(self, flow: http.HTTPFlow) -> None:
        body = flow.response.content if flow.response is not None else None
        ok = flow.response is not None and flow.response.status_code == 200  # an object's body, not an error
        line = f"{flow.request.method} {flow.request.path}"
        fresh = not self.once or line not in self.faulted
        if flow.metadata.get("flip") and ok and flow.response is not None and body and fresh:
            flow.response.content = bytes([body[0] ^ 0xFF]) + body[1:]
            self.left -= 1
            if self.once:
                self.faulted.add(line)
            print(f"FAULT flip {line}", flush=True)


addons = [Faults()]
