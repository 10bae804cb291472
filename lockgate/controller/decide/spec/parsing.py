"""Parsing and validating a rollout spec (YAML) into a :class:`~.model.RolloutSpec`.

Validated like ``lockgate.yaml`` (:mod:`lockgate.yamlconf`): every problem is collected and reported
together as one :class:`~lockgate.yamlconf.ConfigError`, each naming file:line:col and the field path;
unknown keys are reported with the known ones (and a "did you mean" for typos). Cross-field rules (the
100 % step, a per-class metric without its class, alpha shares, model/version against lockgate.yaml) are
checked even when other fields are wrong, so one run lists everything; nothing is half-applied.

Over ~500 lines on purpose: it is the one place where every rule of the spec format is written, in the
order a reader meets the fields in a file.
"""

from __future__ import annotations

import difflib
import math
import re
import urllib.parse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lockgate.controller.decide.spec.catalogue import (
    ALLOWED_MODES,
    BUILTIN_METRICS,
    CHECK_METHODS,
    DEFAULT_CHECK_INTERVAL_S,
    DEFAULT_CHECK_STATUS,
    DEFAULT_CHECK_TIMEOUT_S,
    DEFAULT_ALPHA,
    DEFAULT_ANALYSIS_INTERVAL_S,
    DEFAULT_STEP_MIN_CANARY_SAMPLES,
    DEFAULT_STEP_MIN_DURATION_S,
    HARMFUL,
    MAX_ALPHA,
    MAX_ANALYSIS_INTERVAL_S,
    MAX_CHECK_INTERVAL_S,
    MAX_CHECK_TIMEOUT_S,
    MAX_CHECKS_PER_STEP,
    MAX_DURATION_S,
    MAX_EXCEEDANCE_RATIO,
    MAX_RELATIVE,
    MIN_CHECK_INTERVAL_S,
    NAME_RE,
    PREFLIGHTS,
    QUANTILE_METRICS,
    MetricDef,
)
from lockgate.controller.decide.spec.model import (
    DEFAULT_STEPS,
    GateCheck,
    MetricCriterion,
    PromotionPolicy,
    RolloutSpec,
    Step,
    _sha256,
)
from lockgate.controller.decide.spec.prometheus import check_against_config as check_prometheus_against_config
from lockgate.controller.decide.spec.prometheus import parse_prometheus, resolved
from lockgate.controller.decide.spec.cohorts import cohorts_against_config, parse_cohorts
from lockgate.controller.decide.spec.capacity import parse_capacity
from lockgate.controller.decide.spec.shadow import parse_shadow
from lockgate.routing import TOTAL_WEIGHT_BP
from lockgate.yamlconf import (
    ErrorCollector,
    Fields,
    PathPart,
    Problem,
    load_yaml,
    load_yaml_file,
    type_name,
)

if TYPE_CHECKING:  # pragma: no cover
    from lockgate.config import LockgateConfig

def spec_hash(spec_text: str, source: str = "<string>") -> str:
    """sha256 (hex) of the normalised spec in ``spec_text``; raises ConfigError if the spec is invalid.

    Equal for texts that mean the same rollout (whitespace, comments, key order, flow vs block style,
    ``10m`` vs ``600``, omitted vs explicit defaults); different as soon as any criterion, step,
    policy, model or version differs.
    """
    return spec_from_text(spec_text, source).sha256


# --------------------------------------------------------------------------- parsing helpers

_DURATION_RE = re.compile(r"^(?:\d+(?:\.\d+)?(?:d|h|m|s))+$")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(d|h|m|s)")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")


