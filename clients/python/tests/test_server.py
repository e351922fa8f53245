"""Against a REAL `keel serve` (KEEL_BIN) on loopback: results, ids, replay, reads, 4xx, and
SIGKILL of the server mid-request with the retry committing exactly once."""

import json
import threading
import time
import unittest
import uuid

from _support import KeelServer, TempDir, TrapProxy, require_keel

from keel_client import (
    BadRequest,
    Client,
    Committed,
    NotFound,
    Rejected,
    RetriesExhausted,
)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class ServerCase(unittest.TestCase):
    """One server per class, fresh data directory."""

    server: KeelServer
    tmp: TempDir

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
        if type(self).server is None:
            type(self).server = KeelServer(self.tmp.sub("data"), log_dir=self.tmp.sub("logs")).start(port=0)

    def client(self, url=None, **kw) -> Client:
        kw.setdefault("timeout", 10)
        kw.setdefault("retries", 5)
        kw.setdefault("backoff_base", 0.05)
        kw.setdefault("backoff_max", 0.5)
        c = Client(url or self.server.url, **kw)
        self.addCleanup(c.close)
        return c


class SubmitTest(ServerCase):
    def test_committed_and_rejected_items_are_typed(self):
        c = self.client()
        a, b = uid("alice"), uid("bob")
        cmds = [
            {"type": "open_account", "account": a, "overdraft_limit": 10},
            {"type": "open_account", "account": b},
            {"type": "deposit", "account": a, "amount": 100, "memo": "salary"},
            {"type": "transfer", "from": a, "to": b, "amount": 500},
            {"type": "transfer", "from": a, "to": b, "amount": 30},
        ]
        res = c.submit(cmds)
        self.assertEqual(res.attempts, 1)
        self.assertIsInstance(res.batch, int)
        self.assertEqual(res.committed_at_datetime.tzinfo is not None, True)
        self.assertEqual([type(r) for r in res], [Committed, Committed, Committed, Rejected, Committed])
        seqs = [r.seq for r in res.committed]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(res[3].code, "insufficient_funds")
        self.assertIn("cannot debit 500", res[3].message)
        self.assertFalse(any(r.replayed for r in res))
        # Automatic ids: a UUID4 per command, written into the command dicts, in the results.
        ids = [cmd["id"] for cmd in cmds]
        self.assertEqual(len(set(ids)), 5)
        for i in ids:
            self.assertEqual(uuid.UUID(i).version, 4)
        self.assertEqual([r.command_id for r in res], ids)
        # The server recorded those ids on the events.
        page = c.events(after=seqs[0] - 1, limit=10)
        by_seq = {e.seq: e for e in page.events}
        self.assertEqual(by_seq[res[2].seq].command_id, ids[2])
        self.assertEqual(by_seq[res[2].seq].data.get("memo"), "salary")
        self.assertEqual(c.aggregate(f"account:{b}").state["balance"], 30)
        self.assertEqual(c.aggregate(f"account:{a}").state["balance"], 70)

    def test_resubmitting_the_same_dicts_is_replayed_not_applied_twice(self):
        c = self.client()
        a = uid("acct")
        cmds = [{"type": "open_account", "account": a}, {"type": "deposit", "account": a, "amount": 5},
                {"type": "withdraw", "account": a, "amount": 50}]
        first = c.submit(cmds)
        ids = [x["id"] for x in cmds]
        again = c.submit(cmds)
        self.assertEqual([x["id"] for x in cmds], ids, "ids are stable across submissions")
        self.assertTrue(all(r.replayed for r in again))
        self.assertIsNone(again.batch)
        self.assertEqual([getattr(r, "seq", None) for r in again], [getattr(r, "seq", None) for r in first])
        self.assertEqual(again[2].code, "insufficient_funds")
        agg = c.aggregate(f"account:{a}")
        self.assertEqual((agg.version, agg.state["balance"]), (2, 5))

    def test_atomic_rollback(self):
        c = self.client()
        a = uid("acct")
        res = c.submit([{"type": "open_account", "account": a},
                        {"type": "withdraw", "account": a, "amount": 1}], atomic=True)
        self.assertEqual([r.code for r in res.rejected], ["atomic_rollback", "insufficient_funds"])
        with self.assertRaises(NotFound) as cm:
            c.aggregate(f"account:{a}")
        self.assertEqual(cm.exception.code, "not_found")

    def test_caller_ids_are_kept(self):
        c = self.client()
        a = uid("acct")
        cid = uid("cmd")
        res = c.submit([{"type": "open_account", "account": a, "id": cid}])
        self.assertEqual(res[0].command_id, cid)

    def test_4xx_is_raised_typed_and_not_retried(self):
        c = self.client(retries=5)
        before = c.events(after=0, limit=1).last_seq
        t0 = time.monotonic()
        with self.assertRaises(BadRequest) as cm:
            c.submit([{"type": "deposit", "account": "x", "amount": 0}])
        self.assertLess(time.monotonic() - t0, 2)
        self.assertEqual(cm.exception.status, 400)
        self.assertEqual(cm.exception.code, "invalid_amount")
        self.assertIn("commands[0]", cm.exception.message)
        with self.assertRaises(BadRequest) as cm:
            c.submit([{"type": "teleport"}])
        self.assertEqual(cm.exception.code, "unknown_command_type")
        self.assertEqual(c.events(after=0, limit=1).last_seq, before)

    def test_reads(self):
        c = self.client()
        a = uid("acct")
        s = uid("sku")
        res = c.submit([{"type": "open_account", "account": a},
                        {"type": "create_sku", "sku": s, "on_hand": 10},
                        {"type": "reserve", "sku": s, "qty": 3, "order": "o-1"}])
        self.assertTrue(res.all_committed)
        agg = c.aggregate(f"sku:{s}")
        self.assertEqual((agg.kind, agg.version, agg.state["available"]), ("sku", 2, 7))
        evs = list(c.iter_events(after=res[0].seq - 1, page_size=2))
        self.assertEqual([e.seq for e in evs[:3]], [r.seq for r in res])
        self.assertEqual(evs[1].type and evs[1].aggregates, [f"sku:{s}"])
        with self.assertRaises(BadRequest) as cm:
            c.aggregate("nocolon")
        self.assertEqual(cm.exception.code, "invalid_name")

    def test_large_integers_are_exact(self):
        c = self.client()
        s = uid("sku")
        big = 2**63 - 1
        c.submit([{"type": "create_sku", "sku": s, "on_hand": big}])
        self.assertEqual(c.aggregate(f"sku:{s}").state["on_hand"], big)


