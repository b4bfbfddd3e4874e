"""Real servers on 127.0.0.1 for the object-storage tests: a plain HTTP file server (the handler behind
`python -m http.server`, optionally dropping connections mid-file) and moto's S3-compatible server."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import threading
from collections import Counter
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ShardHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; counts GETs per path; the first `drops[path]` GETs of a path send the full
    Content-Length but only half the bytes, then close the connection."""

    gets: Counter
    drops: dict

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self.gets[self.path] += 1
        if self.drops.get(self.path, 0) > 0 or self.drops.get("*", 0) and self.path.endswith(".tar"):
            if self.path in self.drops:
                self.drops[self.path] -= 1
            data = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        super().do_GET()


@contextlib.contextmanager
def http_server(directory: Path, drops: dict | None = None):
    """(base URL, GET counter, drops) of a threaded HTTP server over `directory`, stopped on exit."""
    gets: Counter = Counter()
    drops = {} if drops is None else drops
    handler = type("Handler", (ShardHandler,), {"gets": gets, "drops": drops})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", gets, drops
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server():
    """moto's S3 server on 127.0.0.1; yields (endpoint URL, environment for clients). The environment is also set
    in this process (boto3, s3fs and botocore read AWS_ENDPOINT_URL) and restored on exit."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = S3_ENV | {"AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint, env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def upload_tree(bucket: str, prefix: str, root: Path) -> None:
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}", Body=path.read_bytes())
