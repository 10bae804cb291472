"""``lockgate report ID -o report.html``: one self-contained HTML page (+ a PNG of the main chart).

The page needs no network: inline CSS, a few lines of inline JS, and inline SVG charts generated
here (:mod:`.charts`). From ``rollout_evaluations`` (every judgement over time) and the event log:

* traffic share (canary weight) over time, from the weight-moving events and the judgements;
* per metric: the value per arm (baseline vs canary) and the canary−baseline interval with its
  point estimate over time, drawn against the rollback line — the allowed change in the harmful
  direction (``+allowed`` / ``-allowed``; an interval beyond it is a ``fail``, one entirely on the other
  side a ``pass``), with 0 as a faint reference — stages shaded and labelled, decision markers
  (start / advance / promote / rollback / …) drawn as labelled vertical lines on every chart;
* the verdict table of the last judgement, the last judgement of every stage, rollback timings, the
  annotations and the full event log.

``report.png`` (next to the HTML) is the main chart — the metric that decided (the first failing
gating metric of the last judgement, else the first gating metric) with the traffic share — drawn
from the same laid-out primitives by matplotlib (:mod:`.png`: Agg, real fonts, anti-aliased).
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Sequence

from lockgate.controller.tell.history import describe, fmt_duration, fmt_ts, load, open_log
from lockgate.controller.tell.verdicts import html_table as verdict_table
from lockgate.controller.tell.verdicts import is_gating, on_exceedance_scale, rollback_line, scale_suffix
from lockgate.controller.tell.report.charts import (BASELINE, CANARY, HARM, ZERO, Band, Figure, HLine, Marker, Panel,
                                               Series, Span, fmt_elapsed, layout, to_svg)
from lockgate.controller.tell.report.png import to_png
from lockgate.controller.decide.rollouts import Rollout

MARKER_KINDS = ("started", "advanced", "promoted", "rolled_back", "aborted", "inconclusive", "paused", "resumed")


def _metric_names(evaluations: Sequence[dict]) -> list[str]:
    names: list[str] = []
    for ev in evaluations:
        for v in ev["judgement"].get("verdicts", []):
            if v["metric"] not in names:
                names.append(v["metric"])
    return names


def _verdict(ev: dict, metric: str) -> dict | None:
    for v in ev["judgement"].get("verdicts", []):
        if v["metric"] == metric:
            return v
    return None


def _fin(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def main_metric(r: Rollout, evaluations: Sequence[dict]) -> str | None:
    last = (r.last_eval or (evaluations[-1]["judgement"] if evaluations else {})).get("verdicts", [])
    for v in last:
        if is_gating(v) and v.get("verdict") == "fail":
            return v["metric"]
    for v in last:
        if is_gating(v):
            return v["metric"]
    names = _metric_names(evaluations)
    return names[0] if names else None


class ReportData:
    """Time series for the charts, in seconds since the rollout started."""

    def __init__(self, r: Rollout, events: Sequence[dict], evaluations: Sequence[dict], now: float | None = None):
        import time

        self.r, self.events, self.evaluations = r, list(events), list(evaluations)
        self.t0 = r.started_at
        end = r.ended_at if r.ended_at is not None else (time.time() if now is None else now)
        last_ts = max([e["ts"] for e in self.events if e["kind"] != "annotation"]
                      + [e["ts"] for e in self.evaluations] + [end])
        self.t1 = max(last_ts - self.t0, 1.0) * 1.02
        self.metrics = _metric_names(self.evaluations)
        self.markers = [Marker(e["ts"] - self.t0, e["kind"], self._marker_label(e))
                        for e in self.events if e["kind"] in MARKER_KINDS]
        self.spans = self._spans()

    @staticmethod
    def _marker_label(e: dict) -> str:
        k = e["kind"].replace("_", " ")
        bp = e.get("weight_bp")
        return f"{k} {bp / 100:g}%" if bp is not None and e["kind"] in ("started", "advanced", "promoted") else k

    def _spans(self) -> list[Span]:
        starts = [(e["ts"] - self.t0, e["stage"], e["weight_bp"]) for e in self.events
                  if e["kind"] in ("started", "advanced") and e["stage"] is not None]
        out = []
        for i, (x, stage, bp) in enumerate(starts):
            x1 = starts[i + 1][0] if i + 1 < len(starts) else self._stage_end(x)
            out.append(Span(x, x1, f"stage {stage + 1} ({(bp or 0) / 100:g}%)"))
        return out

    def _stage_end(self, x: float) -> float:
        for e in self.events:
            if e["kind"] in ("promoted", "rolled_back", "aborted", "inconclusive") and e["ts"] - self.t0 >= x:
                return e["ts"] - self.t0
        return self.t1

    def traffic_points(self) -> list[tuple[float, float | None]]:
        """Canary share (%) over time: each weight-moving event, and the weight each judgement saw."""
        pts: list[tuple[float, float]] = [(0.0, 0.0)]
        for e in self.events:
            if e["kind"] in ("started", "advanced", "promoted", "rolled_back", "aborted") and e["weight_bp"] is not None:
                pts.append((e["ts"] - self.t0, e["weight_bp"] / 100))
        pts.sort(key=lambda p: p[0])
        return pts

    def series(self, metric: str) -> dict[str, list]:
        xs, base, can, diff, band, allowed, verdicts = [], [], [], [], [], [], []
        for ev in self.evaluations:
            v = _verdict(ev, metric)
            if v is None:
                continue
            x = ev["ts"] - self.t0
            lo, hi = (v.get("interval") or (None, None))
            xs.append(x)
            base.append((x, _fin(v.get("baseline"))))
            can.append((x, _fin(v.get("canary"))))
            diff.append((x, _fin(v.get("difference"))))
            band.append((x, _fin(lo), _fin(hi)))
            allowed.append(rollback_line(v))  # signed: +allowed (harmful increase) / -allowed (decrease)
            verdicts.append(v)
        return {"x": xs, "baseline": base, "canary": can, "difference": diff, "band": band, "allowed": allowed,
                "verdicts": verdicts}


def traffic_panel(d: ReportData, height: int = 110) -> Panel:
    return Panel("canary traffic share (%)", [Series("canary weight", CANARY, d.traffic_points(), step=True,
                                                     dots=True, attrs={"data-series": "traffic"})],
                 height=height, ylim=(0, 105), yfmt=lambda v: f"{v:g}%")


def metric_panels(d: ReportData, metric: str) -> list[Panel]:
    s = d.series(metric)
    last = s["verdicts"][-1] if s["verdicts"] else {}
    unit = f" ({last['unit']})" if last.get("unit") else ""
    values = Panel(f"{metric}{unit}: value per arm", [
        Series("baseline", BASELINE, s["baseline"], attrs={"data-metric": metric, "data-series": "baseline"}),
        Series("canary", CANARY, s["canary"], attrs={"data-metric": metric, "data-series": "canary"})])
    # the rollback line: the allowed change in the harmful direction (the verdict's details["rollback_line"],
    # else +/-allowed for evaluations stored before it was recorded); 0 only as a faint reference
    line = next((a for a in reversed(s["allowed"]) if a is not None), None)
    hlines = [HLine(0.0, ZERO, "0 (no difference)", dash=None, attrs={"data-metric": metric, "data-line": "zero"},
                    anchor="start")]
    series = [Series("difference", "#9c4221", s["difference"],
                     attrs={"data-metric": metric, "data-series": "difference"})]
    if line is not None:
        known = [(x, a) for x, a in zip(s["x"], s["allowed"]) if a is not None]
        moves = len({round(a, 12) for _, a in known}) > 1  # relative allowances: the line moves with the baseline
        side = "fail below" if last.get("harmful") == "decrease" else "fail above"
        hlines.append(HLine(line, HARM, f"rollback line{' now' if moves else ''} (allowed {line:+.4g}"
                                        f"{scale_suffix(last)}; {side})",
                            attrs={"data-metric": metric, "data-line": "rollback", "data-y": f"{line:.6g}"}))
        if moves:
            series.append(Series("rollback line over time", HARM, known, width=1.0, dots=False, step=True,
                                 dash=(6, 4), attrs={"data-metric": metric, "data-series": "rollback-line"}))
    scale = "exceedance share difference (unitless)" if on_exceedance_scale(last) else "canary - baseline"
    interval = Panel(f"{metric}: {scale}, interval over time", series,
                     [Band("interval", CANARY, s["band"], attrs={"data-metric": metric, "data-series": "interval"})],
                     hlines)
    return [values, interval]


def metric_figure(d: ReportData, metric: str) -> Figure:
    gating = any(is_gating(v) for v in d.series(metric)["verdicts"])
    return Figure(f"{metric}{'' if gating else ' (informational)'}", 0.0, d.t1, metric_panels(d, metric),
                  d.markers, d.spans, fmt_elapsed, attrs={"data-figure": metric})


def traffic_figure(d: ReportData) -> Figure:
    return Figure("traffic share over time", 0.0, d.t1, [traffic_panel(d, 140)], d.markers, d.spans, fmt_elapsed,
                  attrs={"data-figure": "traffic"})


def main_figure(d: ReportData) -> Figure | None:
    m = main_metric(d.r, d.evaluations)
    if m is None:
        return Figure(f"rollout #{d.r.id} {d.r.model} {d.r.baseline} -> {d.r.canary}: traffic share", 0.0, d.t1,
                      [traffic_panel(d)], d.markers, d.spans, fmt_elapsed, attrs={"data-figure": "main"})
    return Figure(f"rollout #{d.r.id} {d.r.model} {d.r.baseline} -> {d.r.canary} ({d.r.status}): {m}", 0.0, d.t1,
                  metric_panels(d, m) + [traffic_panel(d)], d.markers, d.spans, fmt_elapsed,
                  attrs={"data-figure": "main"})


# ------------------------------------------------------------------------------------------- HTML
CSS = """
body{font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;color:#1a202c;
margin:0;background:#f7fafc}
main{max-width:1000px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e2e8f0;padding-bottom:4px}
.status{display:inline-block;padding:2px 8px;border-radius:4px;color:#fff;font-weight:600;font-size:13px}
.s-promoted{background:#2f855a}.s-rolled_back,.s-aborted{background:#c53030}.s-inconclusive{background:#b7791f}
.s-running,.s-paused,.s-pending{background:#2b6cb0}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px;margin:6px 0}
th,td{border:1px solid #e2e8f0;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#edf2f7} td.num{text-align:right;font-variant-numeric:tabular-nums}
.v-fail{color:#c53030;font-weight:600}.v-pass{color:#2f855a;font-weight:600}.v-continue{color:#4a5568}
.chart-box{background:#fff;border:1px solid #e2e8f0;margin:10px 0;overflow-x:auto}
svg.chart text{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif}
svg.chart circle.pt:hover{r:5}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:8px 0} dt{color:#4a5568} dd{margin:0}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
pre{background:#fff;border:1px solid #e2e8f0;padding:8px;overflow-x:auto}
#readout{position:fixed;pointer-events:none;background:#1a202c;color:#fff;padding:3px 6px;border-radius:3px;
font-size:12px;display:none}
"""

JS = """
(function(){var r=document.getElementById('readout');
document.querySelectorAll('svg.chart circle.pt').forEach(function(c){
 var t=c.querySelector('title'); if(!t) return; var s=t.textContent;
 c.addEventListener('mouseenter',function(e){r.textContent=s;r.style.display='block';});
 c.addEventListener('mousemove',function(e){r.style.left=(e.clientX+12)+'px';r.style.top=(e.clientY+12)+'px';});
 c.addEventListener('mouseleave',function(){r.style.display='none';});});
document.body.setAttribute('data-charts',String(document.querySelectorAll('svg.chart').length));})();
"""


def _n(x, fmt="{:.4g}") -> str:
    return "-" if x is None else fmt.format(x)


def cohort_table(cohorts: Sequence[dict]) -> str:
    """The cohorts (``rollout.cohorts``) as of the last judgement: their requests since the start, apart from
    the gates' sample (a cohort is chosen, not random: never compared)."""
    rows = "".join(
        f"<tr><td>{escape(c['name'])}</td><td>{escape(c['match'])}</td><td>{c.get('from_stage', 1)}</td>"
        f"<td>{c['requests']}</td><td>{c.get('canary', 0)}</td><td>{c['errors']}</td>"
        f"<td>{'-' if c.get('error_rate') is None else '%.2f%%' % (c['error_rate'] * 100)}</td>"
        f"<td>{_n(c.get('p95_ms'), '{:.0f}')}</td></tr>" for c in cohorts)
    return ("<h2>Cohorts (not in the gates' sample)</h2><table class='verdicts'><tr><th>cohort</th><th>match</th>"
            "<th>from stage</th><th>requests</th><th>to the canary</th><th>errors</th><th>error rate</th>"
            f"<th>p95 ms</th></tr>{rows}</table>")


def render_html(r: Rollout, events: Sequence[dict], evaluations: Sequence[dict], now: float | None = None,
                png_name: str | None = None) -> str:
    d = ReportData(r, events, evaluations, now)
    info = describe(r, events, evaluations, now)
    ro = info["rollout"]
    figs = [traffic_figure(d)] + [metric_figure(d, m) for m in d.metrics]
    h: list[str] = []
    title = f"Rollout #{r.id} — {r.model} {r.baseline} → {r.canary}"
    h.append(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>"
             f"<main><h1>{escape(title)} <span class='status s-{escape(r.status)}'>{escape(r.status.upper())}</span></h1>")
    dec = info["decision"]
    h.append("<dl>")
    for k, v in (("spec sha256", f"<code>{escape(r.spec_hash)}</code> ({escape(r.spec_source)})"),
                 ("started", f"{fmt_ts(r.started_at)} by {escape(r.created_by)}"),
                 ("ended", fmt_ts(r.ended_at)), ("duration", fmt_duration(ro["duration_s"])),
                 ("stages reached", escape(ro["stages_reached"])),
                 ("decision", "-" if not dec else f"{escape(dec['kind'])} by {escape(dec['actor'])} at "
                                                   f"{fmt_ts(dec['ts'])}: {escape('; '.join(dec['reasons']))}"),
                 ("evaluations", str(len(evaluations)))):
        h.append(f"<dt>{k}</dt><dd>{v}</dd>")
    rb = info["rollback"]
    if rb:
        if rb.get("error"):
            h.append(f"<dt>revert</dt><dd>FAILED: {escape(rb['error'])}</dd>")
        else:
            envoys = ", ".join(f"{escape(e['node_id'])} {_n(e.get('ack_ms'), '{:.1f}')} ms"
                               for e in rb.get("envoys", []))
            h.append(f"<dt>revert</dt><dd>push→every ACK {_n(rb.get('push_to_ack_ms'), '{:.1f}')} ms, "
                     f"detection→ACK {_n(rb.get('detect_to_ack_ms'), '{:.1f}')} ms (detected "
                     f"{fmt_ts(rb.get('detected_at'))}); per Envoy: {envoys or '-'}</dd>")
    ann = info["annotation"]
    if ann:
        h.append(f"<dt>root cause</dt><dd>[{escape(ann['category'])}] {escape(ann['root_cause'])} "
                 f"({escape(ann['actor'])}, {fmt_ts(ann['ts'])})</dd>")
    h.append("</dl>")
    if png_name:
        h.append(f"<p>Main chart as a picture: <a href='{escape(png_name)}'>{escape(png_name)}</a></p>")
    h.append("<h2>Verdicts (last judgement)</h2>")
    last = r.last_eval or {}
    h.append(verdict_table(last.get("verdicts", [])) if last.get("verdicts") else "<p>no judgement recorded</p>")
    if last.get("alpha_statement"):
        h.append(f"<p>{escape(last['alpha_statement'])}</p>")
    if last.get("cohorts"):
        h.append(cohort_table(last["cohorts"]))
    if last.get("capacity"):  # rollout.capacity: the next step's projection onto the canary's hosts
        c = last["capacity"]
        state = "HOLDING" if c.get("holding") else "fits" if c.get("fits") else "over"
        h.append(f"<h2>Capacity (last judgement)</h2><p>{state}: {escape(str(c.get('reason', '')))}</p>")
    h.append("<h2>Charts</h2><p>Time is seconds/minutes since the rollout started. Shaded bands are the stages; "
             "dashed vertical lines are decisions. The interval is the anytime-valid bound on canary − baseline; "
             "the red dashed line is the rollback line, the allowed change in the harmful direction (+allowed "
             "when an increase is harmful, −allowed when a decrease is): an interval entirely beyond it is a "
             "fail (roll back), one entirely on the other side a pass (within the allowance), even if it lies "
             "above (or below) 0. The faint line is 0, for reference. For exceedance-ratio quantiles the "
             "interval is on the exceedance-share difference (unitless).</p>")
    for f in figs:
        h.append(f"<div class='chart-box'>{to_svg(f)}</div>")
    h.append("<h2>Per stage (last judgement of each stage)</h2>")
    for st in info["stages"]:
        le = st["last_evaluation"]
        h.append(f"<h3>{escape(st['label'])}</h3><p>entered {fmt_ts(st['entered_at'])}, left {fmt_ts(st['left_at'])}, "
                 f"{st['evaluations']} evaluation(s)"
                 + (f"; last: {escape(str(le['decision']))} → {escape(str(le['action']))} "
                    f"({escape('; '.join(le['reasons']))})" if le else "") + "</p>")
        if le:
            h.append(verdict_table(le["verdicts"], "verdicts stage-verdicts"))
    h.append("<h2>Event log</h2><table class='events'><tr><th>time</th><th>event</th><th>stage</th><th>weight</th>"
             "<th>by</th><th>detail</th></tr>")
    for a in info["actions"]:
        h.append(f"<tr><td>{fmt_ts(a['ts'])}</td><td>{escape(a['kind'])}</td>"
                 f"<td>{'' if a['stage'] is None else a['stage'] + 1}</td>"
                 f"<td>{'' if a['weight_bp'] is None else '%g%%' % (a['weight_bp'] / 100)}</td>"
                 f"<td>{escape(a['actor'])}</td><td>{escape(a['summary'])}</td></tr>")
    h.append("</table><h2>Locked spec</h2>")
    h.append(f"<pre>{escape(r.spec_text)}</pre>")
    meta = {"id": r.id, "metrics": d.metrics, "evaluations": len(evaluations), "markers": len(d.markers)}
    h.append(f"<script type='application/json' id='report-data'>{escape(json.dumps(meta), quote=False)}</script>")
    h.append(f"<div id='readout'></div></main><script>{JS}</script></body></html>")
    return "".join(h)


def render_png(r: Rollout, events: Sequence[dict], evaluations: Sequence[dict], now: float | None = None,
               scale: int = 2) -> bytes:
    """The main chart (:func:`main_figure`) as PNG bytes, ``scale`` pixels per layout pixel (960 wide)."""
    fig = main_figure(ReportData(r, events, evaluations, now))
    w, hgt, prims = layout(fig)
    return to_png(w, hgt, prims, scale)


def write_report(state_dir: Path, rollout_id: int, out: Path, png: bool = True,
                 database: str | None = None) -> tuple[Path, Path | None]:
    """Write ``out`` (HTML) and, with ``png``, ``out`` with suffix ``.png``. Returns both paths
    (``database``: the config's PostgreSQL URL, if any)."""
    store = open_log(state_dir, database)
    try:
        r, events, evaluations = load(store, rollout_id)
    finally:
        store.close()
    out = Path(out)
    png_path = out.with_suffix(".png") if png else None
    out.write_text(render_html(r, events, evaluations, png_name=png_path.name if png_path else None),
                   encoding="utf-8")
    if png_path is not None:
        png_path.write_bytes(render_png(r, events, evaluations))
    return out, png_path


__all__ = ["ReportData", "main_figure", "main_metric", "metric_figure", "render_html", "render_png",
           "traffic_figure", "write_report"]
