"""``auth:`` — named client tokens (stored as sha256), lockgate's own token file, TLS/mTLS, ``insecure``;
parsed into :class:`lockgate.auth.AuthConfig`."""

from __future__ import annotations

import re
from pathlib import Path

from lockgate.auth import AuthConfig, ClientToken
from lockgate.config.common import NAME_RE
from lockgate.yamlconf import Fields

_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


def _file_text(f: Fields, key: str, base_dir: Path) -> str | None:
    """The stripped contents of the file named by ``key`` (relative to the config), or None + an error."""
    name = f.str(key)
    if name is None:
        return None
    path = Path(name) if Path(name).is_absolute() else base_dir / name
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        f.errors.add(f.path + (key,), f"cannot read {path}: {exc.strerror or exc}")
        return None


def _auth(f: Fields, base_dir: Path) -> AuthConfig:
    """``auth:`` — named client tokens (stored as sha256), lockgate's own token, mTLS, insecure."""
    if "auth" not in f.data:
        f.raw("auth")
        return AuthConfig()
    sub = f.sub("auth")
    tokens: list[ClientToken] = []
    names: dict[str, int] = {}
    hashes: dict[str, str] = {}
    for path, item in sub.list("tokens"):
        tf = Fields(item, path, f.errors)
        name = tf.str("name", required=True)
        digest = tf.str("sha256")
        from_file = _file_text(tf, "sha256_file", base_dir) if "sha256_file" in tf.data else None
        tf.finish()
        if name is not None and not NAME_RE.match(name):
            f.errors.add(path + ("name",), f"must match {NAME_RE.pattern}, got {name!r}")
            name = None
        if (digest is None) == ("sha256_file" not in tf.data):
            f.errors.add(path, "give exactly one of sha256 (the token's sha256, hex) or sha256_file "
                               "(never the token itself)")
            continue
        digest = digest if digest is not None else from_file
        if digest is None:
            continue
        if not _SHA256_RE.match(digest):
            key = "sha256" if "sha256" in tf.data else "sha256_file"
            f.errors.add(path + (key,), "must be 64 hex digits: the sha256 of the token "
                                        "(`printf %s TOKEN | sha256sum`), not the token")
            continue
        if name is None:
            continue
        if name in names:
            f.errors.add(path + ("name",), f"duplicate client name {name!r} (also auth.tokens[{names[name]}])")
            continue
        if digest.lower() in hashes:
            f.errors.add(path, f"same token as client {hashes[digest.lower()]!r}: each client needs its own token")
            continue
        names[name] = path[-1]  # type: ignore[assignment]
        hashes[digest.lower()] = name
        tokens.append(ClientToken(name, digest.lower()))
    token_file = sub.str("token_file")
    if token_file is not None and not Path(token_file).is_absolute():
        token_file = str(base_dir / token_file)
    insecure = sub.bool("insecure", False)
    tls = sub.sub("tls")
    cert, key, ca = tls.str("cert"), tls.str("key"), tls.str("client_ca")
    tls.finish()
    if (cert is None) != (key is None):
        f.errors.add(tls.path, "cert and key go together")
    if ca is not None and cert is None:
        f.errors.add(tls.path + ("client_ca",), "client_ca (mTLS) needs the server's cert and key too")
    sub.finish()

    def _abs(x: str | None) -> str | None:
        return None if x is None else (x if Path(x).is_absolute() else str(base_dir / x))

    return AuthConfig(tuple(tokens), token_file, insecure, _abs(cert), _abs(key), _abs(ca))
