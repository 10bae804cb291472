"""The rollout routes of the controller's HTTP API (what ``lockgate rollout …`` calls).

* ``POST /v1/rollouts/start`` — body ``{"spec": <YAML text>, "source": <file name>}``
* ``GET  /v1/rollouts[?model=M]`` — status of the latest rollout of each model (or of ``M``)
* ``POST /v1/rollouts/<model>/<action>`` — ``pause`` | ``resume`` | ``abort`` | ``promote``
* ``POST /v1/rollouts/<model>/approve`` — body ``{"stage": N, "note": …}`` (both optional): approve leaving
  stage N (default: the current one) of a step with ``approval: {required: true}``

Handlers run on the HTTP server's worker threads and hand the work to the controller's event loop
(:class:`~lockgate.controller.ports.RolloutCommands`), waiting at most :data:`CALL_TIMEOUT_S`. Every
malformed body is a 400 naming what is wrong. The actor recorded is the authenticated client's name
when the API requires tokens (an ``actor`` field in the body is then ignored).
"""

from __future__ import annotations

import asyncio
import json
from typing import Collection

from lockgate.controller.api.openapi import RouteDoc
from lockgate.controller.decide.actions import ACTIONS
from lockgate.controller.decide.promoter import RolloutError
from lockgate.controller.decide.rollouts import RolloutConflict
from lockgate.controller.ports import RolloutCommands
from lockgate.yamlconf import type_name

CALL_TIMEOUT_S = 60.0  #: a rollout call that takes longer is answered 504 (the work may still complete)
_ACTOR = {"type": "string", "maxLength": 200,
          "description": "who did it (ignored when the API requires tokens: the client's name is recorded)"}
#: JSON Schema of ``POST /v1/rollouts/start`` (for /openapi.json)
START_SCHEMA = {"type": "object", "required": ["spec"],
                "properties": {"spec": {"type": "string", "description": "the rollout spec's YAML text"},
                               "source": {"type": "string", "maxLength": 500,
                                          "description": "its file name, for messages and the log"},
                               "actor": _ACTOR}}
#: JSON Schema of ``POST /v1/rollouts/{model}/{action}`` (an empty body is allowed)
ACTION_SCHEMA = {"type": "object", "properties": {
    "actor": _ACTOR,
    "stage": {"type": "integer", "minimum": 1,
              "description": "approve only: the stage (1-based) whose end is approved; default the current one"},
    "note": {"type": "string", "maxLength": 500, "description": "approve only: a note kept in the log"}}}

__all__ = ["ACTION_SCHEMA", "CALL_TIMEOUT_S", "START_SCHEMA", "register_routes"]


def _json_object(body: bytes, shape: str) -> dict:
    """The request body as a JSON object (an empty body is ``{}``); RolloutError 400 naming what is wrong."""
    if not body.strip():
        return {}
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RolloutError(f"body is not UTF-8 (byte {exc.start})", 400) from None
    except (ValueError, RecursionError) as exc:
        raise RolloutError(f"body is not valid JSON: {str(exc)[:200]}", 400) from None
    if not isinstance(data, dict):
        raise RolloutError(f"body must be a JSON object {shape}, got {type_name(data)}", 400)
    return data


def _actor(req: dict, client: str | None) -> str:
    """Who did it: the authenticated client's name when the API requires tokens (an ``actor`` field in the
    body is then ignored); without auth (loopback only), what the caller wrote, as before."""
    if client is not None:
        return client
    actor = req.get("actor", "unknown")
    if not isinstance(actor, str) or not actor.strip() or len(actor) > 200 or "\n" in actor:
        raise RolloutError(f"actor: must be a one-line string of at most 200 characters, got {type_name(actor)}",
                           400)
    return actor


