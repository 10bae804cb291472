"""What opt-in response-body retention (``capture.retain_bodies``) costs the ext_proc hot path.

    .venv/bin/python bench/body_samples.py [--ref REV] [--n 20000] [--rounds 9] [--chunks 4]

In-process, no gRPC, one ~1 KB JSON chat completion per response split in ``--chunks`` STREAMED
chunks. Two levels, each the median (and min) over interleaved rounds of the time per response:

* capture — ``ResponseCapture.start`` (parse Envoy's attributes and headers) + ``feed`` per chunk +
  ``finish``: the code body retention touches;
* server  — the whole ``ExtProcServer.Process`` generator (headers + body messages, answers, shipping
  to a shipper that only appends, Prometheus metrics).

Configurations:

* ``ref``         — capture.py as of git ``REV`` (before body retention; capture level only), with ``--ref``;
* ``off``         — this tree, ``retain_bodies`` not configured (sampler None: nothing is hashed);
* ``unsampled``   — this tree, ``retain_bodies`` on for canary at 0.01, every response from the
  *baseline* (a role that is not sampled: no hash is computed);
* ``canary-miss`` — on, canary responses whose request id hashes above the rate (hash computed, not kept);
* ``sampled``     — on at rate 1.0: every response keeps up to max_bytes (16 KiB) of its body.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from google.protobuf import struct_pb2  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep  # noqa: E402
from lockgate.config import config_from_text  # noqa: E402
from lockgate.extproc.capture import ATTR_NS  # noqa: E402

BODY = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion", "model": "chat-v2", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "the canary answer is stable and fine " * 20},
     "finish_reason": "stop"}], "usage": {"prompt_tokens": 9, "completion_tokens": 140}}).encode()


def load_ref(rev: str, tmp: Path) -> types.ModuleType:
    """capture.py of ``rev`` as a private module."""
    src = subprocess.run(["git", "show", f"{rev}:lockgate/extproc/capture.py"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    (tmp / "_ref_capture.py").write_text(src)
    spec = importlib.util.spec_from_file_location("_ref_capture", tmp / "_ref_capture.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_ref_capture"] = mod
    spec.loader.exec_module(mod)
    return mod


def config(tmp: Path, retain: dict | None):
    models = {"name": "chat", "match": {"path_prefix": "/"}, "stable": "v1",
              "versions": {"v1": {"endpoints": ["127.0.0.1:1"]}, "v2": {"endpoints": ["127.0.0.1:2"]}}}
    doc = {"listener": {"address": "127.0.0.1", "port": 10000}, "state_dir": str(tmp / "state"),
           "models": [models]}
    if retain is not None:
        doc["capture"] = {"retain_bodies": retain}
    return config_from_text(json.dumps(doc), "bench.yaml")


def messages(version: str, rid: str, chunks: int) -> list[ep.ProcessingRequest]:
    attrs = struct_pb2.Struct()
    attrs.update({"xds.cluster_name": f"chat.{version}", "xds.route_name": "chat/sticky?canary=v2&w=500&stage=",
                  "request.id": rid, "request.time": "2026-01-01T00:00:00.000000Z",
                  "upstream.address": "127.0.0.1:1", "request.size": 100})
    hdrs = ep.ProcessingRequest()
    hdrs.response_headers.headers.headers.extend([
        base_pb2.HeaderValue(key=":status", raw_value=b"200"),
        base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")])
    hdrs.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    out = [hdrs]
    step = -(-len(BODY) // chunks)
    for i in range(chunks):
        m = ep.ProcessingRequest()
        m.response_body.body = BODY[i * step:(i + 1) * step]
        m.response_body.end_of_stream = i == chunks - 1
        out.append(m)
    return out


class Sink:
    def __init__(self):
        self.queue = []

    def offer(self, o):
        self.queue.append(o)
        if len(self.queue) > 1000:
            self.queue.clear()
        return True


async def run(server, streams: list[list]) -> float:
    async def gen(msgs):
        for m in msgs:
            yield m

    t0 = time.perf_counter()
    for msgs in streams:
        async for _ in server.Process(gen(msgs), None):
            pass
    return (time.perf_counter() - t0) / len(streams) * 1e6


def run_capture(start, args: tuple, kwargs: dict, streams: list[list]) -> float:
    """start + feed + finish per response, as the server calls them."""
    now = time.time()
    t0 = time.perf_counter()
    for msgs in streams:
        h = msgs[0]
        cap = start(h.response_headers, h.attributes.get(ATTR_NS), now, *args, **kwargs)
        for m in msgs[1:]:
            cap.feed(m.response_body.body)
        cap.finish(now, True)
    return (time.perf_counter() - t0) / len(streams) * 1e6


def report(title: str, results: dict[str, list[float]]) -> None:
    print(title)
    for name, xs in results.items():
        print(f"  {name:12s} median {statistics.median(xs):7.2f}  min {min(xs):7.2f}   "
              f"rounds: {' '.join(f'{x:.1f}' for x in xs)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", help="git revision whose capture.py is the baseline (before body retention)")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--chunks", type=int, default=4)
    args = ap.parse_args()
    from lockgate.extproc import server as cur
    from lockgate.extproc.capture import ResponseCapture

    tmp = Path(tempfile.mkdtemp(prefix="lockgate-bench-"))
    retain = {"sample_rate": 0.01, "max_bytes": 16384, "roles": ["canary"]}

    def make(cfg):
        return cur.ExtProcServer(cfg, Sink(), cur.CaptureMetrics(CollectorRegistry()))

    base_streams = [messages("v1", f"req-{i:08d}", args.chunks) for i in range(args.n)]
    canary_streams = [messages("v2", f"req-{i:08d}", args.chunks) for i in range(args.n)]
    servers: dict[str, tuple] = {}
    servers["off"] = (make(config(tmp, None)), base_streams)
    servers["unsampled"] = (make(config(tmp, retain)), base_streams)
    miss = make(config(tmp, retain))
    servers["canary-miss"] = (miss, [s for s in canary_streams if not miss.sampler.sampled(
        s[0].attributes[ATTR_NS].fields["request.id"].string_value)])
    servers["sampled"] = (make(config(tmp, {**retain, "sample_rate": 1.0})), canary_streams)
    captures: dict[str, tuple] = {}
    if args.ref:
        ref = load_ref(args.ref, tmp)
        srv = servers["off"][0]
        captures["ref"] = (ref.ResponseCapture.start, (srv.models, srv.analyzer_cfg, srv.key_secret, srv.header_names),
                           {}, base_streams)
    for name, (srv, streams) in servers.items():
        captures[name] = (ResponseCapture.start, (srv.models, srv.analyzer_cfg, srv.key_secret, srv.header_names),
                          {"sampler": srv.sampler}, streams)
    for name, (srv, streams) in servers.items():  # sanity: what each configuration ships
        asyncio.run(run(srv, streams[:50]))
        o = srv.shipper.queue[-1]
        kept = len(o.body_sample) if o.HasField("body_sample") else None
        print(f"{name:12s} role={o.role:8s} body_sample={kept}", file=sys.stderr)
    cap_results: dict[str, list[float]] = {k: [] for k in captures}
    srv_results: dict[str, list[float]] = {k: [] for k in servers}
    for r in range(args.rounds):
        order = list(captures) if r % 2 == 0 else list(reversed(captures))
        for name in order:
            start, a, kw, streams = captures[name]
            cap_results[name].append(run_capture(start, a, kw, streams))
        order = list(servers) if r % 2 == 0 else list(reversed(servers))
        for name in order:
            srv, streams = servers[name]
            srv_results[name].append(asyncio.run(run(srv, streams)))
    shape = f"{args.chunks} body chunks, {len(BODY)} B body, {args.n} responses x {args.rounds} rounds"
    report(f"capture level (start + feed + finish), µs per response ({shape}):", cap_results)
    report(f"server level (ExtProcServer.Process), µs per response ({shape}):", srv_results)


if __name__ == "__main__":
    main()
