"""``lockgate up``: run the xDS server, the ext_proc server, Envoy and the controller until told to stop.

Each component is a child process with its output in ``<state_dir>/logs/<name>.log``.

Start order follows what the data path needs: xDS (weights loaded from SQLite) → ext_proc → Envoy,
each awaited until ready — then traffic flows — and only then the controller. The data path never
needs the controller (ext_proc queues observations until it is back, Envoy keeps its config), so a
controller that cannot start does not stop ``lockgate up``: it says so on stderr and keeps retrying
the controller with back-off (0.5 s doubling to :data:`RETRY_MAX_S`) while traffic flows. A data-path
component that fails its *first* start ends ``lockgate up`` (exit 1: there is nothing to serve).

Any component that dies later is restarted with the same back-off (traffic keeps flowing meanwhile:
Envoy keeps its config without xDS and skips a dead ext_proc). Status lines go to stdout (``serving
models on …`` once the first controller attempt has ended, ready or not); failures go to stderr.
SIGINT/SIGTERM stops everything: Envoy first, then ext_proc, xDS and the controller.

Sizing: Envoy runs ``envoy.concurrency`` worker threads (default: the host's cores) and there are
``extproc_processes`` ext_proc processes (default: derived from the workers,
:func:`lockgate.config.envoy.extproc_processes_for`); the ``data path up`` line says both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from lockgate.config import LockgateConfig
from lockgate.envoy_proc import envoy_command, render_bootstrap
from lockgate.grpc_auth import warn_if_insecure


#: longest wait between two start attempts of a component that keeps failing (seconds)
RETRY_MAX_S = 10.0
#: first wait after a failure (seconds); doubles with each consecutive failure up to RETRY_MAX_S
RETRY_MIN_S = 0.5
#: how long a start may take before the attempt counts as failed (seconds)
START_TIMEOUT_S = 30.0


@dataclass
class Component:
    """One child process. Ready when ``ready_url`` answers 200, or (no URL) when its log prints
    a line starting ``ready `` after this start.

    Its supervision state is one of ``down`` (not running; next attempt at ``next_attempt``,
    monotonic seconds), ``starting`` (started, not ready before ``start_deadline``) and ``ready``.
    """

    name: str
    argv: list[str]
    log_path: Path
    ready_url: str | None = None
    proc: subprocess.Popen | None = None
    log: IO | None = None
    restarts: int = 0
    log_offset: int = field(default=0)
    state: str = "down"
    failures: int = 0  # consecutive failed attempts (reset once ready); sets the back-off
    next_attempt: float = 0.0
    start_deadline: float = 0.0

    def start(self) -> None:
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.log = open(self.log_path, "ab", buffering=0)
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def ready(self) -> bool:
        if self.ready_url is not None:
            try:
                with urllib.request.urlopen(self.ready_url, timeout=0.5) as resp:
                    return resp.status == 200
            except OSError:
                return False
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return any(line.startswith(b"ready ") for line in f.read().splitlines())  # not "already in use"
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")[-chars:]
        except OSError:
            return ""

    def retry_delay(self) -> float:
        """Back-off before the next attempt after ``failures`` consecutive failures (seconds)."""
        return min(RETRY_MAX_S, RETRY_MIN_S * 2 ** max(0, self.failures - 1))

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None


def sizing(config: LockgateConfig) -> str:
    """How the data path is sized, for the status line: Envoy's workers and the ext_proc processes."""
    return config.envoy.describe(config.extproc_processes)


def components(config: LockgateConfig, config_path: str) -> list[Component]:
    """xDS, ext_proc, Envoy and the controller, in start order (the data path first)."""
    logs = config.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bootstrap = config.state_dir / "envoy-bootstrap.yaml"
    bootstrap.write_text(render_bootstrap(config))
    py = [sys.executable, "-m", "lockgate", "-c", config_path]
    return [
        Component("xds", py + ["xds"], logs / "xds.log"),
        *(Component(f"extproc-{i}" if config.extproc_processes > 1 else "extproc", py + ["extproc", "--index", str(i)],
                    logs / (f"extproc-{i}.log" if config.extproc_processes > 1 else "extproc.log"))
          for i in range(config.extproc_processes)),
        Component("envoy", envoy_command(bootstrap, concurrency=config.envoy.concurrency), logs / "envoy.log",
                  ready_url=f"http://{config.admin}/ready"),
        Component("controller", py + ["controller"], logs / "controller.log"),
    ]


#: A component's log is rotated (copied to ``.1``, older ones shifted, the live file truncated) past this
LOG_MAX_BYTES = 50 * 1024 * 1024
#: rotated copies kept per component (``.1`` … ``.N``)
LOG_KEEP = 3


