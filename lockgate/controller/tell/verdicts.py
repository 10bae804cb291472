"""The one home of how a metric verdict is read and shown: CLI (``rollout status``, ``show``), history,
diagnosis, alerts and reports all render verdicts through this module.

A *verdict* here is one entry of an evaluation's ``verdicts`` list: the dict written by
:meth:`lockgate.controller.stats.MetricVerdict.to_dict` (``metric``, ``kind``, ``verdict`` — ``fail`` /
``pass`` / ``continue`` …, ``gating``, ``baseline`` / ``canary`` per arm, ``difference`` and ``interval``
on the canary − baseline scale, ``allowed`` (a non-negative size), ``harmful`` — ``increase`` /
``decrease``, ``n_baseline`` / ``n_canary``, ``unit``, ``details`` with ``rollback_line`` and
``interval_scale``), read back from the deployment log — possibly one stored by an older lockgate.

The rules, each in one place:

* **gating** (:func:`is_gating`): a verdict without the field gates. ``MetricSpec.gating`` defaults to
  True (a metric gates unless its spec marks it informational) and every stored verdict carries the
  field, so the default only decides how a hand-built or truncated dict is shown.
* **order** (:func:`ordered`): gating metrics first, then fail → undecided → pass; stable otherwise.
  Tables keep the spec's order (the order stored); messages lead with what decided.
* **the rollback line** (:func:`rollback_line`): the signed line a verdict was judged against, on its
  interval's scale — ``+allowed`` for a harmful increase, ``-allowed`` for a harmful decrease, unless
  the verdict recorded its own. A ``fail`` lies beyond it, a ``pass`` within it.
* **numbers**, two styles: tables and one-line summaries print values in the metric's own scale with 4
  significant digits (:func:`plain`; rates as fractions); sentences (alerts) carry units
  (:func:`fmt_value`: rates as ``%`` / differences in ``pp``, other kinds with their ``unit``).
  Differences of an ``exceedance_ratio`` quantile verdict are unitless exceedance-share differences,
  never the quantile's unit.

Renderers: :func:`verdict_rows` (aligned text table), :func:`html_table` (the report's table),
:func:`describe_verdict` / :func:`describe_beyond` (sentences), all built on :func:`table_rows`.
Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Any, Iterable, Sequence

#: ``details["interval_scale"]`` of an ``exceedance_ratio`` quantile verdict: its interval, difference and
#: allowed are differences of exceedance shares (unitless fractions), not quantile shifts in the metric's unit
EXCEEDANCE_SCALE = "exceedance share difference"
#: kinds whose values are proportions (printed as % and their differences as percentage points)
PROPORTION_KINDS = ("rate", "class_recall", "class_precision")
#: sort rank of a verdict value in :func:`ordered` (anything else ranks as undecided)
_VERDICT_RANK = {"fail": 0, "continue": 1, "inconclusive": 1, "pass": 2}


# ------------------------------------------------------------------------------------------- reading a verdict
def is_gating(v: dict) -> bool:
    """Whether the metric can block promotion / trigger rollback; a verdict without the field gates."""
    return bool(v.get("gating", True))


def ordered(verdicts: Iterable[dict] | None) -> list[dict]:
    """Gating metrics first, then ``fail`` → undecided → ``pass``; the stored order otherwise."""
    return sorted(verdicts or [], key=lambda v: (not is_gating(v), _VERDICT_RANK.get(v.get("verdict"), 1)))


def _finite(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def rollback_line(v: dict) -> float | None:
    """The signed line a stored verdict was judged against, on its interval's (canary - baseline) scale:
    ``details["rollback_line"]`` when recorded, else ``+allowed`` (harmful increase) / ``-allowed`` (harmful
    decrease) — evaluations stored before the line was recorded; ``None`` without an allowance."""
    line = _finite((v.get("details") or {}).get("rollback_line"))
    if line is not None:
        return line
    allowed = _finite(v.get("allowed"))
    if allowed is None:
        return None
    return -abs(allowed) if v.get("harmful") == "decrease" else abs(allowed)


def on_exceedance_scale(v: dict) -> bool:
    """Interval / difference / allowed are exceedance-share differences (``allowed_mode: exceedance_ratio``)."""
    return (v.get("details") or {}).get("interval_scale") == EXCEEDANCE_SCALE


def worse_bound(v: dict) -> float | None:
    """The interval end on the harmful side of no difference: the canary is shown worse than the baseline by
    at least this much (lower end for a harmful increase, upper end for a harmful decrease); None = unbounded."""
    lo, hi = (v.get("interval") or (None, None))[:2]
    return _finite(hi if v.get("harmful") == "decrease" else lo)


def any_harm_fail(v: dict) -> bool:
    """A ``fail`` stored before verdicts respected the allowance ("interval excludes 0"), whose interval does
    not lie beyond the allowance (recorded verdicts are never re-judged; this only words them honestly)."""
    if v.get("verdict") != "fail" or "rollback_line" in (v.get("details") or {}):
        return False
    line, b = rollback_line(v), worse_bound(v)
    if line is None or b is None:
        return False
    return b <= line if v.get("harmful") != "decrease" else b >= line


def allowance_state(v: dict) -> str:
    """The verdict against the rollback line: ``beyond the allowance`` (fail: roll back), ``within the
    allowance`` (pass), else neither shown yet."""
    verdict = v.get("verdict")
    if verdict == "fail":
        if any_harm_fail(v):
            return "worse than baseline but not beyond the allowance (judged by the earlier any-harm rule)"
        return "beyond the allowance"
    if verdict == "pass":
        return "within the allowance"
    return "neither beyond nor within the allowance yet"


def verdict_label(v: dict) -> str:
    """``fail (beyond the allowance)`` / ``pass (within the allowance)`` / the bare verdict otherwise."""
    verdict = str(v.get("verdict"))
    if verdict == "fail":
        return "fail (any-harm rule; not beyond the allowance)" if any_harm_fail(v) else "fail (beyond the allowance)"
    if verdict == "pass":
        return "pass (within the allowance)"
    return verdict


# ------------------------------------------------------------------------------------------- numbers, plain
def plain(x: Any) -> str:
    """A value in the metric's own scale, 4 significant digits; ``-`` when missing."""
    return "-" if x is None else f"{x:.4g}"


