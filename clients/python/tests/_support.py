"""Test helpers: a real `keel serve` on loopback, scripted stub HTTP servers, a trapping proxy.

Every wait is bounded in time; every loop in count.
"""

import http.server
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from typing import Callable, List, Optional, Tuple

try:
    import keel_client  # noqa: F401  (installed)
except ImportError:  # running from the source tree without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    import keel_client  # noqa: F401

KEEL_BIN = os.environ.get(
    "KEEL_BIN", os.path.join(os.path.expanduser("~"), ".cache", "keel-target", "release", "keel")
)
# run-tests.sh sets this: a missing binary is then a failure, not a skip.
REQUIRE_SERVER = os.environ.get("KEEL_REQUIRE_SERVER") == "1"

_LISTEN_RE = re.compile(r"listening on (https?)://([0-9.]+):([0-9]+)")


def have_keel() -> bool:
    return os.path.isfile(KEEL_BIN) and os.access(KEEL_BIN, os.X_OK)


def require_keel(test: unittest.TestCase) -> None:
    if not have_keel():
        if REQUIRE_SERVER:
            test.fail(f"KEEL_BIN={KEEL_BIN} is not an executable")
        raise unittest.SkipTest(f"no keel binary at KEEL_BIN={KEEL_BIN}")


_help_cache: dict = {}


def keel_help(*sub: str) -> str:
    """`keel <sub> --help` text ('' when the binary or subcommand is missing)."""
    key = tuple(sub)
    if key not in _help_cache:
        if not have_keel():
            _help_cache[key] = ""
        else:
            try:
                p = subprocess.run(
                    [KEEL_BIN, *sub, "--help"], capture_output=True, text=True, timeout=30
                )
                _help_cache[key] = p.stdout + p.stderr if p.returncode == 0 else ""
            except (OSError, subprocess.TimeoutExpired):
                _help_cache[key] = ""
    return _help_cache[key]


def serve_supports(flag: str) -> bool:
    return flag in keel_help("serve")


class KeelServer:
    """`keel serve --data DIR --listen 127.0.0.1:PORT` as a child process."""

    def __init__(self, data_dir: str, extra_args: Tuple[str, ...] = (), log_dir: Optional[str] = None):
        self.data_dir = data_dir
        self.extra_args = tuple(extra_args)
        self.log_dir = log_dir or data_dir + ".logs"
        os.makedirs(self.log_dir, exist_ok=True)
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.scheme = "http"
        self.starts = 0
        self._drainer: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, port: Optional[int] = None, timeout: float = 60.0) -> "KeelServer":
        """Start (on `port`, default: the previous port, or any free one the first time).
        A restart on the same port retries while the port is still taken (bounded)."""
        want = self.port if port is None else port
        deadline = time.monotonic() + timeout
        last_err = ""
        for _ in range(100):
            err = self._start_once(want, deadline)
            if err is None:
                return self
            last_err = err
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        raise RuntimeError(f"keel serve did not start: {last_err}")

    def _start_once(self, port: int, deadline: float) -> Optional[str]:
        self.starts += 1
        log = open(os.path.join(self.log_dir, f"serve-{self.starts}.log"), "wb")
        cmd = [KEEL_BIN, "serve", "--data", self.data_dir, "--listen", f"127.0.0.1:{port}",
               *self.extra_args]
        # Only the flags given here configure the server: drop any KEEL_* of the caller's
        # environment (e.g. KEEL_AUTH_KEYS, KEEL_LISTEN).
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
        env.setdefault("RUST_LOG", "warn")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env)
        log.close()
        buf = b""
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
                m = _LISTEN_RE.search(buf.decode("utf-8", "replace"))
                if m:
                    self.scheme, self.port = m.group(1), int(m.group(3))
                    self.proc = proc
                    self._drainer = threading.Thread(target=_drain, args=(proc.stdout,), daemon=True)
                    self._drainer.start()
                    return None
            elif proc.poll() is not None:
                break
        proc.kill()
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]
        try:
            with open(os.path.join(self.log_dir, f"serve-{self.starts}.log"), "rb") as f:
                tail = f.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            tail = ""
        return f"exit={proc.returncode} stdout={buf[-500:]!r} log tail: {tail}"

    def kill(self) -> None:
        """SIGKILL: no drain, no clean close of the store."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None and self.proc.poll() is not None and self.proc.stdout is not None:
            if self._drainer is not None:
                self._drainer.join(5)
            self.proc.stdout.close()

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGTERM, then SIGKILL after `timeout`. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reap()
        return self.proc.returncode

    def log_text(self) -> str:
        out = []
        for name in sorted(os.listdir(self.log_dir)):
            with open(os.path.join(self.log_dir, name), "rb") as f:
                out.append(f"--- {name}\n" + f.read()[-4000:].decode("utf-8", "replace"))
        return "\n".join(out)


def _drain(pipe) -> None:  # type: ignore[no-untyped-def]
    try:
        while pipe.read(4096):
            pass
    except (OSError, ValueError):
        pass


class TempDir:
    def __init__(self, prefix: str = "keel-py-test-"):
        self.path = tempfile.mkdtemp(prefix=prefix)

    def sub(self, name: str) -> str:
        return os.path.join(self.path, name)

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------------- stub HTTP server

class QuietHTTPServer(http.server.ThreadingHTTPServer):
    """A threading server that does not print the client-went-away tracebacks stubs provoke."""

    daemon_threads = True

    def handle_error(self, request, client_address):  # noqa: D401
        pass


class StubResponse:
    def __init__(self, status: int = 200, body=None, headers=None, drop: bool = False,
                 delay: float = 0.0, raw: Optional[bytes] = None):
        self.status = status
        self.body = body
        self.headers = dict(headers or {})
        self.drop = drop  # close the connection without any answer
        self.delay = delay
        self.raw = raw  # raw bytes written as the answer (then the connection is closed)


class StubServer:
    """A loopback HTTP server answering from a script of StubResponse (the last one repeats).
    Records every request as (time, method, path, headers, body)."""

    def __init__(self, script: List[StubResponse], ssl_context=None):
        self.script = list(script)
        self.requests: List[Tuple[float, str, str, dict, bytes]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # noqa: D401 - quiet
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                with stub.lock:
                    stub.requests.append((time.monotonic(), self.command, self.path,
                                          {k.lower(): v for k, v in self.headers.items()}, body))
                    idx = len(stub.requests) - 1
                    resp = stub.script[min(idx, len(stub.script) - 1)]
                if resp.delay:
                    time.sleep(resp.delay)
                if resp.drop:
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if resp.raw is not None:
                    self.wfile.write(resp.raw)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                data = resp.body
                if callable(data):
                    data = data(body)
                if not isinstance(data, (bytes, bytearray)):
                    data = json.dumps(data).encode()
                self.send_response(resp.status)
                headers = dict(resp.headers)
                self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _handle
            do_POST = _handle

        self.httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------- trapping TCP proxy

def _read_http_message(sock: socket.socket, deadline: float) -> bytes:
    """Read one HTTP/1.1 message with a Content-Length body (or none) from `sock`."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("eof before the head ended")
        buf += chunk
        if len(buf) > 1 << 20:
            raise ConnectionError("head too long")
    head, _, rest = buf.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    n = int(m.group(1)) if m else 0
    while len(rest) < n:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("eof in the body")
        rest += chunk
    return head + b"\r\n\r\n" + rest


