"""The stores' own unit tests, run a second time with every store in a real PostgreSQL.

Each test below is imported from its module unchanged; an autouse fixture sends every store the test
opens by file path (``tmp_path / "rollouts.db"``) to a schema of its own in one PostgreSQL database
(named after the test and the path, so two paths stay two stores and no test sees another's rows).
Left out: tests about the SQLite file itself (its mode) and tests that run the CLI in a subprocess
(the redirect does not reach it).
"""

from __future__ import annotations

import itertools
import zlib
from pathlib import Path

import pytest

import lockgate.controller.decide.rollouts
import lockgate.controller.evaluate.store
import lockgate.controller.ingest.observations
import lockgate.controller.ingest.samples
import lockgate.controller.tell.history
import lockgate.controller.tell.outbox
import lockgate.database
import lockgate.xds.store
from lockgate.database import Postgres
from tests.pg import pg_server, pg_shared_url  # noqa: F401 (fixtures)

STORE_MODULES = (lockgate.controller.decide.rollouts, lockgate.controller.evaluate.store,
                 lockgate.controller.ingest.observations, lockgate.controller.ingest.samples,
                 lockgate.controller.tell.history, lockgate.controller.tell.outbox, lockgate.xds.store)

#: test module → tests left out: about the SQLite file (its mode), or running the CLI in a subprocess
NOT_REDIRECTED = {
    "test_small_fixes": {"test_evaluation_store_is_private_also_when_it_existed"},
    "test_body_samples": {"test_sample_store_bounds_per_model_and_retention"},
    "test_export_columnar": {"test_export_formats_and_analyze_reads_either"},
}
TEST_MODULES = ("test_observation_store", "test_accumulator", "test_alerts", "test_body_samples", "test_evaluators",
                "test_export_columnar", "test_history", "test_history_diagnose", "test_rollout_events",
                "test_registry", "test_small_fixes")


def _import_tests() -> None:
    import importlib

    for name in TEST_MODULES:
        module = importlib.import_module(f"tests.unit.{name}")
        skip = NOT_REDIRECTED.get(name, set())
        for attr, value in vars(module).items():
            if attr.startswith("test_") and callable(value) and attr not in skip:
                globals()[f"{attr}__{name}"] = value
            elif getattr(value, "_pytestfixturefunction", None) is not None or (
                    callable(value) and hasattr(value, "_fixture_function_marker")):
                globals().setdefault(attr, value)


_import_tests()


_TESTS = itertools.count(1)


@pytest.fixture(autouse=True)
def stores_in_postgresql(pg_shared_url, monkeypatch):  # noqa: F811
    """Every store opened by file path lives in a schema of its own (this test's) in PostgreSQL."""
    test = next(_TESTS)

    def to_pg(where):
        if isinstance(where, (str, Path)):
            where = Path(where)
            crc = zlib.crc32(str(where.parent).encode())
            return Postgres(pg_shared_url, f"t{test}_{where.stem.lower()}_{crc:08x}")
        return where

    real_open_store, real_open_reader = lockgate.database.open_store, lockgate.database.open_reader

    def open_store(where, *args, **kwargs):
        return real_open_store(to_pg(where), *args, **kwargs)

    def open_reader(where, *args, **kwargs):
        return real_open_reader(to_pg(where), *args, **kwargs)

    for module in STORE_MODULES:
        for name, fn in (("open_store", open_store), ("open_reader", open_reader)):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, fn)
