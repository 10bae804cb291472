"""A tiny upstream for data-path tests: answers every request with JSON naming its version and
echoing the request headers it received. ``python -m tests.echo_upstream --port 0 --version v1``
prints ``ready <port>``. Optional ``--log FILE``: one JSON line per request with arrival time;
``--error-rate P``: answer 500 to a share P of requests (a bad host, for per-host gating tests)."""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--version", required=True)
    ap.add_argument("--log")
    ap.add_argument("--error-rate", type=float, default=0.0)
    args = ap.parse_args()
    log = open(args.log, "a", buffering=1) if args.log else None
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True
        wbufsize = 65536  # one send per response (flushed by BaseHTTPRequestHandler)

        def _answer(self) -> None:
            arrived = time.time()
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            body = json.dumps({"version": args.version, "path": self.path,
                               "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
            self.send_response(500 if args.error_rate and random.random() < args.error_rate else 200)
            self.send_header("content-type", "application/json")
            self.send_header("x-model-version", args.version)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            if log is not None:
                with lock:
                    log.write(json.dumps({"t": arrived, "user": self.headers.get("x-user-id")}) + "\n")

        do_GET = do_POST = _answer

        def log_message(self, *a) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"ready {server.server_address[1]}", flush=True)
    server.serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
