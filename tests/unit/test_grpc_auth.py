"""gRPC authentication (lockgate.grpc_auth): the interceptor in front of the control API, the
observations API and ADS; the actor is the authenticated client; mTLS; off-loopback binds refused
without tokens; the Envoy bootstrap carries no token; the QA token check of the ext_proc.

Real ``grpc.aio`` servers on 127.0.0.1 with the real servicers, a real SQLite weight store, and
certificates made by the test (tests/tlscerts.py)."""

from __future__ import annotations

import asyncio
import io
import stat
import time
from pathlib import Path

import grpc
import pytest
import yaml

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.config.core.v3 import base_pb2

from lockgate.auth import hash_token
from lockgate.config import ConfigError, config_from_text
from lockgate.controller.ingest.collector import ControllerMetrics, ObservationCollectorServicer
from lockgate.controller.ingest.observations import ObservationStore
from lockgate.extproc.shipper import ObservationShipper
from lockgate.grpc_auth import (NoTokenError, add_port, aio_channel, server_interceptors, sync_channel,
                                warn_if_insecure)
from lockgate.proto.v1 import control_pb2, control_pb2_grpc
from lockgate.proto.v1 import observations_pb2 as obs_pb2
from lockgate.proto.v1 import observations_pb2_grpc as obs_grpc
from lockgate.xds.ads import AdsServer
from lockgate.xds.control import ControlServer, WeightService
from lockgate.xds.resources import CLUSTER_TYPE
from lockgate.xds.store import WeightStore
from tests.harness import raw_ads
from tests.tlscerts import make_pki

OWN = "lockgate-own-token-0123456789"
CI = "ci-deployer-token-0123456789"
MODELS = """models: [{name: chat, stable: v1, versions: {v1: {endpoints: ["127.0.0.1:1"]},
                                                      v2: {endpoints: ["127.0.0.1:2"]}}}]"""


def make_config(tmp: Path, auth: bool = True, tls: dict | None = None, extra: str = ""):
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "own.token").write_text(OWN + "\n")
    auth_yaml = ""
    if auth or tls:
        section = {"tokens": [{"name": "lockgate", "sha256": hash_token(OWN)},
                              {"name": "ci-deployer", "sha256": hash_token(CI)}] if auth else [],
                   "token_file": str(tmp / "own.token")}
        if tls:
            section["tls"] = tls
        auth_yaml = yaml.safe_dump({"auth": section})
    return config_from_text(f"state_dir: {tmp / 'state'}\n{MODELS}\n{auth_yaml}{extra}", "lockgate.yaml", tmp)


class Control:
    """The control API (real WeightService + ControlServer) served as ``lockgate xds`` serves it."""

    def __init__(self, config):
        self.config = config
        self.store = WeightStore(config.db_path)
        self.service = WeightService(config, self.store)

    async def __aenter__(self):
        self.server = grpc.aio.server(interceptors=server_interceptors(self.config.auth, "control API"))
        control_pb2_grpc.add_WeightControlServicer_to_server(ControlServer(self.service), self.server)
        self.port = add_port(self.server, "127.0.0.1:0", self.config.auth)
        await self.server.start()
        return self

    async def __aexit__(self, *exc):
        await self.server.stop(0)
        self.store.close()

    def weight(self) -> int:
        return self.service.weights["chat"].weight_bp


def _set(model="chat", version="v2", bp=5000, actor="mallory"):
    return control_pb2.SetWeightRequest(model=model, version=version, weight_bp=bp, actor=actor, reason="test",
                                        timeout_s=0.1)


def test_control_api_refuses_missing_and_wrong_tokens_and_records_the_client_not_the_claim(tmp_path):
    async def run():
        async with Control(make_config(tmp_path)) as ctl:
            target = f"127.0.0.1:{ctl.port}"
            async with grpc.aio.insecure_channel(target) as ch:  # no token at all
                stub = control_pb2_grpc.WeightControlStub(ch)
                for call, request in ((stub.SetWeight, _set()), (stub.Rollback, control_pb2.RollbackRequest(
                        model="chat", actor="ops")), (stub.Drill, control_pb2.DrillRequest(model="chat")),
                        (stub.GetWeights, control_pb2.GetWeightsRequest())):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(request)
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "authorization" in err.value.details() and "auth.tokens" in err.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as err:  # a wrong token, and a token without "Bearer"
                    await stub.SetWeight(_set(), metadata=(("authorization", "Bearer not-a-known-token"),))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown" in err.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.SetWeight(_set(), metadata=(("authorization", CI),))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert ctl.weight() == 0 and ctl.store.changes() == []  # nothing moved, nothing logged
            # The right token: accepted; the log names the client, not the actor the request claims.
            async with aio_channel(target, ctl.config.auth, CI) as ch:
                resp = await control_pb2_grpc.WeightControlStub(ch).SetWeight(_set(actor="mallory"))
                assert resp.model.weight_bp == 5000
                await control_pb2_grpc.WeightControlStub(ch).Rollback(
                    control_pb2.RollbackRequest(model="chat", actor="ci-deployer", reason="done", timeout_s=0.1))
            rollback, change = ctl.store.changes()
            assert change["actor"] == "ci-deployer" and change["to_bp"] == 5000
            assert "claimed actor: mallory" in change["reason"]
            assert rollback["actor"] == "ci-deployer" and rollback["reason"] == "done"  # claim == name: no note
            async with aio_channel(target, ctl.config.auth, OWN) as ch:
                await control_pb2_grpc.WeightControlStub(ch).SetWeight(_set(bp=100, actor=""))
            assert ctl.store.changes()[0]["actor"] == "lockgate"

    asyncio.run(run())


