"""The ``lockgate`` command line.

Over ~500 lines on purpose: it is the whole command line in one place — the argument parser
(:func:`build_parser`) and one thin ``cmd_*`` function per subcommand that parses, calls the part that
does the work (the control API through :mod:`lockgate.control_client`, the controller's HTTP API, the
deployment log, :mod:`lockgate.controller.app` for ``lockgate controller``) and prints its answer. No
logic of its own lives here.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys

import grpc
from google.protobuf import json_format

from lockgate.config import ConfigError, LockgateConfig, load_config
from lockgate.grpc_auth import NoTokenError

DEFAULT_CONFIG = os.environ.get("LOCKGATE_CONFIG", "lockgate.yaml")


class CliError(Exception):
    """A user-facing error: printed as ``lockgate: <message>``, exit status 2."""


def parse_percent(text: str) -> int:
    """``"5"`` / ``"0.25"`` / ``"12.5%"`` → basis points (0..10000). Resolution is 0.01 %."""
    raw = text.strip().rstrip("%")
    try:
        value = float(raw)
    except ValueError:
        raise CliError(f"PERCENT must be a number between 0 and 100, got {text!r}") from None
    if not 0 <= value <= 100:
        raise CliError(f"PERCENT must be between 0 and 100, got {text!r}")
    bp = round(value * 100)
    if abs(value * 100 - bp) > 1e-6:
        raise CliError(f"PERCENT resolution is 0.01 (basis points), got {text!r}")
    return bp


def _load(args) -> LockgateConfig:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise CliError(f"invalid config:\n{exc}") from None


def _control_client(args):
    """The control API client (:class:`lockgate.control_client.ControlClient`): TLS per the config's ``auth.tls``,
    and the caller's token — ``$LOCKGATE_TOKEN``, else the config's ``auth.token_file`` — sent as
    ``authorization: Bearer …`` (the control API records the token's client name as the actor)."""
    from lockgate.auth import AuthConfig, read_client_token
    from lockgate.control_client import ControlClient

    config = None
    if not args.control:
        config = _load(args)
    elif os.path.exists(args.config):
        try:
            config = load_config(args.config)
        except ConfigError:
            config = None  # --control given: the config is only a source of auth settings
    auth = config.auth if config is not None else AuthConfig()
    token = read_client_token()
    if token is None and auth.token_file:
        try:
            token = auth.own_token()
        except OSError as exc:
            raise CliError(f"cannot read auth.token_file {auth.token_file}: {exc.strerror or exc} "
                           f"(or set $LOCKGATE_TOKEN)") from None
    try:
        return ControlClient(args.control or config.control_addresses(), auth, token)
    except OSError as exc:
        raise CliError(f"cannot read the auth.tls files: {exc}") from None


def _call(client, method: str, *args, **kwargs):
    """``client.<method>(*args, **kwargs)``; an unreachable or refusing control API is a :class:`CliError`."""
    try:
        return getattr(client, method)(*args, **kwargs)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            raise CliError(f"cannot reach the lockgate control API at {client.address} (is `lockgate up` running?)") \
                from None
        raise CliError(exc.details() or str(exc.code())) from None
    finally:
        client.close()


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


def _pct(bp: int) -> str:
    return f"{bp / 100:g}%"


def _print_model(m, out=sys.stdout) -> None:
    canary = f"canary {m.canary} at {_pct(m.weight_bp)}" if m.canary else "no canary"
    print(f"{m.model}: stable {m.stable}, {canary} (routes version {m.xds_version})", file=out)
    if m.mirror_ppm:
        print(f"  shadow: {m.mirror_ppm / 1e4:g}% of requests mirrored to {m.canary} (answers discarded)", file=out)
    for c in m.cohorts:
        print(f"  cohort {c.name}: {c.kind} {c.key}={c.value} sent to {m.canary}", file=out)
    if m.ejected:
        print(f"  ejected: {', '.join(m.ejected)} (out of rotation by per-host gating)", file=out)
    if not m.envoys:
        print("  no Envoy connected", file=out)
    elif len(m.envoys) > 1:  # a fleet: the count first, then each Envoy
        off = sum(1 for e in m.envoys if not e.connected)
        nacked = sum(1 for e in m.envoys if e.connected and e.nack_version and e.nack_version == m.xds_version)
        synced = sum(1 for e in m.envoys if e.connected and e.acked)
        behind = len(m.envoys) - off - nacked - synced
        parts = [f"{synced} in sync"] + [f"{n} {what}" for n, what in ((behind, "NOT in sync"), (nacked, "NACKed"),
                                                                          (off, "DISCONNECTED")) if n]
        print(f"  {len(m.envoys)} Envoys: {', '.join(parts)}", file=out)
    for e in m.envoys:
        state = "connected" if e.connected else "DISCONNECTED"
        live = (f"canary {e.acked_canary} at {_pct(e.acked_weight_bp)}" if e.acked_canary else "no canary") \
            if e.acked_version else "nothing ACKed yet"
        sync = "in sync" if e.acked else "NOT in sync"
        line = f"  envoy {e.node_id}: {state}, ACKed version {e.acked_version or '-'} ({live}), {sync}"
        if e.nack_version:
            line += f"; last NACK of version {e.nack_version}: {e.nack_error}"
        print(line, file=out)


def cmd_weights(args) -> int:
    resp = _call(_control_client(args), "get_weights", args.model or "", deadline_s=5)
    if args.json:
        print(json_format.MessageToJson(resp, always_print_fields_with_no_presence=True))
        return 0
    for m in resp.models:
        _print_model(m)
    return 0


def _report(resp, verb: str, args) -> int:
    if args.json:
        print(json_format.MessageToJson(resp, always_print_fields_with_no_presence=True))
    else:
        m = resp.model
        n = len(m.envoys)
        acked = sum(1 for e in m.envoys if e.acked)
        print(f"{verb} on {acked}/{n} Envoys in {resp.elapsed_ms:.1f} ms")
        for e in m.envoys:
            print(f"  {e.node_id}: {'ACKed in %.1f ms' % e.ack_ms if e.acked else 'NOT ACKed'}")
        if resp.not_acked:
            print(f"lockgate: did not ACK: {', '.join(resp.not_acked)}", file=sys.stderr)
        if resp.message:
            print(f"lockgate: {resp.message}", file=sys.stderr)
    return 0 if resp.all_acked and resp.model.envoys and resp.persisted else 1


def cmd_set_weight(args) -> int:
    bp = parse_percent(args.percent)
    resp = _call(_control_client(args), "set_weight", args.model, args.version, bp, actor=_actor(),
                 reason=args.reason or "set-weight", timeout_s=args.timeout, deadline_s=args.timeout + 5)
    return _report(resp, f"set {args.model} canary {args.version} to {_pct(bp)}", args)


def cmd_rollback(args) -> int:
    resp = _call(_control_client(args), "rollback", args.model, actor=_actor(),
                 reason=args.reason or "manual rollback", timeout_s=args.timeout, deadline_s=args.timeout + 5)
    return _report(resp, f"reverted {args.model} to {resp.model.stable}", args)


def cmd_drill(args) -> int:
    resp = _call(_control_client(args), "drill", args.model, actor=_actor(), timeout_s=args.timeout,
                 deadline_s=args.timeout + 5)
    return _report(resp, f"drill for {args.model}: routes re-pushed (no traffic moved)", args)


def cmd_xds(args) -> int:
    from lockgate.xds.control import StateMismatchError
    from lockgate.xds.server import serve

    config = _load(args)
    try:
        asyncio.run(serve(config))
    except StateMismatchError as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_envoy(args) -> int:
    """``lockgate envoy``: write Envoy's bootstrap for this host from lockgate.yaml and become Envoy (``exec``:
    a service manager supervises and signals Envoy itself), with ``envoy.concurrency`` workers, as ``lockgate
    up`` runs it. ``--print-bootstrap``: only print the bootstrap (for an Envoy you run yourself)."""
    from pathlib import Path

    from lockgate.config.common import NODE_ID_RE
    from lockgate.envoy_proc import EnvoyNotFound, envoy_command, render_bootstrap

    config = _load(args)
    if args.node_id is not None and not NODE_ID_RE.match(args.node_id):
        raise CliError(f"--node-id: must be 1-128 characters of letters, digits, '.', '_' and '-', got {args.node_id!r}")
    text = render_bootstrap(config, node_id=args.node_id)  # with auth.tokens: also the 0600 ADS credential file
    if args.print_bootstrap:
        sys.stdout.write(text)
        return 0
    path = Path(args.bootstrap) if args.bootstrap else config.state_dir / "envoy-bootstrap.yaml"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        argv = envoy_command(path, concurrency=config.envoy.concurrency, log_level=args.log_level)
    except OSError as exc:
        raise CliError(f"cannot write the Envoy bootstrap {path}: {exc.strerror or exc}") from None
    except EnvoyNotFound as exc:
        raise CliError(str(exc)) from None
    print(f"lockgate envoy: {' '.join(argv)}", flush=True)
    os.execv(argv[0], argv)
    return 1  # not reached


def cmd_extproc(args) -> int:
    from lockgate.aio import run_fast
    from lockgate.extproc.server import serve

    config = _load(args)
    if not 0 <= args.index < config.extproc_processes:
        raise CliError(f"--index must be 0..{config.extproc_processes - 1} (extproc_processes: "
                       f"{config.extproc_processes}), got {args.index}")
    run_fast(serve(config, index=args.index, demote_threads=True))
    return 0


def cmd_controller(args) -> int:
    # One BLAS thread, as for `analyze`: the statistics' vector products are small, and OpenBLAS's worker
    # threads spin-wait between them, taking CPU from Envoy and the ext_proc on the same host. Set before
    # NumPy loads (the controller imports it).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from lockgate.controller import app

    config = _load(args)
    try:
        return asyncio.run(app.serve(config))
    except app.ControllerStartError as exc:
        raise CliError(str(exc)) from None


def cmd_observations_export(args) -> int:
    import sqlite3

    from lockgate.controller.ingest.export import export_jsonl, jsonl_columns, parse_time, select_rows
    from lockgate.controller.ingest.export_npz import export_npz, write_npz
    from lockgate.controller.ingest.observations import ObservationStore

    try:
        since = parse_time(args.since) if args.since is not None else None
        until = parse_time(args.until) if args.until is not None else None
    except ValueError as exc:
        raise CliError(f"--since/--until: {exc}") from None
    if args.format == "npz" and not args.output:
        raise CliError("--format npz writes a file: give it with -o")
    if args.input is not None:  # convert a JSONL export, no store needed
        if args.format != "npz":
            raise CliError("--from converts a JSONL export to --format npz")
        if args.version:
            raise CliError("--version cannot be used with --from")
        try:
            with open(args.input, encoding="utf-8") as f:
                cols = select_rows(jsonl_columns(f), args.model, include_replay=not args.no_replay, since_ts=since,
                                   until_ts=until)
            write_npz(cols, args.output)
        except (OSError, ValueError) as exc:
            raise CliError(f"{args.input}: {exc}") from None
        print(f"lockgate: converted {cols['ts'].size} observations of {args.model}", file=sys.stderr)
        return 0
    config = _load(args)
    path = config.observations_db_path
    try:
        store = ObservationStore(path, read_only=True)
    except FileNotFoundError:
        raise CliError(f"no observations recorded yet ({path} does not exist; is `lockgate controller` running?)") \
            from None
    if args.format == "npz":
        try:
            n = export_npz(store, args.output, args.model, since, until, args.version or None,
                           include_replay=not args.no_replay)
        except sqlite3.Error as exc:
            raise CliError(f"cannot read {path}: {exc}") from None
        except OSError as exc:
            raise CliError(f"cannot write {args.output}: {exc}") from None
        finally:
            store.close()
        print(f"lockgate: exported {n} observations of {args.model}", file=sys.stderr)
        return 0
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        n = export_jsonl(store, out, args.model, since, until, args.version or None,
                         include_replay=not args.no_replay)
        out.flush()
    except BrokenPipeError:  # `... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except sqlite3.Error as exc:
        raise CliError(f"cannot read {path}: {exc}") from None
    finally:
        if args.output:
            out.close()
        store.close()
    print(f"lockgate: exported {n} observations of {args.model}", file=sys.stderr)
    return 0


def cmd_up(args) -> int:
    from lockgate.supervisor import Supervisor

    config = _load(args)
    return Supervisor(config, os.path.abspath(args.config)).run()


def cmd_validate_config(args) -> int:
    config = _load(args)
    print(f"{args.config}: ok ({len(config.models)} models: {', '.join(m.name for m in config.models)})")
    from lockgate.supervisor import sizing  # what `lockgate up` will run on this host

    print(f"lockgate up here: Envoy with {sizing(config)}")
    from lockgate.database import redact

    print(f"state: PostgreSQL {redact(config.database)} (a schema per store)" if config.database
          else f"state: SQLite files in {config.state_dir}")
    return 0


def cmd_validate(args) -> int:
    """``lockgate validate FILE...``: check rollout specs (against lockgate.yaml when there is one)."""
    from lockgate.controller.decide.spec import load_spec, render_warning

    config = None
    note = ""
    if os.path.exists(args.config):
        config = _load(args)
    else:
        note = f" (no {args.config}: validated standalone, model and canary version not checked)"
    bad = 0
    reports = []
    for path in args.files:
        try:
            spec = load_spec(path, config)
        except ConfigError as exc:
            bad += 1
            if args.json:
                reports.append({"file": path, "ok": False, "problems": [p.render(exc.source) for p in exc.problems]})
            else:
                print(f"{path}: invalid rollout spec ({len(exc.problems)} problem{'s' * (len(exc.problems) != 1)}):",
                      file=sys.stderr)
                for p in exc.problems:
                    print(f"  {p.render(exc.source)}", file=sys.stderr)
            continue
        warnings = [render_warning(w, spec.source) for w in spec.warnings]
        if args.json:
            reports.append({"file": path, "ok": True, "sha256": spec.sha256, "checked_against": config.source
                            if config else None, "warnings": warnings, "spec": spec.canonical()})
        else:
            print(f"{path}: ok ({spec.summary()}, spec sha256 {spec.sha256[:12]}…){note}")
            for w in warnings:
                print(f"  {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(reports if len(reports) != 1 else reports[0], indent=2))
    return 2 if bad else 0


def cmd_schema(args) -> int:
    from lockgate.controller.decide.spec_schema import schema_json

    sys.stdout.write(schema_json())
    return 0


def _client_token(config) -> str | None:
    """The token the CLI presents to the controller: ``$LOCKGATE_TOKEN``, else the config's ``auth.token_file``."""
    from lockgate.auth import read_client_token

    token = read_client_token()
    if token or not config.auth.token_file:
        return token
    try:
        with open(config.auth.token_file, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError as exc:
        raise CliError(f"cannot read auth.token_file {config.auth.token_file}: {exc.strerror or exc} "
                       "(or set LOCKGATE_TOKEN)") from None


def _controller_http(args, method: str, path: str, payload: dict | None = None, timeout: float = 90.0):
    """Call the controller's HTTP API; returns (status, JSON)."""
    import urllib.error
    import urllib.request

    config = _load(args)
    url = f"http://{config.controller.http}{path}"
    data = json.dumps(payload).encode() if payload is not None else None
    headers = {"content-type": "application/json"}
    token = _client_token(config)
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {"error": exc.reason}
    except OSError as exc:
        raise CliError(f"cannot reach the lockgate controller at {config.controller.http} "
                       f"(is `lockgate up` running?): {exc}") from None


def _fail(status: int, body: dict) -> None:
    detail = body.get("detail")
    msg = body.get("error", f"HTTP {status}")
    if isinstance(detail, list):
        msg += ":\n" + "\n".join(str(d) for d in detail)
    raise CliError(msg)


def _plan_lines(plan: dict | None) -> list[str]:
    """The promotion plan of ``rollout start`` / ``rollout status`` (see :mod:`lockgate.controller.decide.ramp_plan`):
    its summary (traffic, ramp, max_duration), then one line per gating metric ("!": it has a warning)."""
    if not plan or not plan.get("metrics"):
        return []
    out = [f"  plan: {plan.get('summary', '')}"]
    for m in plan["metrics"]:
        mark = "!" if m.get("warning") else " "
        out.append(f"   {mark}{m['text']}")
    return out


def cmd_rollout_start(args) -> int:
    from pathlib import Path

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    status, body = _controller_http(args, "POST", "/v1/rollouts/start",
                                    {"spec": text, "source": args.file, "actor": _actor()})
    if status != 200:
        _fail(status, body)
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    r = body["rollout"]
    print(f"rollout #{r['id']}: {r['model']} {r['baseline']} → {r['canary']} {r['status']} "
          f"(spec sha256 {r['spec_hash'][:12]}…)")
    drill = body.get("start", {}).get("drill")
    if drill:
        print(f"  preflight drill: {'every Envoy ACKed' if drill['all_acked'] else 'FAILED'} in "
              f"{drill['elapsed_ms']:.1f} ms")
    for line in _plan_lines(body.get("plan")):
        print(line)
    for w in body.get("warnings", []):
        print(f"  warning: {w}", file=sys.stderr)
    return 0


def _verdict_table(last_eval: dict) -> list[str]:
    """Per-metric verdicts of the last judgement; ``allowed`` is the rollback line (fail = beyond it)."""
    from lockgate.controller.tell.verdicts import verdict_rows

    return ["  " + line for line in verdict_rows(last_eval.get("verdicts", []))]


def _cohort_lines(cohorts: list[dict] | None) -> list[str]:
    """``rollout status``: each cohort's requests since the start, apart from the gates' sample."""
    out = []
    for c in cohorts or []:
        rate = "-" if c.get("error_rate") is None else f"{c['error_rate'] * 100:.2f}%"
        p95 = "-" if c.get("p95_ms") is None else f"{c['p95_ms']:.0f} ms"
        when = "every stage" if c.get("from_stage", 1) == 1 else f"from stage {c['from_stage']}"
        out.append(f"  cohort {c['name']} ({c['match']}, {when}{'' if c.get('active') else ', not yet active'}): "
                   f"{c['requests']} requests ({c.get('canary', 0)} to the canary), {c['errors']} errors ({rate}), "
                   f"p95 {p95} — not in the gates' sample")
    return out


def _host_lines(entries: list[dict] | None, judged: dict | None) -> list[str]:
    """``rollout status``: per-host gating - each ejection and held rollback with its numbers, the hosts out."""
    out = []
    for e in entries or []:
        d = e.get("detail") or {}
        what = {"host_ejected": "EJECTED", "host_eject_incomplete": "ejection NOT ACKed everywhere",
                "host_suspect": "suspected (rollback held)"}.get(e.get("kind"), e.get("kind"))
        rates = ""
        if d.get("host_error_rate") is not None and d.get("peers_error_rate") is not None:
            rates = (f": errors {d['host_error_rate'] * 100:.2f}% of {d.get('host_requests', 0)} vs its peers' "
                     f"{d['peers_error_rate'] * 100:.2f}% of {d.get('peers_requests', 0)}")
        out.append(f"  host {d.get('host', '?')} {what}{rates}")
    if judged and judged.get("ejected"):
        out.append(f"  hosts out of rotation: {', '.join(judged['ejected'])} (the version is judged without them)")
    return out


def cmd_rollout_status(args) -> int:
    path = "/v1/rollouts" + (f"?model={args.model}" if args.model else "")
    status, body = _controller_http(args, "GET", path)
    if status != 200:
        _fail(status, body)
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    if not body["rollouts"]:
        print("no rollouts yet")
    for r in body["rollouts"]:
        ev = r.get("last_eval") or {}
        print(f"rollout #{r['id']} {r['model']}: {r['baseline']} → {r['canary']}: {r['status'].upper()}, "
              f"stage {r['stage'] + 1}, spec {r['spec_hash'][:12]}…")
        for a in r.get("approvals") or []:
            who = a["approved_by"] + ("" if a.get("authenticated") else " (unauthenticated)")
            print(f"  approved: end of stage {a['stage']} by {who}")
        if ev:
            sd = ev.get("stage_decision", {})
            print(f"  decision: {ev.get('decision')} → {sd.get('action', '-')}: {'; '.join(sd.get('reasons', []))}")
            print(f"  samples: baseline {ev.get('n_baseline', 0)}, canary {ev.get('n_canary', 0)} "
                  f"({ev.get('canary_samples_in_stage', 0)} in this stage); "
                  f"traffic {ev.get('requests_per_hour', 0):,.0f} req/h")
            print("\n".join(_verdict_table(ev)))
            for line in _gate_lines(ev):
                print(line)
            if ev.get("capacity"):
                c = ev["capacity"]
                print(f"  capacity: {'HOLDING' if c.get('holding') else 'fits' if c.get('fits') else 'over'} - "
                      f"{c.get('reason', '')}")
            for line in _cohort_lines(r.get("cohorts")):
                print(line)
            for line in _host_lines(r.get("hosts"), ev.get("hosts")):
                print(line)
            plan = r.get("plan")
            if plan and plan.get("metrics"):
                print("\n".join(_plan_lines(plan)))
                for w in plan.get("warnings", []):
                    print(f"  warning: {w}", file=sys.stderr)
            else:
                for p in ev.get("plan", []):
                    print(f"  ETA {p}")
            print(f"  {ev.get('alpha_statement', '')}")
    return 0


def cmd_rollout_approve(args) -> int:
    """``lockgate rollout approve MODEL [--stage N]``: let a gated stage end (recorded with who approved)."""
    payload: dict = {"actor": args.as_name or _actor()}
    if args.stage is not None:
        payload["stage"] = args.stage
    if args.note:
        payload["note"] = args.note
    status, body = _controller_http(args, "POST", f"/v1/rollouts/{args.model}/approve", payload)
    if status != 200:
        _fail(status, body)
    r = body["rollout"]
    who = body["approved_by"] + ("" if body.get("authenticated") else " (unauthenticated)")
    if body.get("already"):
        print(f"rollout #{r['id']} {r['model']}: {body['label']} was already approved by {who}")
    else:
        print(f"rollout #{r['id']} {r['model']}: {body['label']} approved by {who}; the controller moves on at its "
              f"next look once the stage's other conditions and checks hold")
    return 0


def _gate_lines(ev: dict) -> list[str]:
    """The current stage's gates (approval, external checks) of the last judgement."""
    g = ev.get("gates")
    if not g:
        return []
    out = []
    a = g.get("approval")
    if a:
        if a.get("approved_by"):
            who = a["approved_by"] + ("" if a.get("authenticated") else " (unauthenticated)")
            out.append(f"  approval: given by {who}")
        elif a.get("waiting_since"):
            import time

            out.append("  approval: waiting since "
                       + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a["waiting_since"])))
        else:
            out.append("  approval: required to leave this stage (not yet asked: the stage is not done)")
    for c in g.get("checks", []):
        state = c.get("state", "?") + (", calling" if c.get("running") else "")
        out.append(f"  check {c['name']}: {state}" + (f" - {c['reason']}" if c.get("reason") else
                                                     f" ({c.get('url')}, expects {c.get('expect')})"))
    return out


def cmd_rollout_action(args) -> int:
    status, body = _controller_http(args, "POST", f"/v1/rollouts/{args.model}/{args.action}", {"actor": _actor()})
    if status != 200:
        _fail(status, body)
    r = body["rollout"]
    print(f"rollout #{r['id']} {r['model']}: {r['status']}")
    t = body.get("timings")
    if args.action == "abort" and r["status"] not in ("aborted", "rolled_back"):
        # Not done until every Envoy has weight 0 and it is recorded: say what is missing and fail, so
        # scripts do not move on.
        t = t or {}
        why = (t.get("error") or ", ".join(t.get("not_acked") or []) or t.get("message")
               or (f"weight 0 served but not recorded: {t['record_error']}" if t.get("record_error") else "?"))
        print(f"lockgate: revert NOT complete: {why}; the controller keeps retrying until every Envoy ACKs "
              f"weight 0 and it is recorded (watch: lockgate rollout status {r['model']})", file=sys.stderr)
        return 1
    if t and t.get("push_to_ack_ms") is not None:
        print(f"  reverted to {r['baseline']} in {t['push_to_ack_ms']:.1f} ms")
    return 0


def cmd_analyze(args) -> int:
    # One BLAS thread: every look's vector products are small, and OpenBLAS's worker threads spin-wait
    # between them (a 2-core machine spent 5x the CPU on a 20k-observation replay). Set before NumPy loads.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from lockgate.controller.ingest.export import parse_time
    from lockgate.controller.decide.replay import analyze_file

    try:
        start = parse_time(args.start) if args.start is not None else None
        until = parse_time(args.until) if args.until is not None else None
    except ValueError as exc:
        raise CliError(f"--start/--until: {exc}") from None
    try:
        result = analyze_file(args.spec, args.observations, config_path=args.config if os.path.exists(args.config)
                              else None, until=until, start=start)
    except ConfigError as exc:
        raise CliError(f"invalid rollout spec:\n{exc}") from None
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(result))
    return 0