def scale_suffix(v: dict) -> str:
    """`` exceedance share`` for exceedance-share differences (unitless), else the verdict's unit (if any)."""
    if on_exceedance_scale(v):
        return " exceedance share"
    return f" {v['unit']}" if v.get("unit") else ""


def fmt_line(v: dict, unit: bool = True) -> str:
    """The rollback line, signed: ``+0.05`` (harm above it) / ``-0.02`` (harm below it); ``-`` without one."""
    line = rollback_line(v)
    if line is None:
        return "-"
    return f"{line:+.4g}" + (scale_suffix(v) if unit else "")


def beyond_text(v: dict) -> str:
    """How far a failing metric was shown beyond the line: ``shown worse than baseline by at least +0.1,
    allowed +0.05`` (in the interval's scale)."""
    b = worse_bound(v)
    shown = "n/a" if b is None else f"{b:+.4g}{scale_suffix(v)}"
    text = f"shown worse than baseline by at least {shown}, allowed {fmt_line(v)}"
    return text + (" (judged by the earlier any-harm rule)" if any_harm_fail(v) else "")


# ------------------------------------------------------------------------------------------- numbers, with units
def fmt_value(x: Any, kind: str = "", unit: str = "", signed: bool = False) -> str:
    """A value with its unit: proportions as ``10.20%`` (``+8.20 pp`` when ``signed``, a difference), other
    kinds ``812 ms`` / ``+22 ms``; ``n/a`` when missing, ``∞`` / ``-∞`` when infinite."""
    if x is None:
        return "n/a"
    try:
        f = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(f):
        return "∞" if f > 0 else "-∞"
    if kind in PROPORTION_KINDS:
        s = f"{f * 100:+.2f}" if signed else f"{f * 100:.2f}"
        return s + (" pp" if signed else "%")
    s = f"{f:+.4g}" if signed else f"{f:.4g}"
    return f"{s} {unit}".rstrip() if unit else s


def difference_kind_unit(v: dict) -> tuple[str, str]:
    """How to print a verdict's difference / interval / allowed: exceedance-share differences of an
    ``exceedance_ratio`` quantile verdict are unitless fractions (never the quantile's ms)."""
    if on_exceedance_scale(v):
        return "", ""
    return v.get("kind", ""), v.get("unit", "")


