"""mitmproxy addon: records every S3 request that passes the reverse proxy, in completion order.

One line per answered request on stdout: "RECORD <status> <METHOD> <path>?<query>". A PUT without
`partNumber`, or the POST that completes a multipart upload, is the moment an object is written.
"""

from __future__ import annotations

from mitmproxy import http


class Record:
    def response(self, flow: http.HTTPFlow) -> None:
        status = flow.response.status_code if flow.response else 0
        print(f"RECORD {status} {flow.request.method} {flow.request.path}", flush=True)


addons = [Record()]