def parse_duration(value: Any) -> float:
    """``90s``, ``10m``, ``1.5h``, ``2d``, ``1h30m`` or a plain number of seconds → seconds.
    Raises ``ValueError`` with a user-facing message."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration such as 90s, 10m, 1.5h, 2d or seconds, got {type_name(value)}")
    if isinstance(value, (int, float)):
        seconds = _finite(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if _NUMBER_RE.match(text):
            seconds = _finite(float(text))
        elif _DURATION_RE.match(text):
            seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART_RE.findall(text))
        else:
            raise ValueError(f"must be a duration such as 90s, 10m, 1.5h, 2d or seconds, got {value!r}")
    else:
        raise ValueError(f"must be a duration such as 90s, 10m, 1.5h, 2d or seconds, got {type_name(value)}")
    if seconds is None or not math.isfinite(seconds):
        raise ValueError(f"must be a finite duration, got {value!r}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"must be at most 365d, got {value!r}")
    return float(seconds)


def _finite(value: Any) -> float | None:
    try:
        x = float(value)
    except (OverflowError, ValueError):
        return None
    return x if math.isfinite(x) else None


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _number(f: Fields, key: str, default: float | None, *, lo: float, hi: float, lo_open: bool = False,
            hi_open: bool = False, required: bool = False, what: str = "") -> float | None:
    """A finite number in [lo, hi] (ends optionally open). Also accepts ``1e-2`` (a string in YAML 1.1)."""
    value = f.raw(key, required=required)
    if value is None:
        if required and key in f.data:
            f.errors.add(f.path + (key,), "is required (it is empty)")
        return default
    path = f.path + (key,)
    x: float | None
    if isinstance(value, bool):
        x = None
    elif isinstance(value, (int, float)):
        x = _finite(value)
        if x is None:
            f.errors.add(path, f"must be a finite number, got {value!r}")
            return default
    elif isinstance(value, str) and _NUMBER_RE.match(value.strip()):
        x = _finite(value.strip())
    else:
        x = None
    if x is None:
        hint = ""
        if isinstance(value, str) and value.strip().endswith("%") and _NUMBER_RE.match(value.strip()[:-1].strip()):
            hint = f" (write percentages as fractions: {float(value.strip()[:-1]) / 100:g} for {value.strip()})"
        f.errors.add(path, f"must be a number, got {type_name(value)}{hint}")
        return default
    bad_lo = x <= lo if lo_open else x < lo
    bad_hi = x >= hi if hi_open else x > hi
    if bad_lo or bad_hi:
        lo_s = f"{'greater than' if lo_open else 'at least'} {lo:g}"
        hi_s = f"{'less than' if hi_open else 'at most'} {hi:g}"
        f.errors.add(path, f"must be {lo_s} and {hi_s}{what}, got {value!r}")
        return default
    return x


def _duration(f: Fields, key: str, default: float, *, positive: bool = False) -> float:
    value = f.raw(key)
    if value is None:
        return default
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        f.errors.add(f.path + (key,), str(exc))
        return default
    if positive and seconds <= 0:
        f.errors.add(f.path + (key,), f"must be longer than 0, got {value!r}")
        return default
    return seconds


def _choice(f: Fields, key: str, choices: tuple[str, ...], default: str | None) -> str | None:
    value = f.raw(key)
    if value is None:
        return default
    if value not in choices:
        f.errors.add(f.path + (key,), f"must be one of {', '.join(choices)}, got {value!r}")
        return default
    return value


def _finish(f: Fields) -> None:
    """``Fields.finish`` plus a "did you mean" for near-miss keys (``weigth_percent``)."""
    unknown = [k for k in f.data if k not in f._seen]
    known = sorted(f._seen)
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        f.errors.add(f.path + (key,), f"unknown field ({hint}known: {', '.join(known)})")
    f._seen.update(f.data)


def _null_required(f: Fields, key: str) -> None:
    """yamlconf treats ``key:`` with no value like a missing key; for a required field that is an error."""
    if key in f.data and f.data[key] is None:
        f.errors.add(f.path + (key,), "is required (it is empty)")


def _name(f: Fields, key: str, what: str) -> str:
    _null_required(f, key)
    value = f.str(key, required=True) or ""
    if value and not NAME_RE.match(value):
        f.errors.add(f.path + (key,), f"{what} must match {NAME_RE.pattern} (letters, digits, _ and -), got {value!r}")
    return value


# --------------------------------------------------------------------------- sections


def _steps(f: Fields, errors: ErrorCollector) -> tuple[Step, ...]:
    if "steps" not in f.data:
        f.raw("steps")
        return DEFAULT_STEPS
    raw = f.data["steps"]
    items = list(f.list("steps"))
    if not raw:
        errors.add(f.path + ("steps",), "must list at least one step (or leave steps out for the default "
                                          "1, 5, 20, 50 %)")
    out: list[Step] = []
    prev_bp: int | None = None
    for path, item in items:
        sf = Fields(item, path, errors)
        w = _number(sf, "weight_percent", None, lo=0.0, hi=100.0, lo_open=True, required=True)
        bp: int | None = None
        if w is not None:
            bp = round(w * 100)
            if abs(w * 100 - bp) > 1e-6:
                errors.add(path + ("weight_percent",), f"resolution is 0.01 %, got {w!r}")
                bp = None
        has_dur = "min_duration" in sf.data
        has_n = "min_canary_samples" in sf.data
        dur = _duration(sf, "min_duration", DEFAULT_STEP_MIN_DURATION_S)
        n = sf.int("min_canary_samples", DEFAULT_STEP_MIN_CANARY_SAMPLES, min=0, max=10**12)
        approval, checks = _step_gates(sf, errors)
        _finish(sf)
        if bp is None:
            continue
        if prev_bp is not None and bp <= prev_bp:
            errors.add(path + ("weight_percent",),
                       f"must be greater than the previous step's {prev_bp / 100:g} % (steps only go up)")
            continue
        prev_bp = bp
        if bp == TOTAL_WEIGHT_BP:
            if has_dur or has_n:
                errors.add(path, "the 100 % step is the promotion: there is no baseline left to compare with, "
                                 "so it takes no min_duration/min_canary_samples (gate promotion with the step "
                                 "before it and the promotion section)")
            if sf.data.get("approval") is not None or sf.data.get("checks"):
                errors.add(path, "the 100 % step is the promotion: put approval/checks on the step before it "
                                 "(leaving the last step below 100 % is the promotion)")
            continue
        out.append(Step(bp, dur, n if n is not None else DEFAULT_STEP_MIN_CANARY_SAMPLES, approval, checks))
    return tuple(out)


_FIELD_PATH_RE = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")


def _step_gates(sf: Fields, errors: ErrorCollector) -> tuple[bool, tuple[GateCheck, ...]]:
    """A step's ``approval: {required: true}`` and ``checks: [...]`` (the gates of leaving it)."""
    raw = sf.raw("approval")
    approval = False
    if isinstance(raw, bool):
        errors.add(sf.path + ("approval",), f"must be a mapping: write approval: {{required: {str(raw).lower()}}}")
    elif raw is not None:
        af = Fields(raw, sf.path + ("approval",), errors)
        _null_required(af, "required")
        req = af.raw("required", required=True)
        if req is not None and not isinstance(req, bool):
            errors.add(af.path + ("required",), f"must be true or false, got {type_name(req)}")
        approval = req is True
        _finish(af)
    items = list(sf.list("checks"))
    if len(items) > MAX_CHECKS_PER_STEP:
        errors.add(sf.path + ("checks",), f"at most {MAX_CHECKS_PER_STEP} checks per step, got {len(items)}")
    checks: list[GateCheck] = []
    seen: dict[str, int] = {}
    for path, item in items:
        c = _check(item, path, errors)
        if c is None:
            continue
        if c.name in seen:
            errors.add(path + ("name",), f"duplicate check name {c.name!r} (also checks[{seen[c.name]}])")
            continue
        seen[c.name] = path[-1]  # type: ignore[assignment]
        checks.append(c)
    return approval, tuple(checks)