def fmt_signed(x: Any, v: dict) -> str:
    """A value on the interval's scale, signed: ``+1.50 pp`` / ``+79 ms`` / ``+0.01`` (exceedance share)."""
    if x is None:
        return "n/a"
    kind, unit = difference_kind_unit(v)
    return fmt_value(x, kind, unit, True)


def interval_text(v: dict) -> str:
    """``[+5.10, +∞] pp`` / ``[-10, +40] ms`` / ``[…] (exceedance share difference, unitless)``."""
    lo, hi = (v.get("interval") or [None, None])[:2]
    kind, unit = difference_kind_unit(v)
    lo_s = "-∞" if lo is None else fmt_value(lo, kind, "", True).replace(" pp", "")
    hi_s = "+∞" if hi is None else fmt_value(hi, kind, "", True).replace(" pp", "")
    suffix = " pp" if kind in PROPORTION_KINDS else (f" {unit}" if unit else "")
    if on_exceedance_scale(v):
        suffix = " (exceedance share difference, unitless)"
    return f"[{lo_s}, {hi_s}]{suffix}"


# ------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class VerdictRow:
    """One metric of a judgement as table cells (text; numbers plain, in the metric's own scale).

    ``scale`` is `` exceedance share`` for exceedance-share differences (appended to difference, interval
    and allowed), else empty; ``unit_suffix`` is :func:`scale_suffix` (the unit of ``allowed``)."""

    metric: str
    gating: bool
    verdict: str          #: the raw verdict: fail | pass | continue | …
    label: str            #: :func:`verdict_label`
    state: str            #: :func:`allowance_state`
    baseline: str
    canary: str
    difference: str
    interval: str         #: ``[lo, hi]`` (``-`` for an open end)
    scale: str
    allowed: str          #: the rollback line, signed, without unit; ``-`` without one
    unit_suffix: str
    n_baseline: str
    n_canary: str
    reason: str

    @property
    def name(self) -> str:
        """The metric, ``(info)``-marked when it does not gate."""
        return self.metric + ("" if self.gating else " (info)")


def table_rows(verdicts: Iterable[dict]) -> list[VerdictRow]:
    """The per-metric rows of a judgement, in the order given."""
    out = []
    for v in verdicts:
        lo, hi = (v.get("interval") or (None, None))[:2]
        scale = " exceedance share" if on_exceedance_scale(v) else ""
        out.append(VerdictRow(
            metric=str(v.get("metric", "?")), gating=is_gating(v), verdict=str(v.get("verdict")),
            label=verdict_label(v), state=allowance_state(v), baseline=plain(v.get("baseline")),
            canary=plain(v.get("canary")), difference=plain(v.get("difference")),
            interval=f"[{plain(lo)}, {plain(hi)}]", scale=scale, allowed=fmt_line(v, unit=False),
            unit_suffix=scale_suffix(v), n_baseline=f"{v.get('n_baseline', 0)}", n_canary=f"{v.get('n_canary', 0)}",
            reason=str(v.get("reason", ""))))
    return out


