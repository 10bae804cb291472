"""Authentication with the real Envoy: a control plane nobody else can drive.

Real processes on loopback (lockgate xds + extproc [+ controller], a real Envoy, echo upstreams),
configured with ``auth.tokens``: Envoy authenticates its ADS stream with lockgate's own token (from
a 0600 file, via the bootstrap's credential_injector), a raw ADS client without a token gets nothing,
SetWeight without a token moves nothing, the deployment log names the authenticated client, and
neither the QA token nor lockgate's token is in Envoy's /config_dump. The second test runs the
same fleet over mTLS (ADS, control API, observations API) with certificates made by the test.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time

import grpc
import pytest


from lockgate.auth import hash_token
from lockgate.proto.v1 import control_pb2, control_pb2_grpc
from tests.harness import Fleet, _env, raw_ads, requires_envoy, start_echo
from tests.tlscerts import make_pki

pytestmark = [requires_envoy, pytest.mark.envoy]

OWN = "lockgate-own-token-9f2c4e1a7b"
CI = "ci-deployer-token-5d8e3b0c6a"
QA = "qa-secret-token-0123456789-xyz"


@pytest.fixture
def upstreams(tmp_path):
    procs, ports = {}, {}
    for name in ("chat-v1", "chat-v2", "chat-v3"):
        procs[name], ports[name] = start_echo(name, tmp_path)
    yield ports
    for p in procs.values():
        p.stop()


def models(ports):
    return [{"name": "chat", "match": {"path_prefix": "/v1/chat"}, "stable": "v1",
             "versions": {v: {"endpoints": [f"127.0.0.1:{ports['chat-' + v]}"]} for v in ("v1", "v2", "v3")}}]


def auth_section(tmp_path, tls=None):
    (tmp_path / "lockgate.token").write_text(OWN + "\n")
    os.chmod(tmp_path / "lockgate.token", 0o600)
    section = {"tokens": [{"name": "lockgate", "sha256": hash_token(OWN)},
                          {"name": "ci-deployer", "sha256": hash_token(CI)}],
               "token_file": str(tmp_path / "lockgate.token")}
    if tls:
        section["tls"] = tls
    return section


def weight_changes(fleet: Fleet) -> list[dict]:
    db = sqlite3.connect(f"file:{fleet.tmp / 'state' / 'lockgate.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT actor, reason, to_bp FROM weight_changes ORDER BY id").fetchall()
    finally:
        db.close()
    return [{"actor": a, "reason": r, "to_bp": bp} for a, r, bp in rows]


def set_weight_raw(port: int, metadata=(), actor="mallory", bp=5000):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return control_pb2_grpc.WeightControlStub(ch).SetWeight(control_pb2.SetWeightRequest(
            model="chat", version="v2", weight_bp=bp, actor=actor, reason="raw", timeout_s=5), timeout=10,
            metadata=metadata)


def test_only_authenticated_clients_drive_the_control_plane(tmp_path, upstreams):
    fleet = Fleet(tmp_path, models(upstreams), extra={"auth": auth_section(tmp_path),
                                                      "qa_override": {"token": QA}})
    with fleet:
        # Envoy authenticated with lockgate's token (from the 0600 file) and got its routes: traffic flows.
        c = fleet.client()
        r = c.request("/v1/chat/completions", {"x-user-id": "u1"})
        assert r.status == 200 and r.version == "chat-v1"
        assert "authenticated as client lockgate" in (tmp_path / "xds.log").read_text()

        # A fake ADS client without a token (or with a guessed one) is closed before any resource.
        for metadata in ((), (("authorization", "Bearer guessed"),)):
            code, got = raw_ads(fleet.ports["xds"], metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED and got == []

        # SetWeight without a token: refused, nothing moves, nothing is logged.
        before = fleet.route_weights(0)
        for metadata in ((), (("authorization", "Bearer guessed"),)):
            with pytest.raises(grpc.RpcError) as err:
                set_weight_raw(fleet.ports["control"], metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert fleet.route_weights(0) == before and weight_changes(fleet) == []

        # With a client's token the change is made and logged under the client's name, not the claim.
        resp = set_weight_raw(fleet.ports["control"], (("authorization", f"Bearer {CI}"),), actor="mallory")
        assert resp.all_acked and resp.model.weight_bp == 5000
        assert fleet.route_weights(0)["chat/key/0"] == [("chat.v2", 5000), ("chat.v1", 5000)]
        (change,) = weight_changes(fleet)
        assert change["actor"] == "ci-deployer" and "claimed actor: mallory" in change["reason"]

        # The CLI: auth.token_file → "lockgate"; $LOCKGATE_TOKEN wins; a wrong token is refused (exit 2).
        fleet.cli("rollback", "chat", check=True)
        assert weight_changes(fleet)[-1]["actor"] == "lockgate"
        env = {**_env(), "LOCKGATE_TOKEN": CI}
        import subprocess
        from tests.harness import PY, REPO
        out = subprocess.run([PY, "-m", "lockgate", "-c", str(fleet.config_path), "set-weight", "chat", "v2", "1"],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        assert out.returncode == 0, out.stderr
        assert weight_changes(fleet)[-1]["actor"] == "ci-deployer"
        env["LOCKGATE_TOKEN"] = "wrong-token"
        out = subprocess.run([PY, "-m", "lockgate", "-c", str(fleet.config_path), "set-weight", "chat", "v2", "50"],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        assert out.returncode == 2 and "unknown or malformed bearer token" in out.stderr, out.stderr
        assert weight_changes(fleet)[-1]["to_bp"] == 100

        # The QA override still works end to end, and a wrong token is ignored.
        qa = {"x-user-id": "qa-1", "x-lockgate-version": "v3"}
        assert c.request("/v1/chat/completions", {**qa, "x-lockgate-qa-token": QA}).version == "chat-v3"
        r = c.request("/v1/chat/completions", {**qa, "x-lockgate-qa-token": QA[:-1] + "?"})
        assert r.status == 200 and r.version in ("chat-v1", "chat-v2")
        seen = json.loads(c.request("/v1/chat/completions", {**qa, "x-lockgate-qa-token": QA}).body)["headers"]
        assert "x-lockgate-qa-token" not in seen and "x-lockgate-version" not in seen

        # Neither the QA token nor lockgate's token is anywhere in Envoy's admin config dump.
        dump = fleet.admin(0, "/config_dump?include_eds")
        assert QA not in dump and OWN not in dump and hash_token(QA) not in dump
        assert '"[redacted]"' in dump  # the ADS credential's secret (and its file name)
        assert "lockgate.qa" in dump  # routes match the ext_proc's metadata, not a header value

        # ext_proc down: QA requests get 503 (never an unchecked version), other traffic flows.
        fleet.procs["extproc"].stop()
        time.sleep(0.3)
        assert c.request("/v1/chat/completions", {**qa, "x-lockgate-qa-token": QA}).status == 503
        r = c.request("/v1/chat/completions", {"x-user-id": "u1"})
        assert r.status == 200 and r.version in ("chat-v1", "chat-v2")
        c.close()


def test_mtls_ads_control_and_observations(tmp_path, upstreams):
    pki = make_pki(tmp_path / "pki")
    tls = {"cert": str(pki.cert), "key": str(pki.key), "client_ca": str(pki.ca)}
    fleet = Fleet(tmp_path, models(upstreams), with_controller=True,
                  extra={"auth": auth_section(tmp_path, tls)})
    with fleet:  # Envoy's ADS stream over mTLS (+ token): routes arrive, traffic flows
        c = fleet.client()
        for i in range(20):
            assert c.request("/v1/chat/completions", {"x-user-id": f"u{i}"}).status == 200
        # ext_proc → controller observations API over mTLS with lockgate's token
        assert len(fleet.wait_observations(20)) >= 20
        # CLI → control API over mTLS (auth.tls and auth.token_file from the config)
        out = fleet.set_weight("chat", "v2", 10)
        assert out["allAcked"] and out["model"]["weightBp"] == 1000
        assert weight_changes(fleet)[-1]["actor"] == "lockgate"
        # plaintext, or TLS without a client certificate: refused even with a valid token
        with pytest.raises(grpc.RpcError):
            set_weight_raw(fleet.ports["control"], (("authorization", f"Bearer {CI}"),))
        with grpc.secure_channel(f"127.0.0.1:{fleet.ports['control']}",
                                 grpc.ssl_channel_credentials(pki.ca.read_bytes())) as ch:
            with pytest.raises(grpc.RpcError) as err:
                control_pb2_grpc.WeightControlStub(ch).GetWeights(
                    control_pb2.GetWeightsRequest(), timeout=5, metadata=(("authorization", f"Bearer {CI}"),))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert fleet.route_weights(0)["chat/key/0"] == [("chat.v2", 1000), ("chat.v1", 9000)]
        dump = fleet.admin(0, "/config_dump")
        assert OWN not in dump and pki.key.read_text() not in dump
        c.close()
