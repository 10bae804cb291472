"""The OpenAPI 3.1 description of the controller's HTTP API, generated from its route table.

Every route is registered with :meth:`lockgate.controller.api.http.ControllerHTTP.add_route` together
with a :class:`RouteDoc`; :func:`build_openapi` turns the table into the document served at
``GET /openapi.json``, so the description cannot drift from the routes that exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

#: the body of every refusal and error answer
ERROR_SCHEMA: dict[str, Any] = {"type": "object", "required": ["error"],
                                "properties": {"error": {"type": "string", "description": "one line, for people"}},
                                "additionalProperties": True}


@dataclass(frozen=True)
class RouteDoc:
    """What one registered route does, for the OpenAPI description.

    ``paths`` are the OpenAPI paths the route's prefix serves (``/v1/rollouts/{model}/{action}``;
    ``{name}`` segments become path parameters); empty means the prefix itself. ``query`` maps query
    parameter names to their descriptions. ``request_schema`` is the JSON Schema of a JSON request body.
    ``responses`` maps status codes to descriptions; ``content_type`` is the type of a 200 answer."""

    summary: str
    description: str = ""
    paths: tuple[str, ...] = ()
    query: Mapping[str, str] = field(default_factory=dict)
    request_schema: Mapping[str, Any] | None = None
    responses: Mapping[int, str] = field(default_factory=lambda: {200: "done (JSON)"})
    content_type: str = "application/json"


def doc_for(method: str, prefix: str, fn: Any, doc: RouteDoc | str | None) -> RouteDoc:
    """``doc`` as a :class:`RouteDoc`: a string is its summary; None takes the first line of ``fn``'s
    docstring (else ``METHOD prefix``)."""
    if isinstance(doc, RouteDoc):
        return doc
    if isinstance(doc, str) and doc.strip():
        return RouteDoc(summary=doc.strip())
    text = (getattr(fn, "__doc__", None) or "").strip()
    return RouteDoc(summary=text.splitlines()[0] if text else f"{method} {prefix}", description=text)


def _operation(method: str, path: str, doc: RouteDoc, auth: bool) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": doc.summary,
                          "operationId": re.sub(r"[^A-Za-z0-9]+", "_", f"{method.lower()}{path}").strip("_")}
    if doc.description:
        op["description"] = doc.description
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in re.findall(r"{(\w+)}", path)]
    params += [{"name": name, "in": "query", "required": False, "description": text, "schema": {"type": "string"}}
               for name, text in doc.query.items()]
    if params:
        op["parameters"] = params
    if doc.request_schema is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": dict(doc.request_schema)}}}
    responses: dict[str, Any] = {}
    for code, text in sorted(doc.responses.items()):
        if 200 <= code < 300:
            ctype = doc.content_type if code == 200 else "application/json"
            responses[str(code)] = {"description": text, "content": {ctype: {}}}
        else:
            responses[str(code)] = {"description": text, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Error"}}}}
    # refusals any route may answer, decided before its handler runs (docs/operations.md, inputs and limits)
    if auth:
        responses.setdefault("401", {"description": "no or unknown bearer token", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}})
    for code, text in (("413", "body larger than the limit"), ("503", "busy: too many connections, or no answer "
                                                                    "within the handler timeout; retry later")):
        responses.setdefault(code, {"description": text, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}})
    op["responses"] = responses
    return op


def build_openapi(routes: Iterable[tuple[str, str, RouteDoc]], auth: bool, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``routes`` (``(method, prefix, doc)``). With ``auth`` every operation
    requires ``authorization: Bearer <token>``."""
    paths: dict[str, dict[str, Any]] = {}
    for method, prefix, doc in sorted(routes, key=lambda r: (r[1], r[0])):
        for path in doc.paths or (prefix,):
            paths.setdefault(path, {})[method.lower()] = _operation(method, path, doc, auth)
    out: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "lockgate controller API", "version": version,
                 "description": "Feedback, observations, metrics and the rollout API of the lockgate controller "
                                "(controller.http). HEAD is answered like GET."},
        "paths": paths,
        "components": {"schemas": {"Error": ERROR_SCHEMA},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "a token from auth.tokens"}}},
    }
    if auth:
        out["security"] = [{"bearer": []}]
    return out


__all__ = ["ERROR_SCHEMA", "RouteDoc", "build_openapi", "doc_for"]