def _check_url(f: Fields) -> str | None:
    _null_required(f, "url")
    url = f.str("url", required=True)
    if url is None:
        return None
    path = f.path + ("url",)
    if len(url) > 2000 or any(ch.isspace() for ch in url):
        f.errors.add(path, "must be one http(s) URL of at most 2000 characters, without spaces")
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        f.errors.add(path, f"not a valid URL: {exc}")
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        f.errors.add(path, f"must be an http:// or https:// URL with a host, got {url[:100]!r}")
        return None
    return url


def _check(item: Any, path: tuple[PathPart, ...], errors: ErrorCollector) -> GateCheck | None:
    """One ``steps[].checks[]`` item."""
    f = Fields(item, path, errors)
    name = _name(f, "name", "check name")
    url = _check_url(f)
    method = _choice(f, "method", CHECK_METHODS, "GET") or "GET"
    timeout = _number(f, "timeout_s", DEFAULT_CHECK_TIMEOUT_S, lo=0.0, hi=MAX_CHECK_TIMEOUT_S, lo_open=True,
                      what=" seconds (how long the controller waits for the answer)")
    interval = _number(f, "interval_s", DEFAULT_CHECK_INTERVAL_S, lo=MIN_CHECK_INTERVAL_S, hi=MAX_CHECK_INTERVAL_S,
                       what=" seconds (how often the check is called while the step waits for it)")
    ef = f.sub("expect")
    status: tuple[int, ...] = (DEFAULT_CHECK_STATUS,)
    raw_status = ef.raw("status")
    if raw_status is not None:
        values = raw_status if isinstance(raw_status, list) else [raw_status]
        good = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599]
        if not values or len(good) != len(values):
            errors.add(ef.path + ("status",), f"must be an HTTP status (100-599) or a list of them, got "
                                              f"{raw_status!r}"[:200])
        else:
            status = tuple(good)
    field = ef.raw("field")
    if field is not None and not (isinstance(field, str) and _FIELD_PATH_RE.match(field)):
        got = repr(field) if isinstance(field, str) else type_name(field)
        errors.add(ef.path + ("field",), f"must be a field of the JSON answer, dotted for nested ones (verdict, "
                                         f"result.status, checks.0.ok), got {got}")
        field = None
    equals = ef.raw("equals")
    if "field" in ef.data and "equals" not in ef.data:
        errors.add(ef.path, "field needs equals: the value the answer's field must have to pass (e.g. equals: pass)")
    elif "equals" in ef.data and "field" not in ef.data:
        errors.add(ef.path + ("equals",), "equals needs field: the JSON field of the answer it is compared with")
    elif "equals" in ef.data and (equals is None or isinstance(equals, (dict, list))):
        errors.add(ef.path + ("equals",), f"must be a string, number or true/false, got {type_name(equals)}")
    _finish(ef)
    _finish(f)
    if not name or url is None or timeout is None or interval is None:
        return None
    if field is not None and (equals is None or isinstance(equals, (dict, list))):
        return None
    return GateCheck(name=name, url=url, method=method, timeout_s=timeout, interval_s=interval,
                     expect_status=status, expect_field=field, expect_equals=equals if field is not None else None)