class TrapProxy:
    """A TCP proxy to 127.0.0.1:`backend_port`. The FIRST request it sees is trapped:

    - trap="after_response": forwarded, the backend's full answer is read (so the request was
      committed and fsynced), then `on_trap()` runs (the test SIGKILLs the server) and the
      client's connection is closed WITHOUT the answer;
    - trap="after_request": forwarded, then `on_trap()` runs at once (the server may or may not
      have committed it), and the client's connection is closed without an answer.

    Every later connection is piped through (closed at once when the backend refuses).
    """

    def __init__(self, backend_port: int, trap: str, on_trap: Callable[[], None]):
        assert trap in ("after_response", "after_request")
        self.backend_port = backend_port
        self.trap = trap
        self.on_trap = on_trap
        self.trapped = threading.Event()
        self.trapped_response: Optional[bytes] = None
        self.connections = 0
        self._armed = True
        self._lock = threading.Lock()
        self._stop = False
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.lsock.settimeout(0.1)
        self.port = self.lsock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                c, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                armed, self._armed = self._armed, False
            threading.Thread(target=self._serve, args=(c, armed), daemon=True).start()

    def _serve(self, c: socket.socket, armed: bool) -> None:
        try:
            b = socket.create_connection(("127.0.0.1", self.backend_port), timeout=5)
        except OSError:
            c.close()
            return
        b.settimeout(None)
        if armed:
            try:
                deadline = time.monotonic() + 30
                req = _read_http_message(c, deadline)
                b.sendall(req)
                if self.trap == "after_response":
                    self.trapped_response = _read_http_message(b, deadline)
                self.on_trap()
            finally:
                self.trapped.set()
                for s in (b, c):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()
            return
        t = threading.Thread(target=_pipe, args=(b, c), daemon=True)
        t.start()
        _pipe(c, b)
        t.join(60)
        b.close()
        c.close()

    def close(self) -> None:
        self._stop = True
        self.lsock.close()
        self.thread.join(5)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    src.settimeout(60)
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def make_self_signed_cert(directory: str) -> Optional[Tuple[str, str]]:
    """(cert.pem, key.pem) for 127.0.0.1 made with the openssl CLI, or None without it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    p = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
         "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-addext", "basicConstraints=critical,CA:TRUE"],
        capture_output=True, timeout=60,
    )
    if p.returncode != 0:
        return None
    return cert, key
