"""A local stand-in for the Hugging Face Hub API: just the endpoints huggingface_hub's create_repo and
upload_folder call (repos/create, validate-yaml for README.md, preupload, commit as ndjson with base64
files). Committed files are written under STORE/<owner>/<name>/; every request is logged to
STORE/requests.log; any other endpoint answers 404, so a test sees an unexpected call. `--refuse-create` answers 403 to repos/create.

    python tests/hub_stand_in.py PORT STORE [--refuse-create]
"""

from __future__ import annotations

import base64
import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PREUPLOAD = re.compile(r"^/api/models/([^/]+/[^/]+)/preupload/([^/?]+)")
COMMIT = re.compile(r"^/api/models/([^/]+/[^/]+)/commit/([^/?]+)")


def _validate_card(content: str) -> tuple[int, dict]:
    """(status, body) of validate-yaml: 400 when the README's front matter is not a YAML mapping."""
    import yaml

    parts = content.split("---\n")
    try:
        meta = yaml.safe_load(parts[1]) if content.startswith("---\n") and len(parts) > 2 else None
    except yaml.YAMLError as exc:
        return 400, {"errors": [{"message": str(exc)}]}
    if not isinstance(meta, dict):
        return 400, {"errors": [{"message": "no YAML front matter"}]}
    return 200, {"errors": [], "warnings": []}


class Handler(BaseHTTPRequestHandler):
    store: Path
    refuse_create = False

    def log_message(self, *args) -> None:  # quiet: the test reads requests.log
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _log(self, body: bytes) -> None:
        with open(self.store / "requests.log", "a", encoding="utf-8") as f:
            f.write(json.dumps({"method": self.command, "path": self.path,
                                "auth": self.headers.get("authorization"), "bytes": len(body)}) + "\n")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._log(body)
        base = f"http://{self.headers['Host']}"
        if self.path.startswith("/api/repos/create"):
            if self.refuse_create:
                return self._reply(403, {"error": "You don't have the rights to create a model under this namespace"})
            req = json.loads(body)
            repo = f"{req.get('organization') or 'me'}/{req['name']}"
            (self.store / repo).mkdir(parents=True, exist_ok=True)
            (self.store / repo / ".repo.json").write_text(json.dumps(req))
            return self._reply(200, {"url": f"{base}/{repo}"})
        if self.path.startswith("/api/validate-yaml"):  # the model card's front matter, checked before upload
            return self._reply(*_validate_card(json.loads(body)["content"]))
        if m := PREUPLOAD.match(self.path):
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if m := COMMIT.match(self.path):
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    target = self.store / m[1] / item["value"]["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(item["value"]["content"]))
            return self._reply(200, {"commitUrl": f"{base}/{m[1]}/commit/{'0' * 40}", "commitOid": "0" * 40})
        self._reply(404, {"error": f"the stand-in does not implement POST {self.path}"})

    def do_GET(self) -> None:
        self._log(b"")
        self._reply(404, {"error": f"the stand-in does not implement GET {self.path}"})

    do_HEAD = do_GET


def main() -> None:
    port, store = int(sys.argv[1]), Path(sys.argv[2])
    store.mkdir(parents=True, exist_ok=True)
    Handler.store, Handler.refuse_create = store, "--refuse-create" in sys.argv
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    (store / "ready").write_text("ready")
    server.serve_forever()


if __name__ == "__main__":
    main()
