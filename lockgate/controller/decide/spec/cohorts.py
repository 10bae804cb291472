"""``rollout.cohorts``: named groups of users sent to the canary by a header or cookie value, whatever the
weight and the sticky hash (docs/rollout-spec.md, "Cohorts").

A cohort is a standing rule (from the first step, the default) or a step rule (``from_step: N``: from
the N-th step of ``steps`` on, counted from 1 as the stages are: ``stage-N``). The controller sends the
cohorts active at the current stage with every weight it sets (:meth:`CohortRule.active`); a rollback
drops them. Their requests are labelled with the cohort and are never part of the random sample the
gates compare (role ``other``).

Parsed here with file/line errors, as the rest of the spec: names unique and :data:`COHORT_NAME_RE`;
``header: {name, value}`` xor ``cookie: {name, value}``; header names per ``HEADER_RE`` (lower case),
cookie names per ``COOKIE_RE``; the reserved ``x-lockgate-`` prefix, ``cookie`` as a header and
pseudo-headers refused; one rule per (header or cookie, value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lockgate.config.common import COOKIE_RE, HEADER_RE
from lockgate.routing import COHORT_NAME_RE, COOKIE_HEADER, RESERVED_HEADER_PREFIX, Cohort
from lockgate.yamlconf import ErrorCollector, Fields, PathPart

COHORT_KEYS = ("name", "header", "cookie", "from_step")
MATCH_KEYS = ("name", "value")
MAX_COHORTS = 16          #: cohorts per rollout (each is one more Envoy route)
MAX_COHORT_VALUE_CHARS = 256


@dataclass(frozen=True)
class CohortRule:
    """A cohort and the stage it starts at (``from_stage``: 0-based index into the spec's steps)."""

    cohort: Cohort
    from_stage: int = 0

    def active(self, stage: int) -> bool:
        return stage >= self.from_stage

    def canonical(self) -> dict:
        c = self.cohort
        return {"name": c.name, c.kind: {"name": c.key, "value": c.value}, "from_step": self.from_stage + 1}

    def describe(self) -> str:
        when = "every stage" if self.from_stage == 0 else f"from stage-{self.from_stage + 1}"
        return f"{self.cohort.describe()}, {when}"


def active_cohorts(rules: tuple[CohortRule, ...], stage: int) -> tuple[Cohort, ...]:
    """The cohorts sent to the canary at ``stage`` (0-based), in the spec's order."""
    return tuple(r.cohort for r in rules if r.active(stage))


def _match(f: Fields, kind: str, errors: ErrorCollector) -> tuple[str, str] | None:
    mf = f.sub(kind)
    name = mf.str("name", required=True)
    value = mf.str("value", required=True)
    mf.finish()
    ok = True
    if name is not None:
        if kind == "header":
            if not HEADER_RE.match(name):
                errors.add(mf.path + ("name",), f"must be a lower-case HTTP header name ({HEADER_RE.pattern}), "
                                                f"got {name!r}")
                ok = False
            elif name.startswith(RESERVED_HEADER_PREFIX):
                errors.add(mf.path + ("name",), f"{name!r}: headers starting with {RESERVED_HEADER_PREFIX} are "
                                                f"lockgate's own (Envoy strips or overwrites them)")
                ok = False
            elif name == COOKIE_HEADER:
                errors.add(mf.path + ("name",), "to match a cookie write cookie: {name: <cookie>, value: ...}")
                ok = False
        elif not COOKIE_RE.match(name):
            errors.add(mf.path + ("name",), f"must be a cookie name ({COOKIE_RE.pattern}), got {name!r}")
            ok = False
    if value is not None:
        if not value:
            errors.add(mf.path + ("value",), "must not be empty")
            ok = False
        elif len(value) > MAX_COHORT_VALUE_CHARS:
            errors.add(mf.path + ("value",), f"at most {MAX_COHORT_VALUE_CHARS} characters, got {len(value)}")
            ok = False
        elif value != value.strip() or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value) or \
                (kind == "cookie" and (";" in value or "," in value)):
            errors.add(mf.path + ("value",), f"{value!r}: no control characters, no leading or trailing space"
                                             + (", no ';' or ','" if kind == "cookie" else ""))
            ok = False
    if name is None or value is None or not ok:
        return None
    return name, value


def parse_cohorts(f: Fields, errors: ErrorCollector, n_steps: int) -> tuple[CohortRule, ...]:
    """``rollout.cohorts`` (absent: none). ``n_steps``: the stages below 100 % (``from_step`` 1..n_steps)."""
    items = list(f.list("cohorts"))
    if len(items) > MAX_COHORTS:
        errors.add(f.path + ("cohorts",), f"at most {MAX_COHORTS} cohorts, got {len(items)}")
    out: list[CohortRule] = []
    names: dict[str, int] = {}
    matches: dict[tuple[str, str, str], int] = {}
    for path, item in items:
        cf = Fields(item, path, errors)
        name = cf.str("name", required=True)
        if name is not None and not COHORT_NAME_RE.match(name):
            errors.add(path + ("name",), f"must match {COHORT_NAME_RE.pattern} (lower-case letters, digits, "
                                         f"- and _), got {name!r}")
            name = None
        has_header, has_cookie = "header" in cf.data, "cookie" in cf.data
        cf.raw("header")
        cf.raw("cookie")
        match: tuple[str, str] | None = None
        kind = ""
        if has_header and has_cookie:
            errors.add(path, "one of header or cookie, not both (write two cohorts)")
        elif not has_header and not has_cookie:
            errors.add(path, "needs header: {name: ..., value: ...} or cookie: {name: ..., value: ...}")
        else:
            kind = "header" if has_header else "cookie"
            match = _match(cf, kind, errors)
        from_step = cf.int("from_step", 1, min=1, max=max(1, n_steps))
        cf.finish()
        if name is None or match is None or from_step is None:
            continue
        if name in names:
            errors.add(path + ("name",), f"duplicate cohort {name!r} (also cohorts[{names[name]}])")
            continue
        key = (kind, match[0], match[1])
        if key in matches:
            errors.add(path + (kind,), f"the same {kind} and value as cohorts[{matches[key]}]")
            continue
        names[name] = path[-1]  # type: ignore[assignment]
        matches[key] = path[-1]  # type: ignore[assignment]
        out.append(CohortRule(Cohort(name, kind, match[0], match[1]), from_step - 1))
    return tuple(out)


def cohorts_against_config(config: Any, path: tuple[PathPart, ...], model: str, rules: tuple[CohortRule, ...],
                           errors: ErrorCollector) -> None:
    """A cohort header may not be one lockgate's config already gives a meaning (the QA override's)."""
    qa = getattr(config, "qa_override", None)
    reserved = {h for h in ((qa.token_header, qa.version_header) if qa is not None else ()) if h}
    for i, rule in enumerate(rules):
        c = rule.cohort
        if c.kind == "header" and c.key in reserved:
            errors.add(path + (i, "header", "name"), f"{c.key!r} is a qa_override header in {config.source}")


__all__ = ["COHORT_KEYS", "CohortRule", "MATCH_KEYS", "MAX_COHORTS", "active_cohorts", "cohorts_against_config",
           "parse_cohorts"]
