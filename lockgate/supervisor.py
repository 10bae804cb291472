"""``lockgate up``: run the controller, the xDS server, the ext_proc server and Envoy until told to stop.

Each component is a child process with its output in ``<state_dir>/logs/<name>.log``. Start order is
controller (observation store) → xDS (weights loaded from SQLite) → ext_proc → Envoy, each awaited
until ready. A component that
dies is restarted after a short back-off (traffic keeps flowing meanwhile: Envoy keeps its config
without xDS and skips a dead ext_proc). SIGINT/SIGTERM stops all three: Envoy first, then the rest.
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


@dataclass
class Component:
    """One child process. Ready when ``ready_url`` answers 200, or (no URL) when its log prints
    a line starting ``ready `` after this start."""

    name: str
    argv: list[str]
    log_path: Path
    ready_url: str | None = None
    proc: subprocess.Popen | None = None
    log: IO | None = None
    restarts: int = 0
    log_offset: int = field(default=0)

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
                return b"ready " in f.read()
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

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


def components(config: LockgateConfig, config_path: str) -> list[Component]:
    """xDS, ext_proc and Envoy, in start order."""
    logs = config.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bootstrap = config.state_dir / "envoy-bootstrap.yaml"
    bootstrap.write_text(render_bootstrap(config))
    py = [sys.executable, "-m", "lockgate", "-c", config_path]
    return [
        Component("controller", py + ["controller"], logs / "controller.log"),
        Component("xds", py + ["xds"], logs / "xds.log"),
        *(Component(f"extproc-{i}" if config.extproc_processes > 1 else "extproc", py + ["extproc", "--index", str(i)],
                    logs / (f"extproc-{i}.log" if config.extproc_processes > 1 else "extproc.log"))
          for i in range(config.extproc_processes)),
        Component("envoy", envoy_command(bootstrap), logs / "envoy.log", ready_url=f"http://{config.admin}/ready"),
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
    def __init__(self, config: LockgateConfig, config_path: str, out=sys.stdout):
        self.config = config
        self.comps = components(config, config_path)
        self.stop_event = threading.Event()
        self.out = out

    def say(self, msg: str) -> None:
        print(f"lockgate up: {msg}", file=self.out, flush=True)

    def _start(self, comp: Component, timeout: float = 30.0) -> None:
        comp.start()
        deadline = time.monotonic() + timeout
        while not comp.ready():
            if not comp.alive():
                raise RuntimeError(f"{comp.name} exited with status {comp.proc.returncode}; see {comp.log_path}:\n"
                                   + comp.log_path.read_text(errors="replace")[-2000:])
            if time.monotonic() > deadline or self.stop_event.is_set():
                raise RuntimeError(f"{comp.name} not ready after {timeout:.0f} s; see {comp.log_path}")
            time.sleep(0.05)
        self.say(f"{comp.name} ready (pid {comp.proc.pid}, log {comp.log_path})")

    def run(self) -> int:
        def on_signal(signum, _frame):
            self.stop_event.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for comp in self.comps:
                self._start(comp)
            self.say(f"serving models on http://{self.config.listener} "
                     f"({', '.join(m.name for m in self.config.models)}); Ctrl-C stops")
            warn_if_insecure(self.config, "lockgate up", out=self.out)  # auth.insecure with off-loopback binds
            while not self.stop_event.wait(0.5):
                for comp in self.comps:
                    try:
                        if rotate_if_large(comp.log_path):
                            self.say(f"{comp.name}: log rotated ({comp.log_path}.1 … .{LOG_KEEP} kept)")
                    except OSError as exc:  # a full disk must not stop supervising
                        self.say(f"{comp.name}: cannot rotate {comp.log_path}: {exc}")
                    if not comp.alive():
                        comp.restarts += 1
                        self.say(f"{comp.name} exited with status {comp.proc.returncode}; restarting "
                                 f"(restart #{comp.restarts}, log {comp.log_path})")
                        comp.stop()
                        time.sleep(min(5.0, 0.5 * comp.restarts))
                        try:
                            self._start(comp)
                        except RuntimeError as exc:
                            self.say(str(exc))
            return 0
        except RuntimeError as exc:
            self.say(str(exc))
            return 1
        finally:
            for comp in reversed(self.comps):
                comp.stop()
            self.say("stopped " + ", ".join(c.name for c in reversed(self.comps)))
            for s, h in old.items():
                signal.signal(s, h)
