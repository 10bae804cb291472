"""How a response stream ended when it did not end normally: Envoy's access log, forwarded.

A stream the model server cuts mid-way (connection closed or reset after the headers went out) and
one the client walks away from look the same to the ext_proc server: its gRPC stream is reset before
the body's end of stream. Envoy itself knows which side ended it (checked on Envoy 1.40: an SSE stream
the upstream closes mid-chunk is ``UPE`` with details
``upstream_reset_after_response_started{protocol_error}``; a client that disconnects is ``DC``,
``downstream_remote_disconnect``; the route timeout firing mid-stream is ``UT``, ``response_timeout``;
the status stays 200 in all three). So lockgate's HCM has a gRPC access log
(:func:`lockgate.xds.resources.access_log`) that
sends an entry to this process **only** for a stream with one of those response flags and a status
below 500 (a 5xx already counts as an error by its status), and this servicer turns each entry into a
:class:`StreamOutcome` shipped with the next batch; the controller joins it to the observation with
the same request id. Normal responses cost nothing here: Envoy filters them out.
"""

from __future__ import annotations

import logging
import time

from envoy.data.accesslog.v3 import accesslog_pb2 as ald
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from lockgate.extproc.capture import attribute
from lockgate.proto.v1 import observations_pb2 as obs_pb2
from lockgate.routing import OUTCOME_FLAGS, REQUEST_ID_HEADER

log = logging.getLogger("lockgate.extproc.outcomes")


def classify(flags: ald.ResponseFlags) -> tuple[str, str]:
    """``(error_kind, short flags)`` of an entry's response flags; ``("", …)`` when none of ours is set."""
    kind = ""
    names = []
    for field, short, k in OUTCOME_FLAGS:  # first set wins (upstream causes first)
        if getattr(flags, field):
            names.append(short)
            kind = kind or k
    return kind, ",".join(names)


def outcome_from_entry(entry: ald.HTTPAccessLogEntry, models: dict, now: float) -> obs_pb2.StreamOutcome | None:
    """One access log entry → a :class:`StreamOutcome`, or None (no flag of ours, no lockgate id, or
    not a lockgate model's route)."""
    common = entry.common_properties
    kind, flags = classify(common.response_flags)
    if not kind:
        return None
    rid = entry.request.request_headers.get(REQUEST_ID_HEADER, "")
    if not rid:
        return None
    who = attribute(models, common.upstream_cluster, common.route_name)
    if who is None:
        return None
    return obs_pb2.StreamOutcome(
        request_id=rid, model=who.model.name, version=who.version, role=who.role, error_kind=kind,
        response_flags=flags, details=entry.response.response_code_details[:256],
        status_code=entry.response.response_code.value, ts=now)


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):
    """``StreamAccessLogs``: Envoy keeps one stream open per worker; each entry that names a cut stream
    of a lockgate model becomes a :class:`StreamOutcome` for the shipper (``shipper.offer_outcome``)."""

    def __init__(self, models: dict, shipper, on_outcome=None):
        self.models = models
        self.shipper = shipper
        self.on_outcome = on_outcome or (lambda o: None)

    async def StreamAccessLogs(self, request_iterator, context):
        async for msg in request_iterator:
            now = time.time()
            for entry in msg.http_logs.log_entry:
                try:
                    o = outcome_from_entry(entry, self.models, now)
                except Exception:  # never let one odd entry end Envoy's log stream
                    log.exception("access log entry not understood")
                    continue
                if o is not None:
                    self.shipper.offer_outcome(o)
                    self.on_outcome(o)
        return als_pb2.StreamAccessLogsResponse()


__all__ = ["AccessLogReceiver", "classify", "outcome_from_entry"]
