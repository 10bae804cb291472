"""``GET /openapi.json``: the controller's HTTP API described from its route table — every registered
route (the built-in ones and the rollout API) is in it, with its methods, parameters and answers."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request

from lockgate.controller.api.http import FEEDBACK_SCHEMA, ControllerHTTP
from lockgate.controller.api.openapi import RouteDoc
from lockgate.controller.ingest.collector import ControllerMetrics
from lockgate.controller.ingest.observations import LABEL_KINDS, ObservationStore


class _FakeCommands:  # a RolloutCommands; never called here
    async def action(self, model, action, actor):
        return {}

    async def start(self, spec_text, source, actor):
        return {}

    def status(self, model=None):
        return []


def _get(port: int, path: str) -> tuple[int, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.status, json.loads(r.read())


def test_every_registered_route_is_described(tmp_path):
    from lockgate.controller.api.rollouts import register_routes

    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    store = ObservationStore(tmp_path / "obs.db")
    api = ControllerHTTP("127.0.0.1", 0, store, ControllerMetrics(), retention_s=86400)
    try:
        register_routes(api, _FakeCommands(), loop, {"chat"})
        api.add_route("GET", "/v1/extra", lambda *a: (200, {}), RouteDoc("an added route", query={"x": "a filter"}))
        api.start()
        status, doc = _get(api.address[1], "/openapi.json")
        assert status == 200 and doc["openapi"].startswith("3.1") and doc["info"]["title"]
        described = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
        assert api.routes and set(api.routes) == set(api.route_docs)
        for (method, prefix), route_doc in api.route_docs.items():
            for path in route_doc.paths or (prefix,):
                assert (method, path) in described, (method, path)
                op = doc["paths"][path][method.lower()]
                assert op["summary"] and op["responses"], (method, path)
        # nothing described that is not served
        assert len(described) == sum(len(d.paths or (p,)) for (_, p), d in api.route_docs.items())
        # built-in routes: path parameters, the feedback body schema, answers
        obs = doc["paths"]["/v1/observations/{request_id}"]["get"]
        assert obs["parameters"][0] == {"name": "request_id", "in": "path", "required": True,
                                        "schema": {"type": "string"}}
        fb = doc["paths"]["/v1/feedback"]["post"]
        assert fb["requestBody"]["content"]["application/json"]["schema"] == FEEDBACK_SCHEMA
        assert {"200", "207", "400", "404", "409", "410", "413", "503"} <= set(fb["responses"])
        assert doc["paths"]["/v1/extra"]["get"]["parameters"][0]["name"] == "x"
        assert "security" not in doc  # auth off
        assert {"/metrics", "/healthz", "/openapi.json", "/v1/rollouts", "/v1/rollouts/start",
                "/v1/rollouts/{model}/{action}"} <= set(doc["paths"])
        # the rollout routes describe their bodies, parameters and answers
        act = doc["paths"]["/v1/rollouts/{model}/{action}"]["post"]
        assert [p["name"] for p in act["parameters"]] == ["model", "action"]
        assert "actor" in act["requestBody"]["content"]["application/json"]["schema"]["properties"]
        start = doc["paths"]["/v1/rollouts/start"]["post"]
        assert start["requestBody"]["content"]["application/json"]["schema"]["required"] == ["spec"]
        assert {"200", "400", "409", "504"} <= set(start["responses"])
        assert doc["paths"]["/v1/rollouts"]["get"]["parameters"][0]["name"] == "model"
    finally:
        api.stop()
        store.close()
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)


def test_feedback_schema_names_every_label_kind():
    """The schema and :func:`parse_feedback` accept the same fields (LABEL_KINDS is the one list)."""
    item = FEEDBACK_SCHEMA["oneOf"][0]
    assert set(item["properties"]) == {"request_id", "client_request_id", *LABEL_KINDS}


def test_docs_default_to_the_handlers_docstring(tmp_path):
    store = ObservationStore(tmp_path / "obs.db")
    api = ControllerHTTP("127.0.0.1", 0, store, ControllerMetrics(), retention_s=86400)
    try:
        def handler(path, query, body, client):
            """Do the thing.

            At length."""
            return 200, {}

        api.add_route("POST", "/v1/thing", handler)
        api.add_route("POST", "/v1/bare", lambda *a: (200, {}))
        api.add_route("GET", "/v1/named", lambda *a: (200, {}), "named in one line")
        paths = api.openapi()["paths"]
        assert paths["/v1/thing"]["post"]["summary"] == "Do the thing."
        assert paths["/v1/bare"]["post"]["summary"] == "POST /v1/bare"
        assert paths["/v1/named"]["get"]["summary"] == "named in one line"
    finally:
        api.server.server_close()
        store.close()
