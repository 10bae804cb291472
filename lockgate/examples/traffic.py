"""Demo traffic: many sticky users sending chat and classifier requests through lockgate's Envoy,
plus a feedback poster that sends delayed ground truth (true classes) and thumbs for a share of
requests to the controller's feedback API.

``python -m lockgate.examples.traffic --listener 127.0.0.1:10000 --feedback 127.0.0.1:18021 --rate 80``

Each request carries ``x-user-id`` (sticky key) and its own ``x-request-id``; feedback names the
request later by lockgate's id, which Envoy returns in the ``x-lockgate-request-id`` response header
(by ``client_request_id`` if that header is missing). Classifier requests also carry the ticket's true class in
``x-true-class`` so the example classifier server can be right or wrong per its configured
per-class accuracy; the true class is posted as feedback ``label_delay_s`` later.
"""

from __future__ import annotations

import argparse
import heapq
import http.client
import json
import random
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

CLASSES = {"billing": 0.45, "technical": 0.25, "account": 0.15, "fraud": 0.15}
PROMPTS = ["How do I reset my password?", "Summarise this ticket for me.", "Write a haiku about GPUs.",
           "What is the capital of France?", "Explain canary deployments briefly.", "Translate 'hello' to German."]


@dataclass
class TrafficStats:
    sent: int = 0
    errors: int = 0
    feedback_sent: int = 0
    feedback_failed: int = 0
    by_version: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, version: str | None, ok: bool) -> None:
        with self.lock:
            self.sent += 1
            if not ok:
                self.errors += 1
            if version:
                self.by_version[version] = self.by_version.get(version, 0) + 1


class FeedbackPoster:
    """Posts each feedback item to the controller once its delay has passed (one background thread)."""

    def __init__(self, address: str, stats: TrafficStats):
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.stats = stats
        self.heap: list[tuple[float, int, dict]] = []
        self.cv = threading.Condition()
        self.n = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="feedback")

    def later(self, delay_s: float, item: dict) -> None:
        with self.cv:
            self.n += 1
            heapq.heappush(self.heap, (time.monotonic() + delay_s, self.n, item))
            self.cv.notify()

    def _run(self) -> None:
        conn = None
        while not self.stop.is_set():
            batch = []
            with self.cv:
                now = time.monotonic()
                while self.heap and self.heap[0][0] <= now and len(batch) < 200:
                    batch.append(heapq.heappop(self.heap)[2])
                if not batch:
                    wait = (self.heap[0][0] - now) if self.heap else 0.5
                    self.cv.wait(min(0.5, max(0.01, wait)))
                    continue
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                conn.request("POST", "/v1/feedback", body=json.dumps(batch), headers={"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status in (200, 207)
            except (OSError, http.client.HTTPException):
                ok = False
                if conn is not None:
                    conn.close()
                conn = None
            with self.stats.lock:
                if ok:
                    self.stats.feedback_sent += len(batch)
                else:
                    self.stats.feedback_failed += len(batch)


class TrafficGenerator:
    """Paced, sticky, mixed traffic. ``rate`` is requests/s over all models; ``start()``/``close()``."""

    def __init__(self, listener: str, feedback: str | None, rate: float = 80.0, users: int = 2000,
                 threads: int = 4, chat_share: float = 0.5, label_share: float = 0.9, label_delay_s: float = 2.0,
                 thumbs_share: float = 0.3, seed: int = 7, classify_path: str = "/v1/classify",
                 chat_path: str = "/v1/chat/completions"):
        self.host, port = listener.rsplit(":", 1)
        self.port = int(port)
        self.rate = rate
        self.users = users
        self.chat_share = chat_share
        self.label_share = label_share
        self.label_delay_s = label_delay_s
        self.thumbs_share = thumbs_share
        self.chat_path, self.classify_path = chat_path, classify_path
        self.stats = TrafficStats()
        self.poster = FeedbackPoster(feedback, self.stats) if feedback else None
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i, threads, seed + i), daemon=True,
                                         name=f"traffic-{i}") for i in range(threads)]

    def start(self) -> "TrafficGenerator":
        if self.poster:
            self.poster.thread.start()
        for t in self.threads:
            t.start()
        return self

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        if self.poster:
            self.poster.stop.set()
            self.poster.thread.join(5)

    def _run(self, index: int, n_threads: int, seed: int) -> None:
        rng = random.Random(seed)
        conn: http.client.HTTPConnection | None = None
        interval = n_threads / self.rate
        next_at = time.monotonic() + rng.random() * interval
        classes, weights = list(CLASSES), list(CLASSES.values())
        while not self.stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
            next_at = max(next_at + interval, time.monotonic() - 1.0)
            user = f"user-{rng.randrange(self.users)}"
            rid = uuid.uuid4().hex
            headers = {"x-user-id": user, "x-request-id": rid, "content-type": "application/json"}
            true_class = None
            if rng.random() < self.chat_share:
                path = self.chat_path
                body = {"model": "chat", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                        "logprobs": True, "top_logprobs": 3}
            else:
                path = self.classify_path
                true_class = rng.choices(classes, weights)[0]
                headers["x-true-class"] = true_class
                body = {"text": f"ticket from {user} about {true_class}"}
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=15)
                conn.request("POST", path, body=json.dumps(body), headers=headers)
                resp = conn.getresponse()
                resp.read()
                lockgate_id = resp.getheader("x-lockgate-request-id")
                self.stats.count(resp.getheader("x-model-version"), resp.status < 500)
            except (OSError, http.client.HTTPException):
                self.stats.count(None, False)
                if conn is not None:
                    conn.close()
                conn = None
                continue
            if self.poster is None:
                continue
            key = {"request_id": lockgate_id} if lockgate_id else {"client_request_id": rid}
            if true_class is not None and rng.random() < self.label_share:
                self.poster.later(self.label_delay_s * (0.5 + rng.random()), {**key, "true_class": true_class})
            elif true_class is None and rng.random() < self.thumbs_share:
                self.poster.later(self.label_delay_s, {**key, "thumbs": "up" if rng.random() < 0.8 else "down"})
        if conn is not None:
            conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m lockgate.examples.traffic")
    ap.add_argument("--listener", default="127.0.0.1:10000", help="lockgate's Envoy listener host:port")
    ap.add_argument("--feedback", default="127.0.0.1:18021", help="controller HTTP host:port ('' = no feedback)")
    ap.add_argument("--rate", type=float, default=80.0, help="requests per second (all models)")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--duration", type=float, default=0, help="seconds (0 = until Ctrl-C)")
    args = ap.parse_args()
    gen = TrafficGenerator(args.listener, args.feedback or None, args.rate, args.users).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait(args.duration or None)
    except KeyboardInterrupt:
        pass
    gen.close()
    s = gen.stats
    print(f"sent {s.sent} requests ({s.errors} errors), feedback {s.feedback_sent} ({s.feedback_failed} failed), "
          f"by version {s.by_version}")


if __name__ == "__main__":
    main()
