"""A small in-process stand-in for the Hugging Face Hub, for publish tests (no real Hub is reachable here).

It implements the endpoints huggingface_hub 2.x calls for `create_repo` + `upload_folder` (found by reading
hf_api.py / _commit_api.py and logging the requests): POST /api/repos/create, POST /api/validate-yaml,
POST /api/models/{repo}/preupload/{rev}, POST /api/models/{repo}/commit/{rev} (ndjson). Every file is answered
with uploadMode "regular", so contents arrive base64-encoded inside the commit (the real Hub would route large
files through LFS/Xet storage, which this server does not emulate). Requests without the expected bearer token
get 401, like the Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class FakeHub:
    token: str
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo_id -> {"private": bool, "files": {path: bytes}}
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # (method, path, lower-cased headers)
    url: str = ""
    _server: ThreadingHTTPServer | None = None

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    state: FakeHub

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.state.requests.append(("POST", self.path, {k.lower(): v for k, v in self.headers.items()}))
        if self.headers.get("Authorization") != f"Bearer {self.state.token}":
            return self._json(401, {"error": "Invalid credentials in Authorization header"})
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/([^/]+)", path)
        if m and m.group(1) not in self.state.repos:
            return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if m and m.group(2) == "preupload":
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                               "oid": None} for f in files]})
        if m:
            return self._commit(m.group(1), body)
        return self._json(404, {"error": f"not implemented by the fake hub: POST {path}"})

    def do_GET(self) -> None:  # noqa: N802
        self.state.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
        self._json(404, {"error": f"not implemented by the fake hub: GET {self.path}"})

    def _create(self, payload: dict[str, Any]) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.state.repos:
            return self._json(409, {"error": "You already created this model repo", "url": f"{self.state.url}/{repo_id}"})
        self.state.repos[repo_id] = {"private": payload.get("visibility") == "private", "files": {}, "commits": []}
        self._json(200, {"url": f"{self.state.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _commit(self, repo_id: str, body: bytes) -> None:
        repo = self.state.repos[repo_id]
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                repo["commits"].append(item["value"]["summary"])
            elif item["key"] == "file":
                repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            else:
                return self._json(400, {"error": f"fake hub: unsupported commit item {item['key']}"})
        oid = hashlib.sha1(body).hexdigest()
        self._json(200, {"commitUrl": f"{self.state.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})

    def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
