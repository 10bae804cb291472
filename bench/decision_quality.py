"""Decision quality of lockgate's anytime-valid rules vs Flagger- and Kayenta-style rules.

Same simulated rollout streams for every rule (sticky users with correlated
requests, 1/5/20/50 % ramp, 45 min per stage, looks every 9 minutes):

* lockgate   -- lockgate.controller.stats.evaluate_all (5 gating metrics, alpha 0.05
                family-wise, Bonferroni split); rollback when any gating metric fails.
* flagger    -- fixed thresholds at every look: canary error rate > baseline + 1 pt,
                or canary p95 latency > 1.1 x baseline p95.
* kayenta    -- scipy.stats.mannwhitneyu(canary, baseline) at every look for each
                metric (error, latency, output tokens, score, refusal), alpha 0.05,
                harmful direction; rollback when any metric is significant.

Run:  python3 bench/decision_quality.py [--sims N] [--rph R]
Writes bench/results/decision_quality.md and the `decision_quality` section of docs/benchmarks.md
(``--doc-only``: only the section, from the existing results file).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lockgate.controller.stats import evaluate_all  # noqa: E402
from lockgate.controller.stats.simulate import (  # noqa: E402
    Effects,
    RolloutConfig,
    default_specs,
    look_times,
    prefix,
    simulate_rollout,
)

ALPHA = 0.05
N_LOOKS = 20

SCENARIOS = [
    ("A/A (no change)", Effects(), None),
    ("benign improvement", Effects(error_mult=0.7, latency_mult=0.9, score_shift=0.02), None),
    ("error rate x2", Effects(error_mult=2.0), "error"),
    ("p95 latency +20%", Effects(latency_mult=1.2), "latency"),
    ("output length +30%", Effects(length_mult=1.3), "tokens"),
    ("refusals x3", Effects(refusal_mult=3.0), "refusal"),
    ("score -0.03", Effects(score_shift=-0.03), "score"),
]


def rule_lockgate(d: dict, specs) -> bool:
    return evaluate_all(specs, d, ALPHA, quantile_intervals=False).decision == "rollback"


def rule_flagger(d: dict, specs=None) -> bool:
    c = d["is_canary"]
    if c.sum() == 0 or (~c).sum() == 0:
        return False
    if d["error"][c].mean() > d["error"][~c].mean() + 0.01:
        return True
    lc, lb = d["latency_ms"][c], d["latency_ms"][~c]
    lc, lb = lc[np.isfinite(lc)], lb[np.isfinite(lb)]
    if lc.size and lb.size and np.quantile(lc, 0.95) > 1.1 * np.quantile(lb, 0.95):
        return True
    return False


KAYENTA_METRICS = (("error", "greater"), ("refusal", "greater"), ("latency_ms", "greater"),
                   ("output_tokens", "greater"), ("score", "less"))


def rule_kayenta(d: dict, specs=None) -> bool:
    c = d["is_canary"]
    for col, harmful in KAYENTA_METRICS:
        v = np.asarray(d[col], dtype=float)
        a, b = v[c], v[~c]
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if a.size < 2 or b.size < 2:
            continue
        if a.min() == a.max() == b.min() == b.max():
            continue
        p = mannwhitneyu(a, b, alternative="two-sided").pvalue
        worse = np.mean(a) > np.mean(b) if harmful == "greater" else np.mean(a) < np.mean(b)
        if p < ALPHA and worse:
            return True
    return False


RULES = {"lockgate (anytime-valid)": rule_lockgate, "Flagger-style thresholds": rule_flagger,
         "Kayenta-style repeated Mann-Whitney": rule_kayenta}


def run(n_sims: int, rph: float, seed: int) -> dict:
    cfg = RolloutConfig(requests_per_hour=rph)
    specs = default_specs()
    looks = look_times(cfg, N_LOOKS)
    out = {}
    for name, eff, _ in SCENARIOS:
        rng = np.random.default_rng(seed)
        res = {r: {"rollbacks": 0, "canary_req": []} for r in RULES}
        for _ in range(n_sims):
            s = simulate_rollout(rng, cfg, eff)
            done = {r: False for r in RULES}
            for t in looks:
                d = prefix(s, t)
                for r, fn in RULES.items():
                    if not done[r] and fn(d, specs):
                        done[r] = True
                        res[r]["rollbacks"] += 1
                        res[r]["canary_req"].append(int(d["is_canary"].sum()))
                if all(done.values()):
                    break
        out[name] = res
        print(f"{name}: " + ", ".join(f"{r.split()[0]}={v['rollbacks']}/{n_sims}" for r, v in res.items()), flush=True)
    return out


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def write_md(out: dict, n_sims: int, rph: float, seed: int, elapsed: float, cmd: str) -> str:
    cfg = RolloutConfig(requests_per_hour=rph)
    lines = [
        "# Decision quality: lockgate vs fixed-threshold and repeated-test rules",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.node() or 'unknown'} / {platform.machine()} / {os.cpu_count()} CPUs / "
        f"{platform.system()} {platform.release()} / Python {platform.python_version()} / numpy {np.__version__}",
        f"- command: `{cmd}`  (runtime {elapsed:.0f} s; load average at end {_load()})",
        f"- streams: {n_sims} simulated rollouts per scenario (seed {seed}), {rph:,.0f} req/h, stages "
        f"{'/'.join(f'{s:g}' for s in (100 * np.asarray(cfg.stages)))} % x {cfg.hours_per_stage * 60:.0f} min, "
        f"{N_LOOKS} looks (every {cfg.hours * 60 / N_LOOKS:.0f} min), sticky users with ~{cfg.requests_per_user:g} "
        "correlated requests each (per-user random effects), diurnal baseline drift.",
        f"- lockgate: alpha {ALPHA} family-wise over 5 gating metrics (Bonferroni, {ALPHA / 5:g} each); "
        "Flagger-style: error rate > baseline + 1 pt or p95 > 1.1 x baseline at any look; "
        f"Kayenta-style: two-sided Mann-Whitney per metric at each look, p < {ALPHA} in the harmful direction.",
        "",
        "Rollback rate = fraction of rollouts rolled back at any look (on A/A and benign = false rollbacks; "
        "on regressions = detection).  Canary requests = median canary requests served before the rollback "
        "(among rolled-back rollouts).",
        "",
        "| scenario | rule | rollback rate | median canary requests before rollback |",
        "|---|---|---:|---:|",
    ]
    for name, res in out.items():
        for r, v in res.items():
            rate = v["rollbacks"] / n_sims
            med = f"{int(np.median(v['canary_req'])):,}" if v["canary_req"] else "-"
            lines.append(f"| {name} | {r} | {rate:.1%} | {med} |")
    lines += [
        "",
        "Reading: a rule is useful only if its A/A and benign rows are <= alpha (5 %) *and* its regression rows "
        "are high.  Repeated fixed-sample tests inflate false rollbacks with every look; fixed thresholds fire on "
        "noise at small canary shares and miss regressions that are not in their metrics (or below the threshold).  "
        "Their high detection rates on regressions are not evidence of power: they also roll back most unchanged "
        "models, usually within the first few dozen canary requests.  lockgate needs more canary requests before a "
        "rollback (hundreds to a few thousand, mostly at the 1-5 % stages) because it only acts on harm that is "
        "shown uniformly over all looks and all gating metrics.",
        "",
    ]
    return "\n".join(lines)


DOC = ROOT / "docs" / "benchmarks.md"
LOCKGATE_RULE = "lockgate (anytime-valid)"
NO_HARM = ("A/A (no change)", "benign improvement")


def doc_section(md: str) -> str:
    """The ``decision_quality`` section of docs/benchmarks.md, built from the results file's text."""
    bullets = {ln[2:].split(":", 1)[0]: ln[2:].split(":", 1)[1].strip() for ln in md.splitlines()
               if ln.startswith("- ") and ":" in ln}
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    reading = next((ln for ln in md.splitlines() if ln.startswith("Reading:")), "")
    rates, needed = {}, {}
    for ln in table[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rates[(cells[0], cells[1])] = float(cells[2].rstrip("%"))
        if cells[0] not in NO_HARM and cells[3] != "-":
            needed[(cells[0], cells[1])] = int(cells[3].replace(",", ""))
    ours = {sc: r for (sc, rule), r in rates.items() if rule == LOCKGATE_RULE}
    false_rb = max(ours[sc] for sc in NO_HARM if sc in ours)
    detect = min(r for sc, r in ours.items() if sc not in NO_HARM)
    ours_n = [n for (sc, rule), n in needed.items() if rule == LOCKGATE_RULE]
    others_n = [n for (sc, rule), n in needed.items() if rule != LOCKGATE_RULE]
    others_false = [r for (sc, rule), r in rates.items() if rule != LOCKGATE_RULE and sc in NO_HARM]
    met = lambda ok: "**met**" if ok else "**NOT met**"  # noqa: E731
    lines = [
        "## Decision quality: lockgate vs Flagger-style thresholds and Kayenta-style repeated tests",
        "",
        "A simulation (no processes): the same rollout streams judged by three rules. Written by "
        "`bench/decision_quality.py` from its results file, "
        "[`bench/results/decision_quality.md`](../bench/results/decision_quality.md) (definitions and full text there).",
        "",
        f"- Machine: {bullets.get('machine', '?')}",
        f"- Date: {bullets.get('date', '?')}",
        f"- Command: {bullets.get('command', '?')}",
        f"- Streams: {bullets.get('streams', '?')}",
        f"- Rules: lockgate: {bullets.get('lockgate', '?')}",
        "",
        "Rollback rate = fraction of rollouts rolled back at any look (on A/A and benign = false rollbacks; on "
        "regressions = detection). Canary requests = median canary requests served before the rollback (among "
        "rolled-back rollouts).",
        "",
        *table,
        "",
        f"Targets (the results' own criterion — a rule is useful only if it rolls back unchanged and benign "
        f"canaries at most alpha of the time and catches regressions), lockgate rule: false rollbacks on A/A and "
        f"benign ≤ alpha (5 %) — {met(false_rb <= 100 * ALPHA)} (at most {false_rb:.1f} %); every simulated "
        f"regression rolled back — {met(detect >= 99.95)} (lowest detection rate {detect:.1f} %), after a median "
        f"of {min(ours_n):,}–{max(ours_n):,} canary requests depending on the regression "
        f"(Flagger- and Kayenta-style rules: {min(others_n):,}–{max(others_n):,} requests, but "
        f"{min(others_false):.1f}–{max(others_false):.1f} % false rollbacks).",
        "",
        reading,
    ]
    return "\n".join(lines) + "\n"


def write_doc_section(md: str) -> None:
    import re

    start, end = "<!-- decision_quality:start -->", "<!-- decision_quality:end -->"
    block = f"{start}\n{doc_section(md).rstrip()}\n{end}"
    text = DOC.read_text() if DOC.exists() else "# lockgate benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text, count=1) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)} section decision_quality")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=150)
    ap.add_argument("--rph", type=float, default=20000.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decision_quality.md"))
    ap.add_argument("--doc-only", action="store_true",
                    help="no simulation: write the docs/benchmarks.md section from the existing --out file")
    a = ap.parse_args()
    if a.doc_only:
        write_doc_section(Path(a.out).read_text())
        return
    t0 = time.perf_counter()
    out = run(a.sims, a.rph, a.seed)
    elapsed = time.perf_counter() - t0
    cmd = f"python3 bench/decision_quality.py --sims {a.sims} --rph {a.rph:g} --seed {a.seed}"
    md = write_md(out, a.sims, a.rph, a.seed, elapsed, cmd)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(md)
    print(md)
    write_doc_section(md)


if __name__ == "__main__":
    main()