def test_without_tokens_the_request_actor_is_all_there_is(tmp_path):
    async def run():
        async with Control(make_config(tmp_path, auth=False)) as ctl:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ctl.port}") as ch:
                await control_pb2_grpc.WeightControlStub(ch).SetWeight(_set(actor="cli:alice"))
            assert ctl.store.changes()[0]["actor"] == "cli:alice"

    asyncio.run(run())


def test_ads_stream_without_a_token_is_closed_before_any_response(tmp_path):
    async def run():
        cfg = make_config(tmp_path)
        store = WeightStore(cfg.db_path)
        svc = WeightService(cfg, store)
        server = grpc.aio.server(interceptors=server_interceptors(cfg.auth, "ADS"))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AdsServer(svc.cache, svc.registry), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            first = discovery_pb2.DiscoveryRequest(type_url=CLUSTER_TYPE, node=base_pb2.Node(id="fake"))
            for metadata in ((), (("authorization", "Bearer guessed-token"),)):
                code, got = await asyncio.to_thread(raw_ads, port, metadata)
                assert code == grpc.StatusCode.UNAUTHENTICATED and got == []
            assert svc.registry.streams == {}  # the servicer never saw the streams
            async with aio_channel(f"127.0.0.1:{port}", cfg.auth, OWN) as ch:
                call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources()
                await call.write(first)
                resp = await asyncio.wait_for(call.read(), 5)
                assert resp.type_url == CLUSTER_TYPE and len(resp.resources) == 2
                call.cancel()
        finally:
            await server.stop(0)
            store.close()

    asyncio.run(run())


class Collector:
    """The observations API (real ObservationCollectorServicer + store) as the controller serves it."""

    def __init__(self, config):
        self.config = config
        self.store = ObservationStore(config.observations_db_path)
        self.servicer = ObservationCollectorServicer(self.store, ControllerMetrics())

    async def __aenter__(self):
        self.server = grpc.aio.server(interceptors=server_interceptors(self.config.auth, "observations API"))
        obs_grpc.add_ObservationCollectorServicer_to_server(self.servicer, self.server)
        self.port = add_port(self.server, "127.0.0.1:0", self.config.auth)
        await self.server.start()
        return self

    async def __aexit__(self, *exc):
        await self.server.stop(0)
        self.store.close()


def _batch(n: int, prefix: str) -> obs_pb2.ObservationBatch:
    b = obs_pb2.ObservationBatch(source="test")
    for i in range(n):
        b.observations.add(request_id=f"{prefix}-{i}", model="chat", version="v1", role="baseline",
                           ts=time.time(), status_code=200)
    return b


async def _ship(collector: Collector, token: str | None, n: int, prefix: str) -> ObservationShipper:
    shipper = ObservationShipper(f"127.0.0.1:{collector.port}", 1000, 100, 0.01, auth=collector.config.auth,
                                 token=token)
    shipper.start()
    for i in range(n):
        shipper.offer(_batch(1, f"{prefix}-{i}").observations[0])
    return shipper


