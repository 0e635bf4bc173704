"""mitmproxy addon for the crash-point harness: holds ONE chosen request forever, so the test can
kill -9 the job at exactly that moment (the request never reaches the server).

Configured by environment variables of the mitmdump process:
  PAUSE_MATCH  regex on "METHOD path?query" (e.g. "^PUT .*/checkpoint/full/pointer\\.json")
  PAUSE_NTH    pause the Nth matching request (1-based, default 1); earlier ones pass
  PAUSE_RELEASE  a file path: the held request is forwarded once that file exists (the test then
               continues the stopped job); without it the request is held until the proxy dies
  PAUSE_CONTROL  a file path instead of PAUSE_MATCH/PAUSE_NTH, for one proxy serving many legs: a JSON
               object {"leg": K, "match": ..., "nth": N} that the test rewrites before each leg; the
               count of matches starts again with each leg
Prints "PAUSED <leg> <METHOD> <path>" when it holds one (leg 0 without PAUSE_CONTROL), and
"PASS <METHOD> <path>" for every request it forwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import re

from mitmproxy import http


class Pause:
    def __init__(self) -> None:
        self.control = os.environ.get("PAUSE_CONTROL")
        self.leg = 0
        pattern = os.environ.get("PAUSE_MATCH", "")
        self.match = re.compile(pattern) if pattern else None
        self.nth = int(os.environ.get("PAUSE_NTH", "1"))
        self.seen = 0
        self._stamp: float | None = None

    def _reload(self) -> None:
        """The leg's rule from PAUSE_CONTROL, read again whenever the file changed."""
        if not self.control or not os.path.exists(self.control):
            return
        stamp = os.stat(self.control).st_mtime_ns
        if stamp == self._stamp:
            return
        self._stamp = stamp
        rule = json.loads(open(self.control).read())  # noqa: SIM115 - read once, closed by the GC at once
        if rule["leg"] != self.leg:
            self.leg, self.seen = rule["leg"], 0
        self.match, self.nth = re.compile(rule["match"]), int(rule.get("nth", 1))

    async def request(self, flow: http.HTTPFlow) -> None:
        self._reload()
        line = f"{flow.request.method} {flow.request.path}"
        if self.match is not None and self.match.search(line):
            self.seen += 1
            if self.seen == self.nth:
                print(f"PAUSED {self.leg} {line}", flush=True)
                release = os.environ.get("PAUSE_RELEASE")
                deadline = asyncio.get_running_loop().time() + 24 * 3600
                while asyncio.get_running_loop().time() < deadline:  # until released, or the test kills it
                    await asyncio.sleep(0.1)
                    if release and os.path.exists(release):
                        print(f"RELEASED {line}", flush=True)
                        break
                else:
                    return
        print(f"PASS {line}", flush=True)


addons = [Pause()]
