"""API keys, TLS and /v1/subscribe against a REAL `keel serve`.

Each class is skipped ONLY when the binary lacks the feature: `keel serve --help` without
`--auth-keys` / `--tls-cert`, or `GET /v1/subscribe` answered 404 (route missing). The reason is
in the skip message.
"""

import http.client
import ssl
import subprocess
import threading
import time
import unittest
import uuid

from _support import (
    KEEL_BIN,
    KeelServer,
    TempDir,
    keel_help,
    make_self_signed_cert,
    require_keel,
    serve_supports,
    wait_until,
)

from keel_client import Client, Forbidden, Unauthorized


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def add_key(keys_file: str, key_id: str, scopes: str) -> str:
    p = subprocess.run(
        [KEEL_BIN, "keys", "add", "--file", keys_file, "--id", key_id, "--scopes", scopes],
        capture_output=True, text=True, timeout=60,
    )
    if p.returncode != 0:
        raise AssertionError(f"keel keys add failed: {p.stderr}")
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected the key alone on stdout, got {p.stdout!r}"
    return lines[0].strip()


def fast_client(url: str, **kw) -> Client:
    kw.setdefault("timeout", 10)
    kw.setdefault("retries", 5)
    kw.setdefault("backoff_base", 0.05)
    kw.setdefault("backoff_max", 0.5)
    return Client(url, **kw)


# ---------------------------------------------------------------------- API keys


class AuthTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = TempDir()
        cls.server = None

    @classmethod
    def tearDownClass(cls):
        if cls.server is not None:
            cls.server.stop()
        cls.tmp.cleanup()

    def setUp(self):
        require_keel(self)
        if not serve_supports("--auth-keys"):
            self.skipTest(f"{KEEL_BIN} serve has no --auth-keys flag yet (API keys not in this build)")
        if not keel_help("keys", "add"):
            self.skipTest(f"{KEEL_BIN} has no `keys add` command yet")
        cls = type(self)
        if cls.server is None:
            keys = cls.tmp.sub("keys.json")
            cls.writer_key = add_key(keys, "py-writer", "write,read")
            cls.reader_key = add_key(keys, "py-reader", "read")
            cls.server = KeelServer(cls.tmp.sub("data"), ("--auth-keys", keys),
                                    log_dir=cls.tmp.sub("logs")).start(port=0)

    def client(self, key):
        c = fast_client(self.server.url, api_key=key)
        self.addCleanup(c.close)
        return c

    def test_writer_key_submits_and_reads(self):
        c = self.client(self.writer_key)
        a = uid("acct")
        res = c.submit([{"type": "open_account", "account": a}, {"type": "deposit", "account": a, "amount": 4}])
        self.assertTrue(res.all_committed)
        self.assertEqual(c.aggregate(f"account:{a}").state["balance"], 4)
        self.assertGreaterEqual(c.events(after=0, limit=10).last_seq, 2)

    def test_no_key_or_unknown_key_is_unauthorized_and_not_retried(self):
        for key in (None, "not-a-key", self.writer_key + "x"):
            with self.subTest(key=key and key[:6]):
                c = self.client(key)
                t0 = time.monotonic()
                with self.assertRaises(Unauthorized) as cm:
                    c.submit([{"type": "open_account", "account": uid("acct")}])
                self.assertLess(time.monotonic() - t0, 2, "a 401 must not be retried")
                self.assertEqual(cm.exception.status, 401)
                self.assertEqual(cm.exception.code, "unauthorized")
                self.assertFalse(cm.exception.outcome_unknown)
                with self.assertRaises(Unauthorized):
                    c.events()
                with self.assertRaises(Unauthorized):
                    c.aggregate("account:x")

    def test_read_key_cannot_write(self):
        c = self.client(self.reader_key)
        with self.assertRaises(Forbidden) as cm:
            c.submit([{"type": "open_account", "account": uid("acct")}])
        self.assertEqual((cm.exception.status, cm.exception.code), (403, "forbidden"))
        c.events(after=0, limit=1)  # reading is allowed


# ---------------------------------------------------------------------- TLS


class TlsTest(unittest.TestCase):
    def setUp(self):
        require_keel(self)
        if not serve_supports("--tls-cert"):
            self.skipTest(f"{KEEL_BIN} serve has no --tls-cert flag yet (TLS not in this build)")
        self.tmp = TempDir()
        self.addCleanup(self.tmp.cleanup)
        pair = make_self_signed_cert(self.tmp.path)
        if pair is None:
            self.skipTest("no `openssl` command line to make a self-signed certificate for 127.0.0.1")
        self.cert, key = pair
        self.server = KeelServer(self.tmp.sub("data"), ("--tls-cert", self.cert, "--tls-key", key),
                                 log_dir=self.tmp.sub("logs")).start(port=0)
        self.addCleanup(self.server.stop)

    def test_https_with_ca_cert(self):
        self.assertEqual(self.server.scheme, "https", "the server should announce https://")
        c = fast_client(self.server.url, ca_cert=self.cert)
        self.addCleanup(c.close)
        a = uid("acct")
        cmds = [{"type": "open_account", "account": a}, {"type": "deposit", "account": a, "amount": 9}]
        res = c.submit(cmds)
        self.assertTrue(res.all_committed)
        self.assertTrue(c.submit(cmds)[1].replayed)
        self.assertEqual(c.aggregate(f"account:{a}").state["balance"], 9)

    def test_untrusted_certificate_is_refused(self):
        c = fast_client(self.server.url)  # system CAs only
        self.addCleanup(c.close)
        with self.assertRaises(ssl.SSLCertVerificationError):
            c.events()