def _log_state_dir(args):
    """state_dir and database of ``-c lockgate.yaml`` (the deployment-log commands read the rollout store
    directly: rollouts.db, or its schema in PostgreSQL)."""
    config = _load(args)
    return config.state_dir, config.database


def _log_call(fn):
    from lockgate.controller.tell.history import LogError

    try:
        return fn()
    except LogError as exc:
        raise CliError(str(exc)) from None


def cmd_history(args) -> int:
    from lockgate.controller.tell import history as h
    state_dir, database = _log_state_dir(args)

    def run():
        store = h.open_log(state_dir, database)
        try:
            return h.history(store, args.model, args.limit)
        finally:
            store.close()

    rows = _log_call(run)
    if args.causes:
        c = h.causes(rows, args.recent)
        print(json.dumps(c, indent=2) if args.json else h.render_causes(c))
    else:
        print(json.dumps(rows, indent=2) if args.json else h.render_history(rows))
    return 0


def cmd_show(args) -> int:
    from lockgate.controller.tell import history as h
    state_dir, database = _log_state_dir(args)

    def run():
        store = h.open_log(state_dir, database)
        try:
            return h.describe(*h.load(store, args.id))
        finally:
            store.close()

    d = _log_call(run)
    print(json.dumps(d, indent=2) if args.json else h.render_show(d))
    return 0


