"""``xds_servers:`` — every xDS server of a highly available control plane (docs/operations.md).

Each entry is one ``lockgate xds`` process (usually one per control-plane machine), all on one
weight store (the ``database:``, or one shared SQLite state directory on a single host)::

    xds_servers:
      - {xds: "10.0.0.1:18000", control: "10.0.0.1:18010"}
      - {xds: "10.0.0.2:18000", control: "10.0.0.2:18010"}

Envoy's bootstrap lists every ``xds`` address as an endpoint of its one ADS cluster (it reconnects to
another when its server dies); the controller and the CLI call the ``control`` APIs in order, moving to
the next when one is unreachable. Absent: the one server of this host (``xds`` and ``control``).
``xds`` and ``control`` (the top-level sections) stay what *this* host's ``lockgate xds`` listens on.

``controllers:`` — the observations API (``controller.address``) of every controller, in order of
preference: each ext_proc sends to the first that takes its batches and moves to the next when it is
unreachable (and stays there). Absent: ``controller.address`` only::

    controllers: ["10.0.0.1:18020", "10.0.0.2:18020"]
"""

from __future__ import annotations

from dataclasses import dataclass

from lockgate.config.common import Address, _endpoint, _host_port
from lockgate.yamlconf import Fields

MAX_XDS_SERVERS = 16


@dataclass(frozen=True)
class XdsServer:
    """One xDS server: its ADS address (Envoys) and its control API (controller, CLI)."""

    xds: Address
    control: Address


def _xds_servers(f: Fields) -> tuple[XdsServer, ...]:
    items = list(f.list("xds_servers"))
    if len(items) > MAX_XDS_SERVERS:
        f.errors.add(f.path + ("xds_servers",), f"at most {MAX_XDS_SERVERS} servers, got {len(items)}")
        return ()
    out: list[XdsServer] = []
    seen: dict[tuple[str, Address], object] = {}
    for path, item in items:
        sub = Fields(item, path, f.errors)
        got: dict[str, Address] = {}
        for key in ("xds", "control"):
            addr = _host_port(sub, key, _MISSING)
            if addr is _MISSING:
                if key not in sub.data:
                    f.errors.add(path + (key,), "is required ('host:port' to connect to)")
                continue
            if addr.host in ("0.0.0.0", "::", ""):
                f.errors.add(path + (key,), f"must be an address to connect to, got the wildcard {addr.host}")
                continue
            if (key, addr) in seen:
                f.errors.add(path + (key,), f"{addr} is also xds_servers[{seen[(key, addr)]}]")
            seen[(key, addr)] = path[-1]
            got[key] = addr
        sub.finish()
        if len(got) == 2:
            out.append(XdsServer(got["xds"], got["control"]))
    return tuple(out)


_MISSING = Address("", 0)


def _controllers(f: Fields) -> tuple[Address, ...]:
    out: list[Address] = []
    for path, item in f.list("controllers"):
        addr = _endpoint(item, path, f.errors)
        if addr is None:
            continue
        if addr.host in ("0.0.0.0", "::", ""):
            f.errors.add(path, f"must be an address to connect to, got the wildcard {addr.host}")
        elif addr in out:
            f.errors.add(path, f"{addr} is listed twice")
        else:
            out.append(addr)
    return tuple(out)
