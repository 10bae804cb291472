"""High-availability configuration: ``xds_servers`` and ``controllers`` (validation with file:line), Envoy's
bootstrap with one ADS endpoint per xDS server (accepted by the real Envoy's ``--mode validate``), and the
control-API clients moving on to the next server when one is unreachable (real gRPC servers)."""

from __future__ import annotations

import asyncio
import subprocess

import grpc
import pytest

from lockgate.config import ConfigError, config_from_text
from lockgate.control_client import AsyncControlClient, ControlClient
from lockgate.grpc_auth import add_port
from lockgate.proto.v1 import control_pb2_grpc
from lockgate.xds.control import ControlServer, WeightService
from lockgate.xds.store import WeightStore
from tests.harness import envoy_available, free_ports

MODELS = 'models: [{name: chat, stable: v1, versions: {v1: {endpoints: ["127.0.0.1:1"]}, v2: {endpoints: ["127.0.0.1:2"]}}}]'


def config(tmp_path, extra: str):
    return config_from_text(f"state_dir: {tmp_path / 'state'}\n{extra}\n{MODELS}\n", "lockgate.yaml", tmp_path)


def test_xds_servers_and_controllers_are_validated_with_their_line(tmp_path):
    with pytest.raises(ConfigError) as exc:
        config(tmp_path, """xds_servers:
  - {xds: "0.0.0.0:18000", control: "127.0.0.1:18010"}
  - {xds: "127.0.0.1:18100"}
  - {xds: "127.0.0.1:18100", control: "127.0.0.1:18110", port: 3}
controllers: ["127.0.0.1:18020", "127.0.0.1:18020", "nope"]""")
    text = str(exc.value)
    for want in ("lockgate.yaml:3:11: xds_servers[0].xds: must be an address to connect to, got the wildcard 0.0.0.0",
                 "xds_servers[1].control: is required", "xds_servers[2].xds: 127.0.0.1:18100 is also xds_servers[1]",
                 "xds_servers[2].port: unknown field", "controllers[1]: 127.0.0.1:18020 is listed twice",
                 "controllers[2]: must be 'host:port'"):
        assert want in text, text
    one = config(tmp_path, "")
    assert [str(a) for a in one.control_addresses()] == ["127.0.0.1:18010"]
    assert [str(a) for a in one.collector_addresses()] == ["127.0.0.1:18020"]
    two = config(tmp_path, """xds_servers:
  - {xds: "10.0.0.1:18000", control: "10.0.0.1:18010"}
  - {xds: "10.0.0.2:18000", control: "10.0.0.2:18010"}
controllers: ["10.0.0.1:18020", "10.0.0.2:18020"]
auth: {insecure: true}""")
    assert [str(a) for a in two.control_addresses()] == ["10.0.0.1:18010", "10.0.0.2:18010"]
    assert [str(a) for a in two.collector_addresses()] == ["10.0.0.1:18020", "10.0.0.2:18020"]


@pytest.mark.skipif(not envoy_available(), reason="no envoy binary")
def test_the_bootstrap_lists_every_xds_server_and_envoy_accepts_it(tmp_path):
    from lockgate.envoy_proc import envoy_binary, render_bootstrap

    one = render_bootstrap(config(tmp_path, ""))
    assert one.count("port_value: 18000") == 1 and "health_checks" not in one and "retry_back_off" not in one
    two_cfg = config(tmp_path, """xds_servers:
  - {xds: "127.0.0.1:18000", control: "127.0.0.1:18010"}
  - {xds: "127.0.0.2:18100", control: "127.0.0.2:18110"}""")
    two = render_bootstrap(two_cfg)
    assert "address: 127.0.0.1, port_value: 18000" in two and "address: 127.0.0.2, port_value: 18100" in two
    assert "tcp_health_check" in two and "retry_back_off" in two
    for name, text in (("one", one), ("two", two)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, (name, r.stdout[-2000:], r.stderr[-2000:])


def test_the_control_clients_move_on_to_the_next_server(tmp_path):
    """The first address has nobody listening: both clients answer from the second, and stay with it."""
    dead, live = free_ports(2)

    async def run():
        cfg = config(tmp_path, "")
        store = WeightStore(cfg.db_path)
        server = grpc.aio.server()
        control_pb2_grpc.add_WeightControlServicer_to_server(ControlServer(WeightService(cfg, store)), server)
        add_port(server, f"127.0.0.1:{live}", cfg.auth)
        await server.start()
        try:
            client = AsyncControlClient([f"127.0.0.1:{dead}", f"127.0.0.1:{live}"])
            resp = await client.set_weight("chat", "v2", 500, actor="t", reason="t", timeout_s=0.1, deadline_s=5)
            assert resp.model.weight_bp == 500 and client.address == f"127.0.0.1:{live}"
            assert (await client.get_weights("chat")).models[0].weight_bp == 500
            await client.close()
            # every server unreachable: the UNAVAILABLE of the last one, within the deadline
            nobody = AsyncControlClient([f"127.0.0.1:{dead}", f"127.0.0.1:{dead}"])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await nobody.rollback("chat", actor="t", reason="t", deadline_s=0.5)
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            await nobody.close()
            sync = await asyncio.get_running_loop().run_in_executor(
                None, lambda: ControlClient([f"127.0.0.1:{dead}", f"127.0.0.1:{live}"]))
            got = await asyncio.get_running_loop().run_in_executor(None, sync.get_weights, "chat")
            assert got.models[0].weight_bp == 500 and sync.address == f"127.0.0.1:{live}"
            sync.close()
        finally:
            await server.stop(0)
            store.close()

    asyncio.run(run())