def cmd_annotate(args) -> int:
    from lockgate.controller.tell import history as h
    state_dir, database = _log_state_dir(args)
    detail = _log_call(lambda: h.annotate(state_dir, args.id, args.root_cause, args.category, _actor(),
                                                  database=database))
    print(f"rollout #{args.id}: root cause recorded [{detail['category']}] {detail['root_cause']}")
    return 0


def cmd_rollout_diagnose(args) -> int:
    from lockgate.controller.tell import diagnose as dg
    config = _load(args)
    d = _log_call(lambda: dg.diagnose(config.state_dir, args.id, config.controller.retention_days, args.limit,
                                       database=config.database))
    print(json.dumps(d, indent=2) if args.json else dg.render(d))
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from lockgate.controller.tell.report import write_report

    state_dir, database = _log_state_dir(args)
    html, png = _log_call(lambda: write_report(state_dir, args.id, Path(args.output), png=not args.no_png,
                                                          database=database))
    print(f"wrote {html}" + (f" and {png}" if png else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lockgate", description="Progressive canary rollouts for models behind Envoy.")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="lockgate.yaml (default: %(default)s)")
    p.add_argument("--control", help="control API address host:port (default: from the config)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.set_defaults(fn=fn)
        sp.add_argument("-c", "--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sp

    add("up", cmd_up, "run the data path (xDS, ext_proc, Envoy) first, then the controller, until Ctrl-C")
    add("xds", cmd_xds, "run the xDS server (and control API) alone")
    sp = add("extproc", cmd_extproc, "run the ext_proc server alone")
    sp.add_argument("--index", type=int, default=0, help="which of extproc_processes (port = extproc.port + index)")
    sp = add("envoy", cmd_envoy, "write this host's Envoy bootstrap and run Envoy in this process (for systemd)")
    sp.add_argument("--node-id", help="this Envoy's node id (unique per Envoy; default: node_id from the config)")
    sp.add_argument("--bootstrap", metavar="FILE", help="where to write the bootstrap "
                                                        "(default: <state_dir>/envoy-bootstrap.yaml)")
    sp.add_argument("--log-level", default="warning", choices=("trace", "debug", "info", "warning", "error",
                                                               "critical", "off"))
    sp.add_argument("--print-bootstrap", action="store_true", help="print the bootstrap and exit (your own Envoy)")
    add("check-config", cmd_validate_config, "validate lockgate.yaml")
    add("controller", cmd_controller, "run the controller: observation collector, feedback API, metrics")
    sp = add("observations", None, "observations recorded by the controller")
    osub = sp.add_subparsers(dest="observations_cmd", required=True)
    ex = osub.add_parser("export", help="write a model's observations (with labels) as JSON lines or columns (.npz)")
    ex.set_defaults(fn=cmd_observations_export)
    ex.add_argument("-c", "--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ex.add_argument("--model", required=True)
    ex.add_argument("--since", help="epoch seconds or ISO 8601 (UTC if no offset); inclusive")
    ex.add_argument("--until", help="epoch seconds or ISO 8601 (UTC if no offset); exclusive")
    ex.add_argument("--version", action="append", help="only this version (repeatable)")
    ex.add_argument("--no-replay", action="store_true", help="leave out replay observations")
    ex.add_argument("-o", "--output", help="file to write (default: stdout; required for npz)")
    ex.add_argument("--format", choices=("jsonl", "npz"), default="jsonl",
                    help="jsonl (JSON Lines, default) or npz (the same rows as columns in one NumPy .npz file: "
                         "`lockgate analyze` reads it ~30x faster)")
    ex.add_argument("--from", dest="input", metavar="JSONL",
                    help="convert this JSONL export (with --format npz) instead of reading the store")
    sp = add("weights", cmd_weights, "desired canary weight and each Envoy's ACKed one")
    sp.add_argument("model", nargs="?")
    sp.add_argument("--json", action="store_true")
    sp = add("set-weight", cmd_set_weight, "move a share of a model's traffic to a canary version")
    sp.add_argument("model")
    sp.add_argument("version")
    sp.add_argument("percent", help="0-100, resolution 0.01")
    sp.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for every Envoy's ACK")
    sp.add_argument("--reason")
    sp.add_argument("--json", action="store_true")
    sp = add("rollback", cmd_rollback, "canary weight to 0 on every Envoy, at once")
    sp.add_argument("model")
    sp.add_argument("--timeout", type=float, default=5.0)
    sp.add_argument("--reason")
    sp.add_argument("--json", action="store_true")
    sp = add("drill", cmd_drill, "prove the revert path: re-push routes, time each Envoy's ACK")
    sp.add_argument("model")
    sp.add_argument("--timeout", type=float, default=5.0)
    sp.add_argument("--json", action="store_true")
    sp = add("validate", cmd_validate, "validate rollout spec files (with lockgate.yaml when it exists)")
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp.add_argument("--json", action="store_true", help="print the normalised spec and its full sha256")
    add("schema", cmd_schema, "print the JSON Schema of rollout spec files (for editors)")
    sp = add("rollout", None, "progressive rollouts driven by the controller")
    rsub = sp.add_subparsers(dest="rollout_cmd", required=True)
    r = rsub.add_parser("start", help="start a rollout from a spec file")
    r.add_argument("-c", "--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    r.add_argument("file")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_rollout_start)
    r = rsub.add_parser("status", help="stage, weight, per-metric verdicts and ETA")
    r.add_argument("-c", "--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    r.add_argument("model", nargs="?")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_rollout_status)
    for action, help_ in (("pause", "hold at the current stage (harm still rolls back)"),
                          ("resume", "continue a paused rollout"),
                          ("promote", "promote to 100% now (a human decision, recorded as such)"),
                          ("abort", "weights to 0 and stop the rollout")):
        r = rsub.add_parser(action, help=help_)
        r.add_argument("-c", "--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        r.add_argument("model")
        r.set_defaults(fn=cmd_rollout_action, action=action)
    r = rsub.add_parser("approve", help="approve the end of a gated stage (steps with approval: {required: true})")
    r.add_argument("-c", "--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    r.add_argument("model")
    r.add_argument("--stage", type=int, help="the stage (1 = the first) to approve; default: the current one")
    r.add_argument("--note", default="", help="a note kept in the deployment log")
    r.add_argument("--as", dest="as_name", metavar="NAME",
                   help="your name when the controller requires no token (recorded as unauthenticated; with "
                        "tokens the token's client name is recorded instead)")
    r.set_defaults(fn=cmd_rollout_approve)
    r = rsub.add_parser("diagnose", help="evidence per metric, per upstream host, first failing canary requests")
    r.add_argument("-c", "--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    r.add_argument("id", type=int, help="rollout id (see `lockgate history`)")
    r.add_argument("--limit", type=int, default=10, help="failing requests to list (default: %(default)s)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_rollout_diagnose)
    sp = add("history", cmd_history, "the deployment log: one line per attempted rollout")
    sp.add_argument("--model")
    sp.add_argument("--limit", type=int, default=100, help="most recent rollouts (default: %(default)s)")
    sp.add_argument("--causes", action="store_true", help="summarise failure causes (annotations) instead")
    sp.add_argument("--recent", type=int, default=5, help="with --causes: examples to list (default: %(default)s)")
    sp.add_argument("--json", action="store_true")
    sp = add("show", cmd_show, "everything about one rollout: spec, stages, decision, timings, actions")
    sp.add_argument("id", type=int)
    sp.add_argument("--json", action="store_true")
    sp = add("annotate", cmd_annotate, "record a rollout's root cause (appended to the log; latest wins)")
    sp.add_argument("id", type=int)
    sp.add_argument("--root-cause", required=True, metavar="TEXT")
    sp.add_argument("--category", required=True, choices=("data", "preprocessing", "tokenizer", "hardware", "other"))
    sp = add("report", cmd_report, "write a self-contained HTML report of a rollout (+ PNG of the main chart)")
    sp.add_argument("id", type=int)
    sp.add_argument("-o", "--output", required=True, help="HTML file to write (the PNG goes next to it)")
    sp.add_argument("--no-png", action="store_true", help="write only the HTML")
    sp = add("analyze", cmd_analyze, "replay the controller's decisions offline on recorded observations")
    sp.add_argument("--spec", required=True)
    sp.add_argument("--observations", required=True,
                    help="an export from `lockgate observations export`: JSONL or --format npz (recognised by content)")
    sp.add_argument("--start", metavar="TS",
                    help="rollout start (epoch seconds or ISO 8601, UTC if no offset): looks are every "
                         "analysis_interval_s from here; earlier observations are left out (default: the first "
                         "observation)")
    sp.add_argument("--until", metavar="TS",
                    help="horizon (epoch seconds or ISO 8601): the last look is the first at or after TS "
                         "(default: the last observation)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.fn(args)
    except CliError as exc:
        print(f"lockgate: {exc}", file=sys.stderr)
        return 2
    except NoTokenError as exc:  # auth.tokens set, but this process has no token of its own
        print(f"lockgate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
