# lockgate — two commands on a fresh machine: `make demo` and `make test`.
# `make demo` installs only what the demo runs (lockgate's own dependencies, pyproject's
# `dependencies`); `make test` adds the test extras: pytest & co, mlflow (a real registry server
# for the registry test, ~0.8 GB with pyarrow, pandas and scikit-learn) and psycopg (PostgreSQL backend).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.installed-test-stamp
PROTOS := $(wildcard protos/lockgate/proto/v1/*.proto)
PB2    := $(patsubst protos/%.proto,%_pb2.py,$(PROTOS))
PYTEST_ARGS ?=

.PHONY: install install-test demo test unit integration bench clean

install: $(STAMP) $(PB2)

install-test: install $(TEST_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,mlflow,postgresql]'
	# xds-protos and opentelemetry-proto both ship opentelemetry/proto/...; whichever installs last owns the
	# files, and mlflow needs opentelemetry-proto's (TracesData). Envoy's protos import fine from either.
	v=$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))' 2>/dev/null) && \
	  $(PY) -m pip install -q --force-reinstall --no-deps "opentelemetry-proto==$$v" || true
	touch $@

# lockgate's own protos, compiled by grpcio-tools at install (generated code is never edited).
lockgate/proto/v1/%_pb2.py: protos/lockgate/proto/v1/%.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $<

demo: install
	$(PY) -m lockgate.demo $(DEMO_ARGS)

test: install-test
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

unit: install-test
	$(PY) -m pytest -q -rs tests/unit $(PYTEST_ARGS)

integration: install-test
	$(PY) -m pytest -q -rs tests/integration $(PYTEST_ARGS)

bench: install-test
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) lockgate/proto/v1/*_pb2*.py lockgate/proto/v1/*_pb2*.pyi .pytest_cache