def register_routes(http, commands: RolloutCommands, loop: asyncio.AbstractEventLoop,
                    models: Collection[str]) -> None:
    """Add the rollout routes to ``http`` (``add_route(method, prefix, fn)``; ``fn(path, query, body, client)``
    returns ``(status, JSON)``). ``commands`` run on ``loop``; ``models`` are the configured model names."""

    def call(coro, timeout: float = CALL_TIMEOUT_S):
        fut = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise RolloutError(f"the controller did not answer within {timeout:g} s; check `lockgate rollout "
                               "status` before retrying", 504) from None

    def guard(fn):
        def inner(path, query, body, client=None):
            try:
                return fn(path, query, body, client)
            except RolloutError as exc:
                return exc.status, {"error": str(exc), "detail": exc.detail}
            except RolloutConflict as exc:
                return 409, {"error": str(exc)}
        return inner

    def start(path, query, body, client):
        req = _json_object(body, '{"spec": <YAML text>, "source": <file name>}')
        spec_text, source = req.get("spec"), req.get("source", "<request>")
        if not isinstance(spec_text, str):
            raise RolloutError("spec: must be the rollout spec's YAML text (a string), got "
                               f"{type_name(spec_text) if 'spec' in req else 'nothing'}", 400)
        if not isinstance(source, str) or not source or len(source) > 500 or "\n" in source:
            raise RolloutError(f"source: must be a one-line file name of at most 500 characters, got "
                               f"{type_name(source)}", 400)
        return 200, call(commands.start(spec_text, source, _actor(req, client)))

    def status(path, query, body, client):
        model = query.get("model")
        if model and model not in models:
            return 404, {"error": f"unknown model {model!r}"}
        return 200, {"rollouts": commands.status(model)}

    def act(path, query, body, client):
        parts = path.strip("/").split("/")  # v1/rollouts/<model>/<action>
        if len(parts) != 4:
            return 404, {"error": f"no such endpoint {path}"}
        if parts[3] == "approve":
            return approve(parts[2], body, client)
        if parts[3] not in ACTIONS:
            raise RolloutError(f"unknown action {parts[3][:50]!r} (one of: {', '.join(ACTIONS)}, approve)", 400)
        req = _json_object(body, '{"actor": …} (or an empty body)')
        return 200, call(commands.action(parts[2], parts[3], _actor(req, client)))

    def approve(model, body, client):
        """The approver is the authenticated client when the API requires tokens (never a name the caller
        writes); without auth, the name the caller gives, recorded as unauthenticated."""
        req = _json_object(body, '{"stage": N, "note": …, "actor": …} (or an empty body)')
        stage = req.get("stage")
        if stage is not None and (isinstance(stage, bool) or not isinstance(stage, int) or stage < 1):
            raise RolloutError(f"stage: must be a stage number (1 = the first), got {type_name(stage)}", 400)
        note = req.get("note", "")
        if not isinstance(note, str) or len(note) > 500:
            raise RolloutError(f"note: must be a string of at most 500 characters, got {type_name(note)}", 400)
        if model not in models:
            return 404, {"error": f"unknown model {model[:100]!r}"}
        return 200, call(commands.approve(model, stage, _actor(req, client), client is not None, note))

    errors = {400: "malformed, naming what is wrong", 409: "conflict: another rollout of the model is active, "
              "or the rollout's status moved on", 504: "the controller did not answer in time"}
    http.add_route("POST", "/v1/rollouts/start", guard(start), RouteDoc(
        "start a rollout from a rollout spec (lockgate rollout start)",
        "The spec is validated whole (every problem named with line and field) before anything changes.",
        request_schema=START_SCHEMA, responses={200: "the rollout, its plan and warnings", **errors}))
    http.add_route("GET", "/v1/rollouts", guard(status), RouteDoc(
        "status of the latest rollout of each model (lockgate rollout status)",
        query={"model": "only this model"}, responses={200: "the rollouts", 404: "unknown model"}))
    http.add_route("POST", "/v1/rollouts", guard(act), RouteDoc(
        "pause, resume, abort, promote or approve (a stage of) a model's active rollout",
        paths=("/v1/rollouts/{model}/{action}",), request_schema=ACTION_SCHEMA,
        responses={200: "done: the rollout after the action", 404: "no such endpoint or model", **errors}))
