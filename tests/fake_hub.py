"""A local stand-in for the part of the Hugging Face Hub HTTP API that huggingface_hub's
whoami / create_repo / upload_folder use, so --push_to_hub is tested end to end offline.

Endpoints (as the installed client calls them):
  GET  /api/whoami-v2                                   -> the user, if the bearer token is right
  POST /api/repos/create                                -> 200 new repo, 409 if it exists
  GET  /api/models/{ns}/{name}[/revision/{rev}]         -> repo info (client falls back to it)
  POST /api/validate-yaml                               -> parses the model card YAML
  POST /api/models/{ns}/{name}/preupload/{rev}          -> "lfs" or "regular" per file
  POST /{ns}/{name}.git/info/lfs/objects/batch          -> basic-transfer upload + verify actions
  PUT  /lfs-upload/{oid}                                 -> stores the object, checks its sha256
  POST /lfs-verify/{oid}                                 -> 200 if the object arrived
  POST /api/models/{ns}/{name}/commit/{rev}             -> NDJSON: header, file (base64), lfsFile (oid)

With lfs_policy="lfs" binary files (by suffix, NUL bytes in the sample, or size) are LFS, as on the
real Hub; "regular" answers every file as an inline git blob. The server binds 127.0.0.1 on a free
port and shuts itself down after max_seconds even if a test forgets to stop it.
"""

import base64
import hashlib
import http.server
import json
import re
import threading
import time
import urllib.parse

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".png", ".jpg", ".jpeg", ".webp", ".msgpack",
                ".h5", ".onnx", ".npy", ".npz", ".gz", ".zip", ".tar")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024


class FakeHub:
    def __init__(self, token, user="fake-user", lfs_policy="lfs", max_seconds=300):
        self.token = token
        self.user = user
        self.lfs_policy = lfs_policy
        self.max_seconds = max_seconds
        self.repos = {}  # repo_id -> {"files": {path: bytes}, "commits": [summary, ...]}
        self.lfs_objects = {}  # sha256 hex -> bytes
        self.requests = []  # (method, path, authorized)
        self.yaml_checked = []
        self.lock = threading.Lock()
        self._server = None
        self._thread = None
        self._watchdog = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint(self):
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        self._watchdog = threading.Timer(self.max_seconds, self.stop)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def stop(self):
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ queries for tests

    def files(self, repo_id):
        return dict(self.repos[repo_id]["files"])

    def upload_mode(self, path, size, sample):
        if self.lfs_policy == "regular" or size == 0:
            return "regular"
        if path.lower().endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD or b"\0" in sample:
            return "lfs"
        return "regular"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub = None  # set on a subclass per server

    def log_message(self, *args):  # quiet: pytest shows failures, not every request
        pass

    # ------------------------------------------------------------------ plumbing

    def _body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status, payload=None, headers=None):
        data = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status, message):
        self._reply(status, {"error": message}, headers={"X-Error-Message": message})

    def _authorized(self):
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _route(self, method):
        path = urllib.parse.urlsplit(self.path).path
        authorized = self._authorized()
        with self.hub.lock:
            self.hub.requests.append((method, path, authorized))
        body = self._body()
        # LFS object transfer: pre-signed URLs, no Authorization header (like S3).
        if method == "PUT" and path.startswith("/lfs-upload/"):
            return self._lfs_put(path.rsplit("/", 1)[1], body)
        if not authorized:
            return self._error(401, "Invalid credentials in Authorization header")
        if method == "GET" and path == "/api/whoami-v2":
            return self._reply(200, {"type": "user", "name": self.hub.user, "fullname": "Fake User",
                                     "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}"))
        if method == "POST" and path.startswith("/lfs-verify/"):
            oid = path.rsplit("/", 1)[1]
            return self._reply(200 if oid in self.hub.lfs_objects else 404, {})
        match = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if method == "POST" and match:
            return self._lfs_batch(match.group(1), json.loads(body))
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if method == "POST" and match:
            repo_id = match.group(1)
            if repo_id not in self.hub.repos:
                return self._error(404, f"Repository not found: {repo_id}")
            if match.group(2) == "preupload":
                return self._preupload(repo_id, json.loads(body))
            return self._commit(repo_id, body)
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(/revision/[^/]+)?", path)
        if method == "GET" and match:
            repo_id = match.group(1)
            if repo_id not in self.hub.repos:
                return self._error(404, f"Repository not found: {repo_id}")
            repo = self.hub.repos[repo_id]
            return self._reply(200, {"id": repo_id, "modelId": repo_id, "sha": repo["sha"], "private": False,
                                     "siblings": [{"rfilename": p} for p in sorted(repo["files"])]})
        return self._error(404, f"fake hub does not implement {method} {path}")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    # ------------------------------------------------------------------ endpoints

    def _create_repo(self, payload):
        namespace = payload.get("organization") or self.hub.user
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.hub.endpoint}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._reply(409, {"error": "You already created this model repo", "url": url})
            self.hub.repos[repo_id] = {"files": {}, "commits": [], "sha": "0" * 40}
        return self._reply(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload):
        import yaml

        content = payload.get("content", "")
        self.hub.yaml_checked.append(content)
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if not match:
            return self._reply(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            yaml.safe_load(match.group(1))
        except yaml.YAMLError as err:
            return self._reply(400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []})
        return self._reply(200, {"errors": [], "warnings": []})

    def _preupload(self, repo_id, payload):
        files = []
        for item in payload["files"]:
            sample = base64.b64decode(item.get("sample", ""))
            files.append({"path": item["path"], "uploadMode": self.hub.upload_mode(item["path"], item["size"], sample),
                          "shouldIgnore": False, "oid": None})
        return self._reply(200, {"files": files, "commitOid": self.hub.repos[repo_id]["sha"]})

    def _lfs_batch(self, repo_id, payload):
        if repo_id not in self.hub.repos:
            return self._error(404, f"Repository not found: {repo_id}")
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            return self._error(422, "fake hub supports only basic LFS uploads")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.endpoint}/lfs-upload/{oid}", "header": {}},
                    "verify": {"href": f"{self.hub.endpoint}/lfs-verify/{oid}", "header": {}},
                }
            objects.append(entry)
        return self._reply(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, oid, body):
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "uploaded content does not match its sha256")
        with self.hub.lock:
            self.hub.lfs_objects[oid] = body
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _commit(self, repo_id, body):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, "commit payload must start with a header line")
        staged = {}
        deleted = []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, f"unsupported encoding {value.get('encoding')!r}")
                staged[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None:
                    return self._error(400, f"LFS object for {value['path']} was never uploaded")
                staged[value["path"]] = data
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return self._error(400, f"unknown commit operation {key!r}")
        sha = hashlib.sha1(body + str(time.time()).encode()).hexdigest()
        with self.hub.lock:
            repo = self.hub.repos[repo_id]
            for path in deleted:
                repo["files"] = {p: d for p, d in repo["files"].items() if p != path and not p.startswith(path.rstrip("/") + "/")}
            repo["files"].update(staged)
            repo["commits"].append(lines[0]["value"].get("summary"))
            repo["sha"] = sha
        return self._reply(200, {"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                                 "pullRequestUrl": None, "success": True})