# ---------------------------------------------------------------------- subscribe


def subscribe_route_exists(url: str) -> bool:
    host, port = url.split("://", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/v1/subscribe?after=0", headers={"Accept": "text/event-stream"})
        resp = conn.getresponse()
        return resp.status != 404
    finally:
        conn.close()


class Collector:
    """Iterates a subscription on a thread; the test waits for counts with a deadline."""

    def __init__(self, sub):
        self.sub = sub
        self.events = []
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for e in self.sub:
                self.events.append(e)
        except Exception as e:  # noqa: BLE001 - checked by the test
            self.error = e

    def wait_for(self, n: int, timeout: float) -> bool:
        return wait_until(lambda: len(self.events) >= n or self.error is not None or not self.thread.is_alive(),
                          timeout) and len(self.events) >= n

    def stop(self):
        self.sub.close()
        self.thread.join(10)


class SubscribeTest(unittest.TestCase):
    def setUp(self):
        require_keel(self)
        self.tmp = TempDir()
        self.addCleanup(self.tmp.cleanup)
        self.server = KeelServer(self.tmp.sub("data"), ("--shutdown-drain-secs", "2"),
                                 log_dir=self.tmp.sub("logs")).start(port=0)
        self.addCleanup(self.server.stop)
        if not subscribe_route_exists(self.server.url):
            self.skipTest(f"{KEEL_BIN} answers 404 to GET /v1/subscribe (route not in this build)")
        self.client = fast_client(self.server.url, backoff_base=0.1, backoff_max=0.5)
        self.addCleanup(self.client.close)

    def subscribe(self, **kw):
        kw.setdefault("reconnect_max", 60)
        kw.setdefault("reconnect_max_time", 60)
        sub = self.client.subscribe(**kw)
        self.addCleanup(sub.close)
        return sub

    def deposit_batch(self, acct: str, n: int):
        res = self.client.submit([{"type": "deposit", "account": acct, "amount": i + 1} for i in range(n)])
        self.assertTrue(res.all_committed)
        return [r.seq for r in res]

    def test_history_then_live_events_same_shape_as_events_route(self):
        a = uid("acct")
        seqs = [r.seq for r in self.client.submit([{"type": "open_account", "account": a}])]
        seqs += self.deposit_batch(a, 2)
        col = Collector(self.subscribe(after=0, max_events=6))
        self.addCleanup(col.stop)
        self.assertTrue(col.wait_for(3, 20), f"got {len(col.events)} of the 3 past events; {col.error!r}")
        seqs += self.deposit_batch(a, 3)
        self.assertTrue(col.wait_for(6, 20), f"got {len(col.events)} of 6; {col.error!r}")
        col.thread.join(10)
        self.assertIsNone(col.error)
        self.assertEqual([e.seq for e in col.events], seqs)
        self.assertEqual(col.events, self.client.events(after=0, limit=100).events)

    def test_aggregate_and_kind_filters(self):
        a, b, s = uid("acct"), uid("acct"), uid("sku")
        self.client.submit([{"type": "open_account", "account": a}, {"type": "open_account", "account": b},
                            {"type": "create_sku", "sku": s, "on_hand": 5},
                            {"type": "deposit", "account": b, "amount": 1},
                            {"type": "deposit", "account": a, "amount": 2}])
        col = Collector(self.subscribe(aggregate=f"account:{a}", max_events=2))
        self.addCleanup(col.stop)
        self.assertTrue(col.wait_for(2, 20), f"{col.events} {col.error!r}")
        self.assertTrue(all(f"account:{a}" in e.aggregates for e in col.events))
        # `kind` is taken to be the aggregate kind (`account`, `sku`), as in GET /v1/aggregates.
        col2 = Collector(self.subscribe(kind="sku", max_events=1))
        self.addCleanup(col2.stop)
        self.assertTrue(col2.wait_for(1, 20), f"{col2.events} {col2.error!r}")
        self.assertEqual(col2.events[0].aggregates, [f"sku:{s}"])

    def _restart_case(self, how: str):
        a = uid("acct")
        seqs = [r.seq for r in self.client.submit([{"type": "open_account", "account": a}])]
        seqs += self.deposit_batch(a, 2)
        sub = self.subscribe(after=0, max_events=8)
        col = Collector(sub)
        self.addCleanup(col.stop)
        self.assertTrue(col.wait_for(3, 20), f"{col.events} {col.error!r}")
        if how == "term":
            self.assertEqual(self.server.stop(timeout=30), 0, "SIGTERM: clean exit")
        else:
            self.server.kill()
        self.server.start()  # same data dir and port
        seqs += self.deposit_batch(a, 5)
        self.assertTrue(col.wait_for(8, 60), f"got {[e.seq for e in col.events]}; {col.error!r}")
        col.thread.join(10)
        self.assertIsNone(col.error)
        self.assertEqual([e.seq for e in col.events], seqs, "every event exactly once, in order")
        self.assertGreaterEqual(sub.reconnects, 1)
        if how == "term":
            self.assertEqual(sub.last_resume_reason, "shutting_down",
                             "SIGTERM should end the stream with `event: resume` (shutting_down)")

    def test_resume_across_sigterm_restart(self):
        self._restart_case("term")

    def test_resume_across_sigkill_restart(self):
        self._restart_case("kill")


if __name__ == "__main__":
    unittest.main()