def _promotion(f: Fields) -> PromotionPolicy:
    d = PromotionPolicy()
    sub = f.sub("promotion")
    rni = sub.bool("require_non_inferiority", d.require_non_inferiority)
    max_d = _duration(sub, "max_duration", d.max_duration_s, positive=True)
    pre = _choice(sub, "preflight", PREFLIGHTS, d.preflight) or d.preflight
    _finish(sub)
    return PromotionPolicy(rni, max_d, pre)


def _allowed(value: Any, path: tuple[PathPart, ...], d: MetricDef, harmful: str,
             errors: ErrorCollector) -> tuple[str, float | None] | None:
    quantile = d.kind == "quantile"
    usage = ("must be {absolute: X}, {relative: X} (a fraction: 0.10 = 10 %)"
             + (", {exceedance_ratio: R}" if quantile else "") + " or auto")
    if value == "auto":
        return "auto", None
    if not isinstance(value, dict):
        errors.add(path, f"{usage}, got {value!r}" if isinstance(value, (str, int, float)) else
                   f"{usage}, got {type_name(value)}")
        return None
    if len(value) != 1 or next(iter(value)) not in ALLOWED_MODES:
        keys = ", ".join(map(str, value)) or "nothing"
        one_of = "absolute, relative or exceedance_ratio" if quantile else "absolute or relative"
        errors.add(path, f"{usage}: exactly one of {one_of}, got {keys}")
        return None
    (mode, _), = value.items()
    af = Fields(value, path, errors)
    if mode == "exceedance_ratio":
        if not quantile:
            errors.add(path + ("exceedance_ratio",),
                       f"exceedance_ratio is for quantile metrics only ({', '.join(QUANTILE_METRICS)}); "
                       f"{d.name} is a {d.kind} metric: use absolute or relative")
            return None
        x = _number(af, "exceedance_ratio", None, lo=1.0, hi=MAX_EXCEEDANCE_RATIO, required=True,
                    what=f" (at most R x the baseline's share of requests beyond its p{d.quantile * 100:g}; "
                         "1 = no change allowed)")
        if x is None:
            return None
        share = (1.0 - d.quantile) if harmful == "increase" else d.quantile
        if x * share >= 1.0:
            side = "above" if harmful == "increase" else "below"
            errors.add(path + ("exceedance_ratio",),
                       f"{x:g} x the baseline's {share * 100:g}% of requests {side} its p{d.quantile * 100:g} "
                       f"allows every canary request {side} it: nothing could be worse than that "
                       f"(use less than {1.0 / share:.4g})")
            return None
        return mode, x
    if mode == "absolute":
        unit_scale = d.fraction or d.name == "evaluator_score"  # scores are in [0, 1]
        hi = 1.0 if unit_scale else 1e12
        what = (" (a fraction: 0.01 = 1 point)" if d.fraction else
                " (evaluator scores are in [0, 1])" if unit_scale else "")
        x = _number(af, "absolute", None, lo=0.0, hi=hi, what=what, required=True)
    else:
        if harmful == "decrease":
            x = _number(af, "relative", None, lo=0.0, hi=1.0, hi_open=True, required=True,
                        what=" (a fraction of the baseline: 0.10 = 10 %; a decrease of 100 % or more "
                             "cannot be allowed)")
        else:
            x = _number(af, "relative", None, lo=0.0, hi=MAX_RELATIVE, what=" (a fraction: 0.10 = 10 %)",
                        required=True)
    if x is None:
        return None
    return mode, x