def verdict_rows(verdicts: Iterable[dict]) -> list[str]:
    """The per-metric evidence as aligned text rows (header first). ``allowed`` is the rollback line (signed:
    the allowance in the harmful direction); a ``fail`` lies beyond it, a ``pass`` within it."""
    rows = [("metric", "verdict", "baseline", "canary", "interval (canary-baseline)", "allowed (rollback line)",
             "n base/canary")]
    for r in table_rows(verdicts):
        allowed = r.allowed + (r.scale if r.allowed != "-" else "")
        rows.append((r.name, r.label, r.baseline, r.canary, r.interval + r.scale, allowed,
                     f"{r.n_baseline}/{r.n_canary}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def html_table(verdicts: Sequence[dict], cls: str = "verdicts") -> str:
    """The verdict table as one HTML ``<table>`` (the report's). ``allowed`` is the rollback line with its
    unit; the verdict cell's title says where the interval lies against it."""
    rows = ["<tr><th>metric</th><th>verdict</th><th>baseline</th><th>canary</th><th>difference</th>"
            "<th>interval (canary−baseline)</th><th>allowed (rollback line)</th><th>n baseline / canary</th>"
            "<th>reason</th></tr>"]
    for r in table_rows(verdicts):
        scale = escape(r.scale)
        allowed = r.allowed + (r.unit_suffix if r.allowed != "-" else "")
        rows.append(
            f"<tr class='verdict-row'><td>{escape(r.metric)}{'' if r.gating else ' <i>(info)</i>'}</td>"
            f"<td class='v-{escape(r.verdict)}' title='{escape(r.state)}'>{escape(r.label)}</td>"
            f"<td class='num'>{r.baseline}</td><td class='num'>{r.canary}</td>"
            f"<td class='num'>{r.difference}{scale}</td><td class='num'>{r.interval}{scale}</td>"
            f"<td class='num allowed'>{escape(allowed)}</td>"
            f"<td class='num'>{r.n_baseline} / {r.n_canary}</td>"
            f"<td>{escape(r.reason)}</td></tr>")
    return f"<table class='{cls}'>{''.join(rows)}</table>"


# ------------------------------------------------------------------------------------------- sentences
def describe_beyond(v: dict) -> str:
    """A failing metric against its rollback line: ``error_rate: shown worse than baseline by at least +5.10 pp,
    allowed +1.50 pp`` — the interval end on the harmful side vs the allowed change."""
    out = (f"{v.get('metric', '?')}: shown worse than baseline by at least {fmt_signed(worse_bound(v), v)}, "
           f"allowed {fmt_signed(rollback_line(v), v)}")
    if on_exceedance_scale(v):
        out += " (exceedance share difference)"
    return out + (" (judged by the earlier any-harm rule, not beyond the allowance)" if any_harm_fail(v) else "")


def describe_verdict(v: dict) -> str:
    """One metric, self-explaining: ``error_rate (gating) FAIL: canary 10.20% vs baseline 2.00%, change
    +8.20 pp, interval [+5.10, +11.30] pp (α 0.05 per side); allowed +1.50 pp (absolute): beyond the
    allowance``. ``allowed`` is the rollback line (the allowed change in the harmful direction): FAIL = the
    interval lies beyond it, pass = within it."""
    kind, unit = v.get("kind", ""), v.get("unit", "")
    gating = "gating" if is_gating(v) else "not gating"
    verdict = str(v.get("verdict", "?"))
    verdict = verdict.upper() if verdict == "fail" else verdict
    allowed_s = fmt_signed(rollback_line(v), v)
    mode = v.get("allowed_mode") or ""
    if mode == "auto" and v.get("allowed_derivation"):
        mode = f"auto: {v['allowed_derivation']}"
    alpha = v.get("alpha")
    alpha_s = f" (α {alpha:.3g} per side)" if isinstance(alpha, (int, float)) else ""
    change = "exceedance share change" if on_exceedance_scale(v) else "change"
    out = (f"{v.get('metric', '?')} ({gating}) {verdict}: canary {fmt_value(v.get('canary'), kind, unit)} vs "
           f"baseline {fmt_value(v.get('baseline'), kind, unit)}, {change} {fmt_signed(v.get('difference'), v)}, "
           f"interval {interval_text(v)}{alpha_s}; allowed {allowed_s}" + (f" ({mode})" if mode else "")
           + f": {allowance_state(v)}")
    n_c, n_b = v.get("n_canary"), v.get("n_baseline")
    if n_c is not None:
        out += f"; n canary {n_c:,} / baseline {n_b or 0:,}"
        if v.get("verdict") not in ("pass", "fail") and v.get("n_needed"):
            out += f" (~{int(v['n_needed']):,} canary needed)"
    return out


__all__ = ["EXCEEDANCE_SCALE", "PROPORTION_KINDS", "VerdictRow", "allowance_state", "any_harm_fail", "beyond_text",
           "describe_beyond", "describe_verdict", "difference_kind_unit", "fmt_line", "fmt_signed", "fmt_value",
           "html_table", "interval_text", "is_gating", "on_exceedance_scale", "ordered", "plain", "rollback_line",
           "scale_suffix", "table_rows", "verdict_label", "verdict_rows", "worse_bound"]