def test_observations_api_needs_a_token_and_the_shipper_sends_its_own(tmp_path):
    async def run():
        async with Collector(make_config(tmp_path)) as col:
            def report(metadata):
                with grpc.insecure_channel(f"127.0.0.1:{col.port}") as ch:
                    return obs_grpc.ObservationCollectorStub(ch).Report(_batch(3, "forged"), timeout=5,
                                                                         metadata=metadata)
            for metadata in ((), (("authorization", "Bearer forged"),)):
                with pytest.raises(grpc.RpcError) as err:
                    await asyncio.to_thread(report, metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            shipper = await _ship(col, OWN, 5, "real")
            deadline = time.monotonic() + 10
            while shipper.sent_total < 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await shipper.close()
            assert shipper.sent_total == 5
            ids = {r["request_id"] for r in col.store.iter_records("chat")}
            assert len(ids) == 5 and not any(i.startswith("forged") for i in ids)

    asyncio.run(run())


def test_mtls_control_and_observations_apis(tmp_path):
    pki = make_pki(tmp_path / "pki")
    tls = {"cert": str(pki.cert), "key": str(pki.key), "client_ca": str(pki.ca)}

    async def run():
        cfg = make_config(tmp_path, tls=tls)
        async with Control(cfg) as ctl, Collector(cfg) as col:
            # lockgate's own clients: TLS, their certificate, their token
            async with aio_channel(f"127.0.0.1:{ctl.port}", cfg.auth, CI) as ch:
                resp = await control_pb2_grpc.WeightControlStub(ch).SetWeight(_set(bp=2500))
                assert resp.model.weight_bp == 2500
            assert ctl.store.changes()[0]["actor"] == "ci-deployer"
            shipper = await _ship(col, OWN, 3, "tls")
            deadline = time.monotonic() + 10
            while shipper.sent_total < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await shipper.close()
            assert shipper.sent_total == 3

            def call(creds, token=CI, port=ctl.port):
                with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
                    return control_pb2_grpc.WeightControlStub(ch).GetWeights(
                        control_pb2.GetWeightsRequest(), timeout=5,
                        metadata=(("authorization", f"Bearer {token}"),) if token else None)

            ca = pki.ca.read_bytes()
            # no client certificate: the TLS handshake fails (UNAVAILABLE), whatever the token
            with pytest.raises(grpc.RpcError) as err:
                await asyncio.to_thread(call, grpc.ssl_channel_credentials(ca))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # a client certificate from another CA: refused too
            stranger = grpc.ssl_channel_credentials(ca, pki.stranger_key.read_bytes(), pki.stranger_cert.read_bytes())
            with pytest.raises(grpc.RpcError) as err:
                await asyncio.to_thread(call, stranger)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # the right certificate but no token: UNAUTHENTICATED (both are required)
            mine = grpc.ssl_channel_credentials(ca, pki.key.read_bytes(), pki.cert.read_bytes())
            with pytest.raises(grpc.RpcError) as err:
                await asyncio.to_thread(call, mine, None)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert (await asyncio.to_thread(call, mine)).models[0].weight_bp == 2500
            # plaintext to a TLS port: nothing
            with pytest.raises(grpc.RpcError):
                with grpc.insecure_channel(f"127.0.0.1:{ctl.port}") as ch:
                    control_pb2_grpc.WeightControlStub(ch).GetWeights(
                        control_pb2.GetWeightsRequest(), timeout=2, metadata=(("authorization", f"Bearer {CI}"),))
            assert ctl.weight() == 2500

    asyncio.run(run())


def test_sync_channel_sends_the_token(tmp_path):
    async def run():
        async with Control(make_config(tmp_path)) as ctl:
            def get():
                ch = sync_channel(f"127.0.0.1:{ctl.port}", ctl.config.auth, CI)
                try:
                    return control_pb2_grpc.WeightControlStub(ch).GetWeights(control_pb2.GetWeightsRequest(),
                                                                             timeout=5)
                finally:
                    ch.close()
            assert (await asyncio.to_thread(get)).models[0].model == "chat"

    asyncio.run(run())


# ---------------------------------------------------------------------------------- config validation
def _error(text: str, tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        config_from_text(text, "lockgate.yaml", tmp_path)
    return str(err.value)


@pytest.mark.parametrize("section, field", [
    ("xds: {address: 0.0.0.0}", "xds.address"),
    ("control: {address: 10.1.2.3, port: 18010}", "control.address"),
    ("extproc: {address: 0.0.0.0}", "extproc.address"),
    ("extproc_metrics: {address: '::'}", "extproc_metrics.address"),
    ("controller: {address: '0.0.0.0:18020'}", "controller.address"),
    ("controller: {http: '0.0.0.0:18021'}", "controller.http"),
])
def test_off_loopback_bind_without_tokens_is_refused_naming_field_and_line(tmp_path, section, field):
    text = f"state_dir: {tmp_path}\n{MODELS}\n{section}\n"
    msg = _error(text, tmp_path)
    assert field in msg and "off loopback" in msg and "auth.insecure" in msg
    assert msg.startswith("lockgate.yaml:4:"), msg  # the line of the section (MODELS takes lines 2-3)
    # with tokens: accepted; with auth.insecure: accepted (the processes warn at startup)
    config_from_text(text + f"auth: {{tokens: [{{name: ci, sha256: {hash_token(CI)}}}]}}\n", "lockgate.yaml",
                     tmp_path)
    cfg = config_from_text(text + "auth: {insecure: true}\n", "lockgate.yaml", tmp_path)
    out = io.StringIO()
    lines = warn_if_insecure(cfg, "test", out=out)
    assert lines and "WARNING" in out.getvalue() and field in out.getvalue()


def test_listener_may_be_public_and_admin_must_be_loopback(tmp_path):
    base = f"state_dir: {tmp_path}\n{MODELS}\n"
    cfg = config_from_text(base + "listener: {address: 0.0.0.0, port: 10000}\n", "lockgate.yaml", tmp_path)
    assert warn_if_insecure(cfg, "test", out=io.StringIO()) == []
    tokens = f"auth: {{tokens: [{{name: ci, sha256: {hash_token(CI)}}}]}}\n"
    msg = _error(base + "admin: {address: 0.0.0.0}\n" + tokens, tmp_path)  # even with tokens
    assert "admin.address" in msg and "config_dump" in msg
    cfg = config_from_text(base + "admin: {address: 0.0.0.0}\nauth: {insecure: true}\n", "lockgate.yaml", tmp_path)
    out = io.StringIO()
    warn_if_insecure(cfg, "test", out=out)
    assert "admin" in out.getvalue() and "config_dump" in out.getvalue()
    # localhost and 127.x are loopback
    config_from_text(base + "xds: {address: localhost}\ncontrol: {address: 127.0.0.2}\n", "lockgate.yaml", tmp_path)


# ---------------------------------------------------------------------------------- Envoy bootstrap
def test_bootstrap_sends_the_token_from_a_0600_file_never_in_its_text(tmp_path):
    from lockgate.envoy_proc import XDS_TOKEN_SECRET, render_bootstrap, xds_credential_path

    cfg = make_config(tmp_path)
    text = render_bootstrap(cfg)
    assert OWN not in text
    boot = yaml.safe_load(text)
    (secret,) = boot["static_resources"]["secrets"]
    path = Path(secret["generic_secret"]["secret"]["filename"])
    assert secret["name"] == XDS_TOKEN_SECRET and path == xds_credential_path(cfg)
    assert path.read_text() == f"Bearer {OWN}" and stat.S_IMODE(path.stat().st_mode) == 0o600
    xds = next(c for c in boot["static_resources"]["clusters"] if c["name"] == "lockgate_xds")
    filters = xds["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
        "http_filters"]
    assert [f["name"] for f in filters] == ["envoy.filters.http.credential_injector", "envoy.filters.http.upstream_codec"]
    assert "transport_socket" not in xds
    # auth off: no secret, no filter
    plain = yaml.safe_load(render_bootstrap(make_config(tmp_path / "plain", auth=False)))
    assert "secrets" not in plain["static_resources"]
    # tokens but no token of lockgate's own: refused, naming what to set
    cfg = make_config(tmp_path)
    (tmp_path / "own.token").write_text("")
    with pytest.raises(NoTokenError, match="token_file"):
        render_bootstrap(cfg)


def test_bootstrap_with_mtls(tmp_path):
    from lockgate.envoy_proc import render_bootstrap

    pki = make_pki(tmp_path / "pki")
    cfg = make_config(tmp_path, tls={"cert": str(pki.cert), "key": str(pki.key), "client_ca": str(pki.ca)})
    boot = yaml.safe_load(render_bootstrap(cfg))
    xds = next(c for c in boot["static_resources"]["clusters"] if c["name"] == "lockgate_xds")
    tls = xds["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["tls_certificates"][0]["certificate_chain"]["filename"] == str(pki.cert)
    assert tls["validation_context"]["trusted_ca"]["filename"] == str(pki.ca)


# ---------------------------------------------------------------------------------- QA token check
def _qa_request(headers: dict[str, str]) -> ep.HttpHeaders:
    return ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]))