class KillTest(unittest.TestCase):
    """SIGKILL the server while a submission is in flight; the client's retry (same ids) makes
    the effect happen exactly once. A proxy thread sits between client and server so that the
    kill lands at a known point; the server is restarted on the SAME data dir and port."""

    def setUp(self):
        require_keel(self)
        self.tmp = TempDir()
        self.addCleanup(self.tmp.cleanup)
        self.server = KeelServer(self.tmp.sub("data"), log_dir=self.tmp.sub("logs")).start(port=0)
        self.addCleanup(self.server.stop)
        self.port = self.server.port

    def run_trap(self, trap: str):
        direct = Client(self.server.url, timeout=10, retries=2)
        self.addCleanup(direct.close)
        acct = uid("kill")
        direct.submit([{"type": "open_account", "account": acct}])
        direct.close()

        proxy = TrapProxy(self.port, trap, on_trap=self.server.kill)
        self.addCleanup(proxy.close)
        client = Client(proxy.url, timeout=10, retries=40, max_retry_time=60, backoff_base=0.1, backoff_max=0.5)
        self.addCleanup(client.close)
        cmds = [{"type": "deposit", "account": acct, "amount": 7}]
        out = {}

        def submit():
            try:
                out["result"] = client.submit(cmds)
            except Exception as e:  # noqa: BLE001 - reported below
                out["error"] = e

        t = threading.Thread(target=submit, daemon=True)
        t.start()
        self.assertTrue(proxy.trapped.wait(30), "the proxy never saw the request")
        self.assertIsNotNone(self.server.proc.poll(), "server should be dead (SIGKILL)")
        time.sleep(0.3)  # the client retries against a dead server for a while
        self.server.start(port=self.port)  # same data dir, same port
        t.join(90)
        self.assertFalse(t.is_alive(), "submit did not finish")
        self.assertNotIn("error", out, f"{out.get('error')!r}\n{self.server.log_text()}")
        res = out["result"]
        self.assertGreaterEqual(res.attempts, 2, "the first attempt got no answer: a retry is needed")
        self.assertIsInstance(res[0], Committed)
        self.assertEqual(res[0].command_id, cmds[0]["id"])

        reader = Client(self.server.url, timeout=10, retries=5)
        self.addCleanup(reader.close)
        agg = reader.aggregate(f"account:{acct}")
        self.assertEqual(agg.state["balance"], 7, "applied exactly once")
        self.assertEqual(agg.version, 2)
        matching = [e for e in reader.iter_events(after=0, page_size=1000) if e.command_id == cmds[0]["id"]]
        self.assertEqual(len(matching), 1, "exactly one event for the command id")
        self.assertEqual(matching[0].seq, res[0].seq)
        return res, proxy

    def test_kill_after_commit_before_the_answer_retry_is_replayed(self):
        res, proxy = self.run_trap("after_response")
        # The server had committed and fsynced (its answer reached the proxy), so the retry
        # after restart must be the replayed original result.
        trapped = json.loads(proxy.trapped_response.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(trapped["results"][0]["status"], "committed")
        self.assertTrue(res[0].replayed)
        self.assertEqual(res[0].seq, trapped["results"][0]["seq"])

    def test_kill_right_after_the_request_is_sent_commits_exactly_once(self):
        # Whether the server committed before dying is unknown: either way, exactly once.
        self.run_trap("after_request")


class RealOverloadTest(unittest.TestCase):
    def test_real_503_retry_after_is_honoured(self):
        """`--read-concurrency-max 1` makes concurrent reads answer 503 `overloaded` with
        `Retry-After: 1`; every read still succeeds, and each wait after a 503 lasted at least
        the Retry-After."""
        require_keel(self)
        tmp = TempDir()
        self.addCleanup(tmp.cleanup)
        server = KeelServer(tmp.sub("data"), ("--read-concurrency-max", "1"), log_dir=tmp.sub("logs")).start(port=0)
        self.addCleanup(server.stop)
        seed = Client(server.url, timeout=10)
        self.addCleanup(seed.close)
        for _ in range(5):
            seed.submit([{"type": "open_account", "account": uid("acct")} for _ in range(200)])

        waits = []  # (delay, last error) of every retry wait
        errors = []
        lock = threading.Lock()

        def reader():
            c = Client(server.url, timeout=10, retries=30, max_retry_time=60, backoff_base=0.01, backoff_max=0.05)

            def sleep(delay):
                with lock:
                    waits.append(delay)
                time.sleep(delay)

            c._sleep = sleep
            try:
                for _ in range(15):
                    self.assertEqual(len(c.events(after=0, limit=1000).events), 1000)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
            finally:
                c.close()

        for _round in range(5):
            threads = [threading.Thread(target=reader, daemon=True) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            self.assertEqual(errors, [])
            if any(w >= 1.0 for w in waits):
                break
        long_waits = [w for w in waits if w >= 0.5]
        self.assertTrue(long_waits, f"no 503 was provoked (waits: {waits})")
        # Retry-After: 1 -> waits of 1.0 .. 1.1 s; backoff without it is at most 0.05 s here.
        for w in long_waits:
            self.assertGreaterEqual(w, 1.0)
            self.assertLessEqual(w, 1.1 + 1e-9)


class ExhaustedTest(unittest.TestCase):
    def test_server_down_for_good_exhausts_and_resubmission_is_safe(self):
        require_keel(self)
        tmp = TempDir()
        self.addCleanup(tmp.cleanup)
        server = KeelServer(tmp.sub("data"), log_dir=tmp.sub("logs")).start(port=0)
        self.addCleanup(server.stop)
        acct = uid("acct")
        c = Client(server.url, timeout=5, retries=3, backoff_base=0.05, backoff_max=0.1)
        self.addCleanup(c.close)
        c.submit([{"type": "open_account", "account": acct}])
        server.stop()
        cmds = [{"type": "deposit", "account": acct, "amount": 3}]
        with self.assertRaises(RetriesExhausted) as cm:
            c.submit(cmds)
        self.assertEqual(cm.exception.attempts, 4)
        self.assertEqual(cm.exception.command_ids, [cmds[0]["id"]])
        server.start()
        res = c.submit(cmds)
        self.assertFalse(res[0].replayed)
        self.assertEqual(c.aggregate(f"account:{acct}").state["balance"], 3)
        self.assertTrue(c.submit(cmds)[0].replayed)


if __name__ == "__main__":
    unittest.main()
