"""Retry, error and SSE logic against scripted loopback stubs (no keel binary needed)."""

import http.server
import json
import socket
import ssl
import threading
import time
import unittest

from _support import QuietHTTPServer, StubResponse, StubServer, TempDir, make_self_signed_cert

import keel_client
from keel_client import (
    BadRequest,
    Client,
    Committed,
    Forbidden,
    NotFound,
    ProtocolError,
    Rejected,
    RetriesExhausted,
    ServiceUnavailable,
    TransportError,
    Unauthorized,
    parse_retry_after,
)


def ok_body(request_body: bytes) -> dict:
    """A well-formed batch answer with one committed result per command."""
    n = len(json.loads(request_body)["commands"])
    return {"batch": 1, "committed_at": "2026-12-01T18:00:00.000001Z",
            "results": [{"status": "committed", "seq": i + 1} for i in range(n)]}


def err(code: str, message: str = "m") -> dict:
    return {"error": {"code": code, "message": message}}


class StubCase(unittest.TestCase):
    def stub(self, *script: StubResponse, **kw) -> StubServer:
        s = StubServer(list(script), **kw)
        self.addCleanup(s.close)
        return s

    def client(self, url: str, **kw) -> Client:
        kw.setdefault("retries", 5)
        kw.setdefault("backoff_base", 0.01)
        kw.setdefault("backoff_max", 0.05)
        kw.setdefault("timeout", 5)
        c = Client(url, **kw)
        self.addCleanup(c.close)
        return c


class RetryAfterTest(StubCase):
    def test_503_retry_after_is_honoured_with_the_same_body(self):
        s = self.stub(
            StubResponse(503, err("overloaded", "queue full"), {"Retry-After": "1"}),
            StubResponse(200, ok_body),
        )
        c = self.client(s.url)
        cmds = [{"type": "open_account", "account": "a"}, {"type": "deposit", "account": "a", "amount": 5}]
        t0 = time.monotonic()
        res = c.submit(cmds)
        self.assertEqual(res.attempts, 2)
        self.assertEqual(len(s.requests), 2)
        gap = s.requests[1][0] - s.requests[0][0]
        self.assertGreaterEqual(gap, 1.0, "retried before Retry-After")
        self.assertLess(gap, 2.5)
        self.assertLess(time.monotonic() - t0, 5)
        # Same bytes, same ids, on both attempts; the ids were written into the commands.
        self.assertEqual(s.requests[0][4], s.requests[1][4])
        sent = json.loads(s.requests[0][4])["commands"]
        self.assertEqual([x["id"] for x in sent], [x["id"] for x in cmds])
        self.assertEqual([r.command_id for r in res], [x["id"] for x in cmds])
        self.assertTrue(all(isinstance(r, Committed) for r in res))

    def test_429_is_retried_too(self):
        s = self.stub(StubResponse(429, err("rate_limited"), {"Retry-After": "0"}), StubResponse(200, ok_body))
        res = self.client(s.url).submit([{"type": "open_account", "account": "a"}])
        self.assertEqual(res.attempts, 2)

    def test_retry_after_beyond_the_time_budget_gives_up_at_once(self):
        s = self.stub(StubResponse(503, err("overloaded"), {"Retry-After": "30"}))
        c = self.client(s.url, max_retry_time=2)
        t0 = time.monotonic()
        with self.assertRaises(RetriesExhausted) as cm:
            c.submit([{"type": "open_account", "account": "a"}])
        self.assertLess(time.monotonic() - t0, 1.0)
        self.assertEqual(len(s.requests), 1)
        e = cm.exception
        self.assertFalse(e.outcome_unknown, "all answers were 503: certainly nothing committed")
        self.assertIsInstance(e.last_error, ServiceUnavailable)
        self.assertEqual(e.last_error.code, "overloaded")
        self.assertEqual(e.last_error.retry_after, 30)
        self.assertEqual(len(e.command_ids), 1)

    def test_attempts_are_bounded(self):
        s = self.stub(StubResponse(503, err("shutting_down"), {"Retry-After": "0"}))
        with self.assertRaises(RetriesExhausted) as cm:
            self.client(s.url, retries=3).submit([{"type": "open_account", "account": "a"}])
        self.assertEqual(cm.exception.attempts, 4)
        self.assertEqual(len(s.requests), 4)

    def test_backoff_without_retry_after_is_jittered_and_bounded(self):
        c = Client("http://127.0.0.1:1", backoff_base=0.1, backoff_max=1.0)
        for n in range(1, 12):
            cap = min(1.0, 0.1 * 2 ** (n - 1))
            for _ in range(20):
                d = c._backoff(n)
                self.assertGreaterEqual(d, cap / 2)
                self.assertLessEqual(d, cap)

    def test_parse_retry_after(self):
        self.assertEqual(parse_retry_after("3"), 3.0)
        self.assertIsNone(parse_retry_after(None))
        self.assertIsNone(parse_retry_after("soon"))
        now = 1_000_000_000.0
        self.assertAlmostEqual(parse_retry_after("Sun, 09 Sep 2001 01:46:50 GMT", now=now), 10.0, delta=1)
        self.assertEqual(parse_retry_after("Sun, 09 Sep 2001 01:46:00 GMT", now=now), 0.0)