def test_qa_check_sets_metadata_only_for_the_right_token(tmp_path):
    from lockgate.extproc.server import QACheck

    cfg = config_from_text(f"state_dir: {tmp_path}\n{MODELS}\nqa_override: {{token: qa-token-0123456789abcdef}}\n")
    check = QACheck(cfg.qa_override)
    ok = check.answer(_qa_request({"x-lockgate-qa-token": "qa-token-0123456789abcdef", "x-lockgate-version": "v2"}))
    common = ok.request_headers.response
    assert common.clear_route_cache and list(common.header_mutation.remove_headers) == ["x-lockgate-qa-token"]
    assert ok.dynamic_metadata.fields["lockgate.qa"].struct_value.fields["version"].string_value == "v2"
    for headers in ({"x-lockgate-qa-token": "qa-token-0123456789abcdeF", "x-lockgate-version": "v2"},
                    {"x-lockgate-qa-token": "", "x-lockgate-version": "v2"},
                    {"x-lockgate-version": "v2"}):
        bad = check.answer(_qa_request(headers))
        assert not bad.HasField("dynamic_metadata")
        assert bad.request_headers.response.clear_route_cache  # routed again, to the normal split
        assert list(bad.request_headers.response.header_mutation.remove_headers) == ["x-lockgate-qa-token"]
