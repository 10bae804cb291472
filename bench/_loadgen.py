"""Open-loop HTTP/1.1 load at a fixed rate, for lockgate's benchmarks and load tests (stdlib asyncio only).

    from bench._loadgen import OpenLoop
    r = OpenLoop("127.0.0.1", port, rps=500, duration_s=60).run()
    r.sent, r.achieved_rps, r.failures, r.status_counts, r.lateness_ms(99), r.latency_ms(50)

Open loop: request *i* is due at ``t0 + i / rps`` whatever happened to earlier requests. A due request
goes out on an idle keep-alive connection; when every connection is busy a new one is opened (up to
``max_connections``), and only when that cap is reached does a request wait — and then its lateness
(actual send − due time) is recorded, so a slow server can never lower the offered rate silently:
``achieved_rps`` (sent / sending window), ``lateness`` and ``failures`` tell what really happened.

Every request carries a unique ``x-request-id`` (``<prefix>-<i>``; lockgate keeps it as ``client_request_id``) and a
random ``x-user-id``; per request it records due offset, lateness, status, time to the first body byte
and to the complete response (both from the actual send), so results can be matched with what lockgate
stored. Responses may be ``content-length`` or chunked (lockgate's STREAMED capture makes Envoy chunk).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

CHAT_BODY = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hello"}]}).encode()
STREAM_BODY = json.dumps({"model": "chat", "stream": True,
                          "messages": [{"role": "user", "content": "hello"}]}).encode()


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN when empty."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


@dataclass
class LoadResult:
    target_rps: float
    duration_s: float
    planned: int
    sent: int = 0
    send_window_s: float = 0.0          #: first send → last send
    wall_s: float = 0.0                 #: first send → last response (or failure)
    failures: int = 0                   #: connection errors, timeouts, malformed responses
    failure_kinds: dict[str, int] = field(default_factory=dict)
    status_counts: dict[int, int] = field(default_factory=dict)
    connections_opened: int = 0
    max_in_flight: int = 0
    # per completed request (same order): id, lateness s, first body byte s, complete s, status
    ids: list[str] = field(default_factory=list)
    lateness_s: list[float] = field(default_factory=list)
    ttfb_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    all_lateness_s: list[float] = field(default_factory=list)  #: every sent request, failed or not

    @property
    def achieved_rps(self) -> float:
        # n sends span n-1 intervals of 1/rps
        return (self.sent - 1) / self.send_window_s if self.send_window_s > 0 and self.sent > 1 else 0.0

    @property
    def ok(self) -> int:
        return self.status_counts.get(200, 0)

    def latency_ms(self, q: float) -> float:
        return percentile(self.latency_s, q) * 1000

    def ttfb_ms(self, q: float) -> float:
        return percentile(self.ttfb_s, q) * 1000

    def lateness_ms(self, q: float) -> float:
        return percentile(self.all_lateness_s, q) * 1000

    def summary(self) -> dict:
        return {"target_rps": self.target_rps, "duration_s": self.duration_s, "planned": self.planned,
                "sent": self.sent, "achieved_rps": round(self.achieved_rps, 2),
                "send_window_s": round(self.send_window_s, 3), "wall_s": round(self.wall_s, 3),
                "failures": self.failures, "failure_kinds": self.failure_kinds,
                "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
                "connections_opened": self.connections_opened, "max_in_flight": self.max_in_flight,
                "lateness_ms": {"p50": round(self.lateness_ms(50), 3), "p99": round(self.lateness_ms(99), 3),
                                "max": round(max(self.all_lateness_s, default=0.0) * 1000, 3),
                                "over_10ms": sum(1 for x in self.all_lateness_s if x > 0.010)},
                "latency_ms": {q: round(self.latency_ms(v), 4) for q, v in
                               (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9), ("max", 100))},
                "ttfb_ms": {q: round(self.ttfb_ms(v), 4) for q, v in (("p50", 50), ("p90", 90), ("p99", 99))}}


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001
            pass


class OpenLoop:
    """A fixed-rate load of ``rps`` for ``duration_s`` (or ``count`` requests) against 127.0.0.1:``port``."""

    def __init__(self, host: str, port: int, rps: float, duration_s: float | None = None, *, count: int | None = None,
                 connections: int = 16, max_connections: int = 256, path: str = "/v1/chat/completions",
                 method: str = "POST", body: bytes | None = CHAT_BODY, users: int = 10000, timeout_s: float = 10.0,
                 id_prefix: str = "lg", seed: int = 1, extra_headers: dict[str, str] | None = None):
        if count is None:
            assert duration_s is not None
            count = int(round(rps * duration_s))
        self.host, self.port, self.rps, self.count = host, port, float(rps), count
        self.duration_s = duration_s if duration_s is not None else count / rps
        self.connections, self.max_connections = connections, max_connections
        self.path, self.method, self.body = path, method, body
        self.users, self.timeout_s, self.id_prefix = users, timeout_s, id_prefix
        self.rng = random.Random(seed)
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (extra_headers or {}).items())

    def run(self) -> LoadResult:
        return asyncio.run(self.arun())

    async def arun(self) -> LoadResult:
        res = LoadResult(self.rps, self.duration_s, self.count)
        idle: list[_Conn] = []
        for _ in range(self.connections):
            idle.append(await self._open(res))
        freed = asyncio.Event()
        in_flight = 0
        tasks: set[asyncio.Task] = set()
        first_send = last_send = None
        end_times: list[float] = []

        async def one(i: int, conn: _Conn, t_sent: float) -> None:
            nonlocal in_flight
            try:
                status, t_first, t_done, keep = await asyncio.wait_for(self._exchange(conn), self.timeout_s)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError,
                    ValueError, IndexError) as exc:
                kind = type(exc).__name__
                res.failures += 1
                res.failure_kinds[kind] = res.failure_kinds.get(kind, 0) + 1
                conn.close()
                conn = None
                end_times.append(time.perf_counter())
            else:
                res.status_counts[status] = res.status_counts.get(status, 0) + 1
                res.ids.append(f"{self.id_prefix}-{i}")
                res.statuses.append(status)
                res.ttfb_s.append(t_first - t_sent)
                res.latency_s.append(t_done - t_sent)
                res.lateness_s.append(res.all_lateness_s[i])
                end_times.append(t_done)
                if not keep:
                    conn.close()
                    conn = None
            finally:
                in_flight -= 1
            if conn is not None:
                idle.append(conn)
            freed.set()

        t0 = time.perf_counter() + 0.05
        period = 1.0 / self.rps
        for i in range(self.count):
            due = t0 + i * period
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            while not idle:
                if in_flight + len(idle) < self.max_connections:
                    try:
                        idle.append(await self._open(res))
                    except OSError as exc:
                        res.failures += 1
                        res.failure_kinds["connect:" + type(exc).__name__] = res.failure_kinds.get(
                            "connect:" + type(exc).__name__, 0) + 1
                        await asyncio.sleep(0.01)
                    continue
                freed.clear()
                await freed.wait()
            conn = idle.pop()
            now = time.perf_counter()
            res.all_lateness_s.append(max(0.0, now - due))
            user = self.rng.randrange(self.users)
            head = (f"{self.method} {self.path} HTTP/1.1\r\nhost: lockgate-bench\r\nx-request-id: {self.id_prefix}-{i}\r\n"
                    f"x-user-id: u{user}\r\n{self.extra}")
            if self.body is not None:
                head += f"content-type: application/json\r\ncontent-length: {len(self.body)}\r\n"
            conn.writer.write(head.encode() + b"\r\n" + (self.body or b""))
            t_sent = time.perf_counter()
            if first_send is None:
                first_send = t_sent
            last_send = t_sent
            res.sent += 1
            in_flight += 1
            res.max_in_flight = max(res.max_in_flight, in_flight)
            t = asyncio.ensure_future(one(i, conn, t_sent))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        for c in idle:
            c.close()
        if first_send is not None:
            res.send_window_s = last_send - first_send
            res.wall_s = max(end_times, default=last_send) - first_send
        return res

    async def _open(self, res: LoadResult) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        res.connections_opened += 1
        return _Conn(reader, writer)

    @staticmethod
    async def _exchange(conn: _Conn) -> tuple[int, float, float, bool]:
        """Read one response; (status, first body byte time, complete time, keep-alive)."""
        reader = conn.reader
        head = await reader.readuntil(b"\r\n\r\n")
        t_head = time.perf_counter()
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        clen, chunked, keep = None, False, True
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if not sep:
                continue
            k = k.strip().lower()
            if k == "content-length":
                clen = int(v)
            elif k == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
            elif k == "connection" and v.strip().lower() == "close":
                keep = False
        t_first = None
        if chunked:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    break
                await reader.readexactly(size + 2)
                if t_first is None:
                    t_first = time.perf_counter()
        elif clen:
            await reader.readexactly(clen)
            t_first = time.perf_counter()
        elif clen is None and not keep:
            await reader.read()
        t_done = time.perf_counter()
        return status, t_first if t_first is not None else t_head, t_done, keep
