"""``models[].evaluation:`` — response evaluation of one model (sampling, evaluator or judge, similarity,
sample storage and replay)."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from lockgate.config.common import ENV_RE, HEADER_RE, PLUGIN_RE, RESERVED_HEADER_PREFIX
from lockgate.yamlconf import Fields


@dataclass(frozen=True)
class JudgeConfig:
    """An OpenAI-compatible chat endpoint used as the evaluator (``evaluator: http``).

    ``api_key_env`` names an environment variable holding a bearer token (never the token itself)."""

    url: str
    model: str
    timeout_s: float = 10.0
    api_key_env: str | None = None


@dataclass(frozen=True)
class EvaluationConfig:
    """Per-model response evaluation (see ``docs/evaluation.md``).

    ``sample_rate`` of the model's sticky-route requests are mirrored by Envoy to the controller's
    sampler, stored (bodies up to ``max_body_bytes``, kept ``retention_hours`` and at most
    ``max_samples`` rows), replayed out of band to the stable and the canary version, and each
    answer is scored by ``evaluator`` (``heuristic``, ``http`` = the ``judge``, or ``pkg.module:Class``);
    ``similarity`` (None = off) compares the two answers (``char3``, ``jaccard`` or ``pkg.module:Class``).
    ``replay_headers``: request headers besides content-type/accept stored with a sample and replayed
    (e.g. ``authorization`` when the model servers need it — stored in the sample database)."""

    sample_rate: float
    evaluator: str = "heuristic"
    judge: JudgeConfig | None = None
    similarity: str | None = "char3"
    retention_hours: float = 24.0
    max_samples: int = 10000
    max_body_bytes: int = 256 * 1024
    replay_timeout_s: float = 60.0
    replay_headers: tuple[str, ...] = ()


def _judge(f: Fields) -> JudgeConfig | None:
    sub = f.sub("judge")
    url = sub.str("url", required=True)
    model = sub.str("model", required=True)
    timeout = sub.float("timeout_s", 10.0, min=0.001, max=3600.0)
    key_env = sub.str("api_key_env")
    sub.finish()
    if url is not None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            f.errors.add(sub.path + ("url",), f"must be an http:// or https:// URL, got {url!r}")
            url = None
    if model == "":
        f.errors.add(sub.path + ("model",), "must not be empty")
    if key_env is not None and not ENV_RE.match(key_env):
        f.errors.add(sub.path + ("api_key_env",), f"must be an environment variable name, got {key_env!r}")
    if url is None or not model:
        return None
    return JudgeConfig(url, model, 10.0 if timeout is None else timeout, key_env)


def _evaluation(f: Fields) -> EvaluationConfig | None:
    """``evaluation:`` of one model (absent = off: nothing mirrored, nothing stored)."""
    if "evaluation" not in f.data:
        f.raw("evaluation")
        return None
    sub = f.sub("evaluation")
    d = EvaluationConfig(0.0)
    rate = sub.float("sample_rate", required=True, min=0.0, max=1.0)
    evaluator = sub.str("evaluator", d.evaluator) or d.evaluator
    if evaluator not in ("heuristic", "http") and not PLUGIN_RE.match(evaluator):
        sub.errors.add(sub.path + ("evaluator",),
                       f"must be heuristic, http or a plug-in 'package.module:Class', got {evaluator!r}")
    judge = None
    if "judge" in sub.data:
        judge = _judge(sub)
        if evaluator != "http":
            sub.errors.add(sub.path + ("judge",), "is only used with evaluator: http")
    else:
        sub.raw("judge")
        if evaluator == "http":
            sub.errors.add(sub.path + ("judge",), "is required with evaluator: http")
    similarity: str | None = d.similarity
    sim_raw = sub.raw("similarity")
    if isinstance(sim_raw, bool):
        similarity = d.similarity if sim_raw else None
    elif isinstance(sim_raw, dict):
        sf = sub.sub("similarity")
        impl = sf.str("impl", required=True)
        sf.finish()
        if impl is not None:
            if impl not in ("char3", "jaccard") and not PLUGIN_RE.match(impl):
                sub.errors.add(sf.path + ("impl",),
                               f"must be char3, jaccard or a plug-in 'package.module:Class', got {impl!r}")
            similarity = impl
    elif sim_raw is not None:
        sub.errors.add(sub.path + ("similarity",),
                       "must be true, false or {impl: char3 | jaccard | package.module:Class}")
    retention = sub.float("retention_hours", d.retention_hours, min=0.0001, max=24.0 * 3650)
    max_samples = sub.int("max_samples", d.max_samples, min=1, max=10_000_000)
    max_body = sub.int("max_body_bytes", d.max_body_bytes, min=1, max=64 << 20)
    replay_timeout = sub.float("replay_timeout_s", d.replay_timeout_s, min=0.001, max=3600.0)
    replay_headers: list[str] = []
    for hpath, name in sub.list("replay_headers"):
        if not isinstance(name, str) or not HEADER_RE.match(name):
            sub.errors.add(hpath, f"must be a lower-case header name, got {name!r}")
        elif name.startswith(RESERVED_HEADER_PREFIX) or name in _NOT_REPLAYED:
            sub.errors.add(hpath, f"{name!r} cannot be replayed (set by lockgate or the HTTP client)")
        elif name not in replay_headers:
            replay_headers.append(name)
    sub.finish()
    if rate is None:
        return None
    return EvaluationConfig(rate, evaluator, judge, similarity,
                            d.retention_hours if retention is None else retention,
                            max_samples or d.max_samples, max_body or d.max_body_bytes,
                            d.replay_timeout_s if replay_timeout is None else replay_timeout, tuple(replay_headers))


#: headers a replay sets itself (``replay_headers`` may not name them)
_NOT_REPLAYED = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
                           "te", "trailer", "expect", "content-type", "accept", "x-request-id"})