class DefiniteAnswersTest(StubCase):
    def test_4xx_is_never_retried(self):
        for status, code, cls in [(400, "invalid_amount", BadRequest), (401, "unauthorized", Unauthorized),
                                  (403, "forbidden", Forbidden), (404, "not_found", NotFound),
                                  (413, "body_too_large", keel_client.ClientError),
                                  (408, "request_timeout", keel_client.ClientError)]:
            with self.subTest(status=status):
                s = self.stub(StubResponse(status, err(code, f"msg {status}"), {"Retry-After": "0"}),
                              StubResponse(200, ok_body))
                c = self.client(s.url, retries=5)
                with self.assertRaises(cls) as cm:
                    c.submit([{"type": "deposit", "account": "a", "amount": 1}])
                self.assertEqual(len(s.requests), 1, "a 4xx must not be retried")
                self.assertEqual(cm.exception.status, status)
                self.assertEqual(cm.exception.code, code)
                self.assertEqual(cm.exception.message, f"msg {status}")
                self.assertFalse(cm.exception.outcome_unknown)

    def test_500_is_not_retried(self):
        s = self.stub(StubResponse(500, err("internal")), StubResponse(200, ok_body))
        with self.assertRaises(keel_client.ServerError) as cm:
            self.client(s.url).submit([{"type": "open_account", "account": "a"}])
        self.assertEqual(cm.exception.code, "internal")
        self.assertEqual(len(s.requests), 1)

    def test_a_4xx_after_an_indefinite_attempt_says_the_outcome_is_unknown(self):
        s = self.stub(StubResponse(drop=True), StubResponse(401, err("unauthorized")))
        with self.assertRaises(Unauthorized) as cm:
            self.client(s.url).submit([{"type": "open_account", "account": "a"}])
        self.assertTrue(cm.exception.outcome_unknown)
        self.assertEqual(len(s.requests), 2)

    def test_non_json_error_body(self):
        s = self.stub(StubResponse(400, b"bad request"))
        with self.assertRaises(BadRequest) as cm:
            self.client(s.url).aggregate("account:a")
        self.assertIsNone(cm.exception.code)

    def test_api_key_is_sent_as_bearer_on_every_request(self):
        s = self.stub(StubResponse(503, err("overloaded"), {"Retry-After": "0"}), StubResponse(200, ok_body),
                      StubResponse(200, {"id": "account:a", "kind": "account", "version": 1, "state": {}}),
                      StubResponse(200, {"events": [], "next_after": 0, "last_seq": 0}))
        c = self.client(s.url, api_key="k-123")
        c.submit([{"type": "open_account", "account": "a"}])
        c.aggregate("account:a")
        c.events()
        self.assertEqual(len(s.requests), 4)
        for r in s.requests:
            self.assertEqual(r[3].get("authorization"), "Bearer k-123")
        self.assertEqual(s.requests[2][2], "/v1/aggregates/account:a")
        self.assertEqual(s.requests[3][2], "/v1/events?after=0&limit=100")
        c2 = self.client(s.url)
        c2.events()
        self.assertNotIn("authorization", s.requests[-1][3])