def rotate_if_large(path: Path, max_bytes: int = LOG_MAX_BYTES, keep: int = LOG_KEEP) -> bool:
    """Copy-truncate rotation of a log a child appends to (its O_APPEND writes continue at the new end).

    ``path.1`` … ``path.<keep>`` hold the previous logs, newest first. Returns True if rotated.
    """
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for i in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{i + 1}"))
    with open(path, "rb") as src, open(path.with_name(f"{path.name}.1"), "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.truncate(path, 0)
    return True


class Supervisor:
    """Starts and watches the components of :func:`components` (see the module docstring)."""

    def __init__(self, config: LockgateConfig, config_path: str, out: IO = sys.stdout, err: IO = sys.stderr):
        self.config = config
        self.comps = components(config, config_path)
        self.data_path = [c for c in self.comps if c.name != "controller"]
        self.controller = next(c for c in self.comps if c.name == "controller")
        self.stop_event = threading.Event()
        self.out = out
        self.err = err

    def say(self, msg: str) -> None:
        """A status line (stdout)."""
        print(f"lockgate up: {msg}", file=self.out, flush=True)

    def warn(self, msg: str) -> None:
        """A failure the operator should see (stderr)."""
        print(f"lockgate up: {msg}", file=self.err, flush=True)

    def _start_data_path(self, comp: Component) -> None:
        """First start of a data-path component, awaited; raises RuntimeError if it is not ready in time."""
        self._launch(comp)
        while comp.state == "starting":
            if self.stop_event.is_set():
                raise RuntimeError(f"stopped while starting {comp.name}")
            time.sleep(0.05)
            self._tick(comp, fatal=True)

    def _launch(self, comp: Component) -> None:
        comp.start()
        comp.state = "starting"
        comp.start_deadline = time.monotonic() + START_TIMEOUT_S

    def _failed(self, comp: Component, why: str, fatal: bool, detail: str = "") -> None:
        """Count a failed attempt; raise RuntimeError if ``fatal``, else say so (stderr) and schedule a retry."""
        comp.stop()
        comp.failures += 1
        comp.state = "down"
        if fatal:
            raise RuntimeError(why + (f":\n{detail}" if detail else ""))
        comp.next_attempt = time.monotonic() + comp.retry_delay()
        consequence = {"controller": "traffic keeps flowing through Envoy without it",
                       "xds": "Envoy keeps its last configuration meanwhile",
                       "extproc": "Envoy skips it meanwhile (responses are not observed)",
                       "envoy": "no traffic is served until it is back"}[comp.name.partition("-")[0]]
        self.warn(f"{why}; {consequence}; retrying in {comp.retry_delay():.1f} s"
                  + (f"\n  {detail}" if detail else ""))

    def _tick(self, comp: Component, fatal: bool = False) -> None:
        """Advance one component's state: notice readiness, death, a start timeout; (re)start when due."""
        now = time.monotonic()
        if comp.state == "starting":
            if comp.ready():
                comp.state = "ready"
                comp.failures = 0
                self.say(f"{comp.name} ready (pid {comp.proc.pid}, log {comp.log_path})")
            elif not comp.alive():
                tail = comp.log_tail() if fatal else (comp.log_tail().strip().splitlines() or [""])[-1]
                self._failed(comp, f"{comp.name} could not start: exited with status {comp.proc.returncode} "
                                   f"(log {comp.log_path})", fatal, tail)
            elif now > comp.start_deadline:
                self._failed(comp, f"{comp.name} not ready after {START_TIMEOUT_S:.0f} s; see {comp.log_path}", fatal)
        elif comp.state == "ready":
            if not comp.alive():
                comp.restarts += 1
                self._failed(comp, f"{comp.name} exited with status {comp.proc.returncode} "
                                   f"(restart #{comp.restarts}, log {comp.log_path})", fatal)
        elif now >= comp.next_attempt:
            self._launch(comp)

    def _rotate_logs(self) -> None:
        for comp in self.comps:
            try:
                if rotate_if_large(comp.log_path):
                    self.say(f"{comp.name}: log rotated ({comp.log_path}.1 … .{LOG_KEEP} kept)")
            except OSError as exc:  # a full disk must not stop supervising
                self.warn(f"{comp.name}: cannot rotate {comp.log_path}: {exc}")

    def run(self) -> int:
        """Start the data path (awaited), then the controller, then supervise until SIGINT/SIGTERM.

        Returns 0 after a signal, 1 if the data path could not start.
        """
        def on_signal(signum, _frame):
            self.stop_event.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for comp in self.data_path:
                self._start_data_path(comp)
            self.say(f"data path up: Envoy takes traffic on http://{self.config.listener} with "
                     f"{sizing(self.config)}; starting the controller")
            self._launch(self.controller)
            while self.controller.state == "starting" and not self.stop_event.wait(0.05):
                for comp in self.comps:
                    self._tick(comp)
            note = "" if self.controller.state == "ready" else " (the controller is not running yet: retrying)"
            self.say(f"serving models on http://{self.config.listener} "
                     f"({', '.join(m.name for m in self.config.models)}){note}; Ctrl-C stops")
            warn_if_insecure(self.config, "lockgate up", out=self.out)  # auth.insecure with off-loopback binds
            while not self.stop_event.wait(0.5):
                self._rotate_logs()
                for comp in self.comps:
                    self._tick(comp)
            return 0
        except RuntimeError as exc:
            self.warn(str(exc))
            return 1
        finally:
            stop_order = sorted(self.comps, key=lambda c: ("envoy", "extproc", "xds", "controller").index(
                c.name.partition("-")[0]))
            for comp in stop_order:
                comp.stop()
            self.say("stopped " + ", ".join(c.name for c in stop_order))
            for s, h in old.items():
                signal.signal(s, h)
