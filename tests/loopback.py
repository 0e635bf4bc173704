"""Small loopback HTTP servers for the cost tests: a notification receiver (what apprise's
`json://` posts) and a stand-in for the AWS metadata endpoints (ECS task metadata v4, IMDSv2).

The stand-in is NOT AWS: it answers the documented paths and headers so that the job's client
code runs for real over HTTP; what AWS itself returns can only be checked on AWS.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """Records every POSTed JSON body."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        received = self.messages

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


TOKEN = "stand-in-token"


class MetadataStandIn:
    """ECS task metadata v4 under /ecs and IMDSv2 under /latest, on loopback."""

    def __init__(self, *, launch_type: str = "EC2", instance_type: str = "g6.2xlarge", lifecycle: str = "spot") -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        seen = self.requests
        task = {
            "Cluster": "default",
            "TaskARN": "arn:aws:ecs:us-east-1:111122223333:task/default/abc",
            "LaunchType": launch_type,
            "AvailabilityZone": "us-east-1b",
            "Containers": [],
        }
        container = {"Name": "pogona", "ImageID": "sha256:" + "ab" * 32}
        meta = {"instance-type": instance_type, "instance-life-cycle": lifecycle}

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                seen.append(("PUT", self.path, {k.lower(): v for k, v in self.headers.items()}))
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self._send(200, TOKEN)
                else:
                    self._send(400, "")

            def do_GET(self) -> None:
                seen.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                if self.path == "/ecs/task":
                    self._send(200, json.dumps(task))
                elif self.path == "/ecs":
                    self._send(200, json.dumps(container))
                elif self.path.startswith("/latest/meta-data/"):
                    if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:  # IMDSv2 only: v1 is refused
                        self._send(401, "")
                        return
                    key = self.path.removeprefix("/latest/meta-data/")
                    self._send(200, meta[key]) if key in meta else self._send(404, "")
                else:
                    self._send(404, "")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


@contextmanager
def metadata(**kwargs: Any) -> Iterator[MetadataStandIn]:
    m = MetadataStandIn(**kwargs)
    try:
        yield m
    finally:
        m.close()
