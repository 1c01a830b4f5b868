"""A stand-in for the Hugging Face hub's upload API, on a local port, recording every call.

The hub cannot be reached from the test machines, so trainer.publish's upload is tested against
this server through HF_ENDPOINT. It answers the calls huggingface_hub 2.4's `create_repo` and
`create_commit` make (read from its hf_api.py and _commit_api.py):

    POST /api/repos/create                        -> {"url": ...}
    POST /api/validate-yaml                       -> no errors (the real hub checks the card here)
    POST /api/models/{repo}/preupload/{revision}  -> every file "regular" (sent inline, base64)
    POST /api/models/{repo}/commit/{revision}     -> the ndjson commit: files stored, an oid back

Anything else is recorded and answered 404, so a test sees calls it did not expect, except
huggingface_hub's best-effort, unauthenticated fetch of its agent registry (`GET
/api/agent-harnesses`, swallowed on any error). Files are all declared regular, so the LFS / Xet
transfer of large files is not exercised here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TELEMETRY = ("/api/agent-harnesses",)
REPO_CALL = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<call>preupload|commit)/(?P<rev>[^/?]+)"
)


@dataclass
class Call:
    method: str
    path: str
    authorization: str | None
    body: Any


@dataclass
class RecordingHub:
    url: str = ""
    calls: list[Call] = field(default_factory=list)
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo -> create payload
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo -> path -> bytes
    unknown: list[str] = field(default_factory=list)  # calls answered 404

    def paths(self) -> list[str]:
        return [f"{call.method} {call.path}" for call in self.calls]

    def api_calls(self) -> list[Call]:
        """The calls that do the work (telemetry left out)."""
        return [call for call in self.calls if call.path not in TELEMETRY]


def make_handler(hub: RecordingHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet test output
            pass

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            path = self.path.split("?")[0]
            if self.headers.get("Content-Type", "").startswith("application/x-ndjson"):
                body = [json.loads(line) for line in raw.splitlines() if line.strip()]
            else:
                body = json.loads(raw) if raw else None
            hub.calls.append(Call("POST", path, self.headers.get("Authorization"), body))
            self.answer(path, body)

        def do_GET(self) -> None:  # noqa: N802
            hub.calls.append(Call("GET", self.path, self.headers.get("Authorization"), None))
            if self.path not in TELEMETRY:
                hub.unknown.append(f"GET {self.path}")
            self.reply(404, {"error": "not in the stand-in"})

        def answer(self, path: str, body: Any) -> None:
            if path == "/api/repos/create":
                repo = f"{body['organization']}/{body['name']}"
                hub.repos[repo] = body
                return self.reply(200, {"url": f"{hub.url}/{repo}"})
            if path == "/api/validate-yaml":
                return self.reply(200, {"errors": [], "warnings": []})
            match = REPO_CALL.match(path)
            if match and match["repo"] in hub.repos and match["call"] == "preupload":
                files = [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                    for f in body["files"]
                ]
                return self.reply(200, {"files": files})
            if match and match["repo"] in hub.repos and match["call"] == "commit":
                stored = hub.files.setdefault(match["repo"], {})
                for line in body[1:]:
                    value = line["value"]
                    stored[value["path"]] = base64.b64decode(value["content"])
                oid = hashlib.sha1(json.dumps(body).encode()).hexdigest()
                url = f"{hub.url}/{match['repo']}/commit/{oid}"
                return self.reply(200, {"commitUrl": url, "commitOid": oid, "success": True})
            hub.unknown.append(f"POST {path}")
            self.reply(404, {"error": f"{path} is not in the stand-in"})

        def reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@contextmanager
def recording_hub():
    hub = RecordingHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
