"""A real PostgreSQL for the tests: one server per test session, a fresh database per test.

Import the fixtures into a test module (``from tests.pg import pg_server, pg_url, where``):

* ``pg_server`` (session): a PostgreSQL started from the Debian binaries (``LOCKGATE_PG_BIN``,
  default the newest ``/usr/lib/postgresql/<version>/bin``) with its data under a fresh ``/tmp/lockgate-pg-*``,
  listening on 127.0.0.1 on a free port; as root it runs as the ``postgres`` user (PostgreSQL
  refuses root). The test is skipped, saying why, when the binaries are missing.
* ``pg_url``: ``postgresql://lockgate@127.0.0.1:<port>/<fresh database>`` for one test.
* ``pg_shared_url`` (session): one database for tests that keep apart by schema names of their own.
* ``where``: parametrised over both engines — ``where("rollouts.db")`` is the store's SQLite file in
  the test's tmp_path, or its schema in the test's fresh PostgreSQL database.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from lockgate.database import locate

def _pg_bin() -> Path:
    """``LOCKGATE_PG_BIN``, else the newest Debian ``/usr/lib/postgresql/<version>/bin`` with an initdb."""
    if os.environ.get("LOCKGATE_PG_BIN"):
        return Path(os.environ["LOCKGATE_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
USER = "lockgate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One PostgreSQL server in a throw-away directory (``fsync=off`` unless ``durable``: tests)."""

    def __init__(self, *, durable: bool = False):
        missing = [b for b in ("initdb", "postgres") if not (PG_BIN / b).exists()]
        if missing:
            raise FileNotFoundError(f"PostgreSQL server binaries not found in {PG_BIN} ({', '.join(missing)}): "
                                    f"apt-get install postgresql, or set LOCKGATE_PG_BIN")
        self.base = Path(tempfile.mkdtemp(prefix="lockgate-pg-"))
        self.data = self.base / "data"
        self.sockets = self.base / "sockets"
        self.port = _free_port()
        self.durable = durable
        self._as: list[str] = []
        #: the server is a direct child that gets SIGINT (fast shutdown) when this process dies: a test run
        #: killed by a timeout leaves no server behind (only its directory)
        self._server_prefix = ["setpriv", "--pdeathsig", "INT"]
        self.proc: subprocess.Popen | None = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            owner = pwd.getpwnam("postgres")
            self.base.chmod(0o755)
            for d in (self.data, self.sockets):
                d.mkdir()
                os.chown(d, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
            self._server_prefix += ["--reuid", "postgres", "--regid", "postgres", "--init-groups"]
        else:
            self.sockets.mkdir()
        self._databases = itertools.count(1)

    def _run(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr or proc.stdout}")

    def start(self) -> "PgServer":
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                  "--no-instructions")
        args = [str(PG_BIN / "postgres"), "-D", str(self.data), "-c", "listen_addresses=127.0.0.1", "-p",
                str(self.port), "-k", str(self.sockets), "-c", "max_connections=200"]
        if not self.durable:
            args += ["-c", "fsync=off", "-c", "full_page_writes=off"]
        with open(self.base / "server.log", "ab") as log:
            self.proc = subprocess.Popen([*self._server_prefix, "--", *args], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self._wait_ready(60.0)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.base / "server.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"PostgreSQL did not start ({self.proc.returncode}):\n{log}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)  # fast shutdown
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._databases)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" STRATEGY = FILE_COPY')  # faster than WAL_LOG for tiny ones
        return self.url(name)


@pytest.fixture(scope="session")
def pg_server():
    try:
        server = PgServer()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server) -> str:
    return pg_server.create_database()


@pytest.fixture(scope="session")
def pg_shared_url(pg_server) -> str:
    return pg_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path):
    """``where(filename)``: a store's location on the engine this test run is parametrised with."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    return lambda filename: locate(tmp_path, filename, url)