class NetworkFailureTest(StubCase):
    def test_dropped_connection_is_retried_with_the_same_ids(self):
        s = self.stub(StubResponse(drop=True), StubResponse(drop=True), StubResponse(200, ok_body))
        cmds = [{"type": "open_account", "account": "a"}, {"type": "open_account", "account": "b", "id": "mine"}]
        res = self.client(s.url).submit(cmds)
        self.assertEqual(res.attempts, 3)
        bodies = {r[4] for r in s.requests}
        self.assertEqual(len(bodies), 1, "every attempt carries the same body")
        self.assertEqual(cmds[1]["id"], "mine", "a caller's id is kept")
        self.assertEqual(len(cmds[0]["id"]), 36)

    def test_truncated_200_is_retried(self):
        raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"batch\":"
        s = self.stub(StubResponse(raw=raw), StubResponse(200, ok_body))
        res = self.client(s.url).submit([{"type": "open_account", "account": "a"}])
        self.assertEqual(res.attempts, 2)

    def test_timeout_is_retried(self):
        s = self.stub(StubResponse(200, ok_body, delay=1.5), StubResponse(200, ok_body))
        res = self.client(s.url, timeout=0.5).submit([{"type": "open_account", "account": "a"}])
        self.assertEqual(res.attempts, 2)

    def test_connection_refused_exhausts_with_nothing_committed(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()  # nothing listens there now
        with self.assertRaises(RetriesExhausted) as cm:
            self.client(f"http://127.0.0.1:{port}", retries=2).submit([{"type": "open_account", "account": "a"}])
        self.assertEqual(cm.exception.attempts, 3)
        self.assertFalse(cm.exception.outcome_unknown)
        self.assertIsInstance(cm.exception.last_error, TransportError)
        self.assertFalse(cm.exception.last_error.sent)

    def test_exhausted_after_a_drop_says_outcome_unknown(self):
        s = self.stub(StubResponse(drop=True), StubResponse(503, err("overloaded"), {"Retry-After": "0"}))
        with self.assertRaises(RetriesExhausted) as cm:
            self.client(s.url, retries=2).submit([{"type": "open_account", "account": "a"}])
        self.assertTrue(cm.exception.outcome_unknown)

    def test_without_ids_a_sent_request_is_not_resent(self):
        s = self.stub(StubResponse(drop=True), StubResponse(200, ok_body))
        c = self.client(s.url, auto_ids=False)
        cmds = [{"type": "open_account", "account": "a"}]
        with self.assertRaises(TransportError) as cm:
            c.submit(cmds)
        self.assertTrue(cm.exception.outcome_unknown)
        self.assertEqual(len(s.requests), 1, "resending a command without id could apply it twice")
        self.assertNotIn("id", cmds[0])

    def test_reads_are_retried(self):
        s = self.stub(StubResponse(drop=True), StubResponse(503, err("read_timeout"), {"Retry-After": "0"}),
                      StubResponse(200, {"id": "sku:x", "kind": "sku", "version": 2, "state": {"on_hand": 3}}))
        agg = self.client(s.url).aggregate("sku:x")
        self.assertEqual((agg.id, agg.kind, agg.version, agg.state["on_hand"]), ("sku:x", "sku", 2, 3))


class ResultsTest(StubCase):
    def test_typed_results(self):
        body = {"batch": None, "committed_at": "2026-12-01T18:00:00.5Z", "results": [
            {"status": "committed", "seq": 9, "replayed": True},
            {"status": "rejected", "code": "insufficient_funds", "message": "no"},
        ]}
        s = self.stub(StubResponse(200, body))
        res = self.client(s.url).submit([{"type": "open_account", "account": "a"},
                                         {"type": "withdraw", "account": "a", "amount": 3}], atomic=True)
        self.assertTrue(json.loads(s.requests[0][4])["atomic"])
        self.assertIsNone(res.batch)
        self.assertEqual(res.committed_at_datetime.year, 2026)
        self.assertEqual(res[0], Committed(seq=9, replayed=True, command_id=res[0].command_id))
        self.assertIsInstance(res[1], Rejected)
        self.assertEqual((res[1].code, res[1].message, res[1].replayed), ("insufficient_funds", "no", False))
        self.assertFalse(res.all_committed)
        self.assertEqual(len(res.committed), 1)
        self.assertEqual(len(res.rejected), 1)

    def test_wrong_result_count_is_a_protocol_error(self):
        s = self.stub(StubResponse(200, {"batch": 1, "committed_at": "x", "results": []}))
        with self.assertRaises(ProtocolError):
            self.client(s.url).submit([{"type": "open_account", "account": "a"}])


class TlsStubTest(StubCase):
    def test_https_with_ca_cert(self):
        td = TempDir()
        self.addCleanup(td.cleanup)
        pair = make_self_signed_cert(td.path)
        if pair is None:
            self.skipTest("no openssl command line to make a self-signed certificate")
        cert, key = pair
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        s = self.stub(StubResponse(200, {"events": [], "next_after": 0, "last_seq": 0}), ssl_context=ctx)
        url = f"https://127.0.0.1:{s.port}"
        page = self.client(url, ca_cert=cert).events()
        self.assertEqual(page.last_seq, 0)
        # Without the CA the certificate is refused (and not retried).
        with self.assertRaises(ssl.SSLCertVerificationError):
            Client(url, retries=0).events()
        with self.assertRaises(ValueError):
            Client(s.url.replace("https", "http"), ca_cert=cert)


# ---------------------------------------------------------------------- SSE


class SseStub:
    """A loopback server for /v1/subscribe: each connection gets the next scripted list of
    raw chunks (bytes, or ("sleep", s), or "drop"); records each request's path and headers."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        stub = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                idx = len(stub.requests)
                stub.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                plan = stub.script[min(idx, len(stub.script) - 1)]
                if isinstance(plan, tuple) and plan[0] == "status":
                    _, status, body, headers = plan
                    data = json.dumps(body).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for part in plan:
                    if part == "drop":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if isinstance(part, tuple) and part[0] == "sleep":
                        time.sleep(part[1])
                        continue
                    if not part:
                        continue
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.close_connection = True

        self.httpd = QuietHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def ev(seq: int, typ: str = "deposited") -> bytes:
    data = json.dumps({"seq": seq, "batch": seq, "committed_at": "2026-12-01T18:00:00.000001Z",
                       "type": typ, "command_id": f"c{seq}", "aggregates": ["account:a"],
                       "data": {"amount": seq}})
    return f"id: {seq}\nevent: event\ndata: {data}\n\n".encode()


def resume(reason: str, after: int) -> bytes:
    return f'event: resume\ndata: {{"reason":"{reason}","resume_after":{after}}}\n\n'.encode()


class SubscribeStubTest(unittest.TestCase):
    def sse(self, script) -> SseStub:
        s = SseStub(script)
        self.addCleanup(s.close)
        return s

    def client(self, url, **kw):
        kw.setdefault("backoff_base", 0.01)
        kw.setdefault("backoff_max", 0.05)
        return Client(url, **kw)

    def test_resume_and_drop_reconnect_with_last_event_id_exactly_once(self):
        s = self.sse([
            [b": hello\n\n", ev(1), ev(2), b":keepalive\n\n", ev(3), resume("too_slow", 3)],
            # The server repeats 3 (must be dropped) then drops the connection mid-message.
            [ev(3), ev(4), ev(5)[:20], "drop"],
            [ev(5), b"event: other\ndata: {}\n\n", ev(6), resume("shutting_down", 6)],
            [ev(7)],
        ])
        sub = self.client(s.url, api_key="k").subscribe(after=0, kind="account", aggregate="account:a", max_events=7)
        seqs = [e.seq for e in sub]
        self.assertEqual(seqs, [1, 2, 3, 4, 5, 6, 7])
        self.assertEqual(sub.last_seq, 7)
        self.assertEqual(len(s.requests), 4)
        p0, h0 = s.requests[0]
        self.assertEqual(p0, "/v1/subscribe?after=0&kind=account&aggregate=account%3Aa")
        self.assertNotIn("last-event-id", h0)
        self.assertEqual(h0["authorization"], "Bearer k")
        self.assertEqual(h0["accept"], "text/event-stream")
        self.assertEqual([r[1].get("last-event-id") for r in s.requests[1:]], ["3", "4", "6"])
        self.assertIn("after=3", s.requests[1][0])
        self.assertEqual(sub.last_resume_reason, "shutting_down")

    def test_event_fields_and_multiline_data(self):
        data = {"seq": 1, "batch": 1, "committed_at": "2026-12-01T18:00:00.000001Z", "type": "account_opened",
                "command_id": None, "aggregates": ["account:a"], "data": {"account": "a"}}
        text = json.dumps(data, indent=1).replace("\n", "\ndata: ")
        s = self.sse([[("id: 1\r\nevent: event\r\ndata: " + text + "\r\n\r\n").encode()]])
        with self.client(s.url).subscribe(max_events=1) as sub:
            (e,) = list(sub)
        self.assertEqual((e.seq, e.type, e.command_id, e.aggregates, e.data), (1, "account_opened", None, ["account:a"], {"account": "a"}))

    def test_reconnects_are_bounded(self):
        s = self.sse([("status", 503, {"error": {"code": "shutting_down", "message": "x"}}, {"Retry-After": "0"})])
        sub = self.client(s.url).subscribe(reconnect_max=3)
        with self.assertRaises(RetriesExhausted):
            next(sub)
        self.assertEqual(len(s.requests), 4)

    def test_404_is_raised(self):
        s = self.sse([("status", 404, {"error": {"code": "not_found", "message": "no such route"}}, {})])
        with self.assertRaises(NotFound):
            next(iter(self.client(s.url).subscribe()))
        self.assertEqual(len(s.requests), 1)

    def test_close_from_another_thread_stops_a_blocked_iterator(self):
        s = self.sse([[ev(1), ("sleep", 20)]])
        sub = self.client(s.url).subscribe()
        self.assertEqual(next(sub).seq, 1)
        threading.Timer(0.3, sub.close).start()
        t0 = time.monotonic()
        self.assertEqual(list(sub), [])
        self.assertLess(time.monotonic() - t0, 5)
        self.assertTrue(sub.closed)

    def test_idle_stream_is_reopened(self):
        s = self.sse([[ev(1), ("sleep", 3)], [ev(2)]])
        sub = self.client(s.url).subscribe(idle_timeout=0.5, max_events=2)
        self.assertEqual([e.seq for e in sub], [1, 2])
        self.assertEqual(s.requests[1][1].get("last-event-id"), "1")


if __name__ == "__main__":
    unittest.main()