def _metric(value: Any, path: tuple[PathPart, ...], errors: ErrorCollector, warnings: ErrorCollector,
            require_ni: bool, rollout_alpha: float | None) -> MetricCriterion | None:
    f = Fields(value, path, errors)
    _null_required(f, "name")
    _null_required(f, "allowed")
    name = f.str("name", required=True)
    prom = None  # a Prometheus-sourced metric (spec/prometheus.py): its own name, kind and queries
    if isinstance(f.data, dict) and "prometheus" in f.data:
        prom = parse_prometheus(f, name, errors)
        d = prom.definition(name) if prom is not None and name is not None else None
    else:
        f.raw("prometheus")  # a known field (for "unknown field" messages)
        d = BUILTIN_METRICS.get(name) if name is not None else None
    if name is not None and d is None and prom is None and "prometheus" not in f.data:
        close = difflib.get_close_matches(name, list(BUILTIN_METRICS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        errors.add(path + ("name",), f"unknown metric {name!r} ({hint}built-in metrics: "
                                     f"{', '.join(BUILTIN_METRICS)}; a metric of your own needs a prometheus: "
                                     "block)")
    cls = f.raw("class") if prom is None else None
    if d is not None and d.per_class and cls is None:
        errors.add(path, f"{d.name} is per class: set class: to the class it watches (e.g. class: fraud)")
    elif d is not None and not d.per_class and "class" in f.data and prom is None:
        errors.add(path + ("class",), f"only class_recall and class_precision take a class, not {d.name}")
        cls = None
    elif cls is not None and not isinstance(cls, str):
        errors.add(path + ("class",), f"must be a string (quote numeric class names: class: \"{cls}\"), "
                                      f"got {type_name(cls)}")
        cls = None
    elif isinstance(cls, str) and not cls.strip():
        errors.add(path + ("class",), "must not be empty")
        cls = None
    gating = f.bool("gating", True)
    harmful = _choice(f, "harmful", HARMFUL, None)
    if d is not None and harmful is not None and d.per_class and harmful != "decrease":
        errors.add(path + ("harmful",), f"{d.name} is harmful when it decreases (it cannot be overridden)")
        harmful = None
    if harmful is None:
        harmful = d.harmful if d is not None else "increase"
    allowed = None
    raw_allowed = f.raw("allowed", required=True)
    if raw_allowed is not None and d is not None:
        allowed = _allowed(raw_allowed, path + ("allowed",), d, harmful, errors)
        if prom is not None and allowed is not None and allowed[0] == "auto":
            errors.add(path + ("allowed",), "auto derives the allowance from lockgate's stored observations of the "
                                            "baseline; a Prometheus metric needs {absolute: X} or {relative: X}")
            allowed = None
    if rollout_alpha is not None:
        alpha = _number(f, "alpha", None, lo=0.0, hi=rollout_alpha, lo_open=True, hi_open=True,
                        what=f" (this metric's share of the rollout's alpha {rollout_alpha:g}; leave it out "
                             "for an even split)")
    else:  # the rollout's alpha is itself invalid: check what can be checked
        alpha = _number(f, "alpha", None, lo=0.0, hi=MAX_ALPHA, lo_open=True, hi_open=True,
                        what=" (this metric's share of the rollout's alpha)")
    family = f.raw("family")
    if family is not None and not (isinstance(family, str) and NAME_RE.match(family)):
        got = repr(family) if isinstance(family, str) else type_name(family)
        errors.add(path + ("family",), f"must be a family name matching {NAME_RE.pattern} (letters, digits, _ and "
                                       f"-; e.g. family: recall), got {got}")
        family = None
    if alpha is not None and family is not None:
        errors.add(path + ("alpha",), f"alpha and family together: the members of family {family!r} share one "
                                      "metric's share of alpha evenly; give this metric its own alpha or put it "
                                      "in the family, not both")
    _finish(f)
    if d is None or allowed is None or (d.per_class and cls is None):
        return None
    mode, x = allowed
    if gating and require_ni and ((mode in ("absolute", "relative") and x == 0) or
                                  (mode == "exceedance_ratio" and x == 1)):
        what = "exceedance ratio 1" if mode == "exceedance_ratio" else "allowed change 0"
        warnings.add(path + ("allowed",), f"{what}: promotion needs the canary shown strictly better "
                                          f"than the baseline on {d.name}")
    if prom is not None and gating:
        warnings.add(path + ("prometheus",), f"{d.name} gates on Prometheus aggregates: they have no per-user "
                                             "breakdown, so its tests take requests as independent; when users send "
                                             "many correlated requests its false-rollback chance exceeds its alpha "
                                             "(docs/statistics.md section 9)")
    if not gating and alpha is not None:
        warnings.add(path + ("alpha",), f"alpha on a non-gating metric: {d.name} never decides, so its alpha "
                                        "only sets the width of its reported interval (it is not part of the "
                                        "rollout's false-rollback budget)")
    if not gating and family is not None:
        warnings.add(path + ("family",), f"family on a non-gating metric has no effect: only gating metrics "
                                         f"share the rollout's alpha")
    return MetricCriterion(name=d.name, kind=d.kind, harmful=harmful, allowed_mode=mode, allowed=x,
                           gating=gating, cls=cls if d.per_class else None, quantile=d.quantile,
                           column=d.column, unit=d.unit, alpha=alpha, family=family, prometheus=prom)


def _metrics(f: Fields, errors: ErrorCollector, warnings: ErrorCollector,
             require_ni: bool, rollout_alpha: float | None) -> tuple[MetricCriterion, ...]:
    raw = f.data.get("metrics")
    _null_required(f, "metrics")
    items = list(f.list("metrics", required=True))
    if isinstance(raw, list) and not raw:
        errors.add(f.path + ("metrics",), "must list at least one metric")
    out: list[MetricCriterion] = []
    seen: dict[str, int] = {}
    for path, item in items:
        m = _metric(item, path, errors, warnings, require_ni, rollout_alpha)
        if m is None:
            continue
        if m.key in seen:
            errors.add(path, f"duplicate metric {m.key} (also metrics[{seen[m.key]}])")
            continue
        seen[m.key] = path[-1]  # type: ignore[assignment]
        out.append(m)
    return tuple(out)


def _check_metric_set(metrics: tuple[MetricCriterion, ...], mpath: tuple[PathPart, ...], n_items: int,
                      errors: ErrorCollector, warnings: ErrorCollector, rollout_alpha: float | None) -> None:
    if not metrics or len(metrics) != n_items:
        return  # the metrics list already has errors; rules on the whole set would only add noise
    index = {m.key: i for i, m in enumerate(metrics)}
    if rollout_alpha is not None:
        _check_alpha_split(metrics, mpath, rollout_alpha, errors)
    if not any(m.gating for m in metrics):
        errors.add(mpath, "at least one metric must be gating: with none, nothing can be shown worse than its "
                          "allowance (no rollback) and nothing can justify promotion")
    per_class = [m for m in metrics if m.cls is not None]
    acc = next((m for m in metrics if m.name == "accuracy"), None)
    if acc is not None and acc.gating and not any(m.gating for m in per_class):
        errors.add(mpath + (index["accuracy"],),
                   "aggregate accuracy must never stand in for per-class metrics: a minority class can lose "
                   "recall while accuracy rises. Add a gating class_recall (and/or class_precision) for each "
                   "class that matters, or make accuracy gating: false")
    recall_cls = {m.cls for m in per_class if m.name == "class_recall"}
    for m in per_class:
        if m.name == "class_precision" and m.cls not in recall_cls:
            warnings.add(mpath + (index[m.key],), f"precision of {m.cls!r} without its recall: a model that "
                                                  f"stops predicting {m.cls!r} keeps its precision")


def _check_alpha_split(metrics: tuple[MetricCriterion, ...], mpath: tuple[PathPart, ...], alpha: float,
                       errors: ErrorCollector) -> None:
    """``stats.split_alpha``'s rules, reported with line numbers: the explicit alphas of the gating
    metrics may use up the rollout's alpha only if no other gating metric is left without one."""
    explicit = [(i, m) for i, m in enumerate(metrics) if m.gating and m.alpha is not None]
    if not explicit:
        return
    fixed = sum(m.alpha for _, m in explicit if m.alpha is not None)
    others = [m for m in metrics if m.gating and m.alpha is None]

    def at(i: int, m: MetricCriterion) -> str:
        line, _ = errors.smap.locate(mpath + (i, "alpha"))
        return f"{m.key} {m.alpha:g}" + (f" (line {line})" if line else "")

    listed = ", ".join(at(i, m) for i, m in explicit)
    if fixed > alpha * (1.0 + 1e-9):
        errors.add(mpath, f"the gating metrics' explicit alphas add up to {fixed:.6g} ({listed}), more than the "
                          f"rollout's alpha {alpha:g}: the false-rollback budget would not hold; lower them or "
                          f"raise rollout.alpha")
    elif others and alpha - fixed <= alpha * 1e-9:
        errors.add(mpath, f"the gating metrics' explicit alphas add up to {fixed:.6g} ({listed}), all of the "
                          f"rollout's alpha {alpha:g}, leaving none for the {len(others)} other gating "
                          f"metric{'s' * (len(others) != 1)} ({', '.join(m.key for m in others)}): their sum must "
                          f"be less than alpha while other gating metrics have no alpha of their own")


def parse_spec(data: Any, smap, source: str, config: "LockgateConfig | None" = None) -> RolloutSpec:
    """Validate parsed YAML into a :class:`RolloutSpec`; raises ConfigError listing every problem."""
    errors = ErrorCollector(source, smap)
    warnings = ErrorCollector(source, smap)
    top = Fields(data, (), errors)
    if data is None:
        errors.add(("rollout",), "is required (the file is empty)")
    f = top.sub("rollout", required=data is not None)
    _finish(top)
    if not isinstance(top.data.get("rollout"), dict):
        _null_required(top, "rollout")
        errors.raise_if_any()  # no rollout section: "field is required" for each of its fields is noise
    model = _name(f, "model", "model")
    canary = _name(f, "canary", "canary")
    interval = _number(f, "analysis_interval_s", DEFAULT_ANALYSIS_INTERVAL_S, lo=1.0, hi=MAX_ANALYSIS_INTERVAL_S,
                       what=" seconds")
    n_errors = len(errors.problems)
    alpha = _number(f, "alpha", DEFAULT_ALPHA, lo=0.0, hi=MAX_ALPHA, lo_open=True,
                    what=" (the chance of a false rollback over the whole rollout, e.g. 0.01)")
    valid_alpha = alpha if len(errors.problems) == n_errors else None  # None: rollout.alpha has an error
    steps = _steps(f, errors)
    promotion = _promotion(f)
    metrics = _metrics(f, errors, warnings, promotion.require_non_inferiority, valid_alpha)
    cohorts = parse_cohorts(f, errors, len(steps))
    capacity = parse_capacity(f, errors)
    shadow = parse_shadow(f, errors)
    _finish(f)
    raw_metrics = f.data.get("metrics")
    _check_metric_set(metrics, f.path + ("metrics",), len(raw_metrics) if isinstance(raw_metrics, list) else -1,
                      errors, warnings, valid_alpha)

    min_total = sum(s.min_duration_s for s in steps)
    if min_total > promotion.max_duration_s:
        which = "steps'" if "steps" in f.data else "default steps'"
        errors.add(f.path + ("promotion", "max_duration"),
                   f"{format_duration(promotion.max_duration_s)} is shorter than the {which} min_duration "
                   f"together ({format_duration(min_total)}): the rollout could never be promoted")
    if not promotion.require_non_inferiority:
        warnings.add(f.path + ("promotion", "require_non_inferiority"),
                     "false: the canary is promoted to 100 % after the last stage without evidence that it is "
                     "within the allowed change (only without evidence that it is worse beyond it)")

    if config is not None and model:
        _check_against_config(config, f, model, canary, errors)
        _check_metrics_against_config(config, f, model, metrics, errors)
        cohorts_against_config(config, f.path + ("cohorts",), model, cohorts, errors)
        check_prometheus_against_config(config, f.path + ("metrics",), metrics, errors)
        metrics = tuple(replace(m, prometheus=resolved(m.prometheus, config)) if m.prometheus is not None else m
                        for m in metrics)
    errors.raise_if_any()
    assert interval is not None and alpha is not None
    spec = RolloutSpec(model=model, canary=canary, analysis_interval_s=interval, alpha=alpha, steps=steps,
                       promotion=promotion, metrics=metrics, source=source, cohorts=cohorts, capacity=capacity, shadow=shadow,
                       warnings=tuple(sorted(warnings.problems, key=lambda p: (p.line or 0, p.column or 0))))
    return _with_hash(spec)


def _with_hash(spec: RolloutSpec) -> RolloutSpec:
    return replace(spec, sha256=_sha256(spec.canonical()))


#: analyzers whose observations never carry a predicted class
_NO_CLASS_ANALYZERS = ("openai", "sse", "none")


def _check_metrics_against_config(config: "LockgateConfig", f: Fields, model: str,
                                  metrics: tuple[MetricCriterion, ...], errors: ErrorCollector) -> None:
    """Metrics the model's observations can never feed: per-class metrics on a non-classifier."""
    try:
        m = config.model(model)
    except KeyError:
        return
    if m.analyzer not in _NO_CLASS_ANALYZERS:
        return
    for i, metric in enumerate(metrics):
        if metric.name in ("class_recall", "class_precision", "accuracy"):
            errors.add(f.path + ("metrics", i, "name"),
                       f"{metric.name} needs predicted classes, but model {model!r} uses analyzer "
                       f"{m.analyzer!r} in {config.source} (classes come from the classifier analyzer)")


def _check_against_config(config: "LockgateConfig", f: Fields, model: str, canary: str,
                          errors: ErrorCollector) -> None:
    try:
        m = config.model(model)
    except KeyError:
        names = ", ".join(x.name for x in config.models) or "none"
        errors.add(f.path + ("model",), f"model {model!r} is not in {config.source} (models: {names})")
        return
    if not canary:
        return
    if canary == m.stable:
        others = [v for v in m.versions if v != m.stable]
        hint = f"; other versions: {', '.join(others)}" if others else "; add the canary version to it first"
        errors.add(f.path + ("canary",), f"{canary!r} is {model}'s stable version (the baseline) in "
                                         f"{config.source}{hint}")
    elif canary not in m.versions:
        errors.add(f.path + ("canary",), f"{model} has no version {canary!r} in {config.source} (versions: "
                                         f"{', '.join(m.versions)}; stable {m.stable})")


def spec_from_text(text: str, source: str = "<string>", config: "LockgateConfig | None" = None) -> RolloutSpec:
    """Parse and validate a rollout spec given as YAML text. Raises ConfigError."""
    data, smap = load_yaml(text, source)
    return parse_spec(data, smap, source, config)


def load_spec(path: str | Path, config: "LockgateConfig | None" = None) -> RolloutSpec:
    """Load and validate a rollout spec file; with ``config`` also check model and canary version.
    Raises ConfigError (file, line, column, field path, message — every problem at once)."""
    data, smap, source = load_yaml_file(path)
    return parse_spec(data, smap, source, config)


def render_warning(problem: Problem, source: str) -> str:
    """A warning line: ``file:line:col: path: warning: message``."""
    return Problem(problem.path, f"warning: {problem.message}", problem.line, problem.column).render(source)
