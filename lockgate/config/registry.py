"""``registry:`` — model registry feedback after promotion, rollback or inconclusive (file, MLflow, webhook)."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lockgate.config.alerts import RetryPolicy, _retry
from lockgate.config.common import _token_env, _url
from lockgate.yamlconf import Fields

if TYPE_CHECKING:  # pragma: no cover
    from lockgate.config.models import Model


@dataclass(frozen=True)
class MlflowModelMap:
    """Which MLflow registered model (and version numbers) a lockgate model's versions are."""

    registered_model: str | None = None
    versions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RegistryConfig:
    """Model registry feedback after promotion / rollback / inconclusive (``registry:``).

    ``file`` (default): ``path`` (default ``<state_dir>/registry``), one JSON file per model.
    ``mlflow``: ``tracking_uri``, ``registered_model`` (default: the lockgate model name), ``versions``
    (lockgate version → MLflow version number), ``version_tag`` (else looked up by this model-version tag),
    ``alias`` set on promotion, per-model overrides in ``models``. ``webhook``: ``url`` (or ``url_env``)."""

    type: str = "file"
    path: Path | None = None
    url: str | None = None
    tracking_uri: str | None = None
    registered_model: str | None = None
    versions: tuple[tuple[str, str], ...] = ()
    version_tag: str = "lockgate.version"
    alias: str | None = "production"
    models: tuple[tuple[str, MlflowModelMap], ...] = ()
    bearer_token_env: str | None = None
    timeout_s: float = 10.0
    retry: RetryPolicy = RetryPolicy()


def _version_map(f: Fields, key: str) -> tuple[tuple[str, str], ...]:
    if key not in f.data:
        f.raw(key)
        return ()
    sub = f.sub(key)
    out = []
    for name, value in sub.data.items():
        sub.raw(name)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.isdigit():
            f.errors.add(sub.path + (name,), f"must be an MLflow version number, got {value!r}")
            continue
        out.append((str(name), value))
    return tuple(out)


def _registry(f: Fields, base_dir: Path, models: list["Model"]) -> RegistryConfig:
    """``registry:`` (absent = the file registry in ``<state_dir>/registry``)."""
    d = RegistryConfig()
    if "registry" not in f.data:
        f.raw("registry")
        return d
    sub = f.sub("registry")
    kind = sub.str("type", "file") or "file"
    if kind not in ("file", "mlflow", "webhook"):
        f.errors.add(sub.path + ("type",), f"must be file, mlflow or webhook, got {kind!r}")
    timeout = sub.float("timeout_s", d.timeout_s, min=0.01, max=600.0)
    retry = _retry(sub)
    allowed = {"type", "timeout_s", "retry"}
    path = url = tracking_uri = registered_model = token_env = None
    versions: tuple[tuple[str, str], ...] = ()
    per_model: list[tuple[str, MlflowModelMap]] = []
    version_tag, alias = d.version_tag, d.alias
    known = {m.name: m for m in models}

    def check_versions(vmap, where, model_names):
        for vname, _ in vmap:
            if model_names and not any(vname in known[m].versions for m in model_names if m in known):
                f.errors.add(where + (vname,), f"{vname!r} is not a version of {', '.join(model_names)}")

    if kind == "file":
        allowed |= {"path"}
        p = sub.str("path")
        if p is not None:
            path = Path(p) if Path(p).is_absolute() else (base_dir / p).resolve()
    elif kind == "webhook":
        allowed |= {"url", "url_env", "bearer_token_env"}
        url = _url(sub)
        token_env = _token_env(sub)
    elif kind == "mlflow":
        allowed |= {"tracking_uri", "registered_model", "versions", "version_tag", "alias", "models",
                    "bearer_token_env"}
        tracking_uri = sub.str("tracking_uri", required=True)
        if tracking_uri is not None:
            parsed = urllib.parse.urlsplit(tracking_uri)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                f.errors.add(sub.path + ("tracking_uri",),
                             f"must be the http:// or https:// URL of an MLflow tracking server, got {tracking_uri!r}")
                tracking_uri = None
        registered_model = sub.str("registered_model")
        versions = _version_map(sub, "versions")
        check_versions(versions, sub.path + ("versions",), list(known))
        version_tag = sub.str("version_tag", d.version_tag) or d.version_tag
        alias_raw = sub.raw("alias")
        if alias_raw is False:
            alias = None
        elif isinstance(alias_raw, str) and re.match(r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$", alias_raw):
            alias = alias_raw
        elif alias_raw is not None:
            f.errors.add(sub.path + ("alias",), f"must be an alias name (letters, digits, _ and -) or false, "
                                                f"got {alias_raw!r}")
        token_env = _token_env(sub)
        if "models" in sub.data:
            msub = sub.sub("models")
            for mname, mdata in msub.data.items():
                msub.raw(mname)
                mpath = msub.path + (mname,)
                if known and mname not in known:
                    f.errors.add(mpath, f"{mname!r} is not a model in this file ({', '.join(known)})")
                mf = Fields(mdata, mpath, f.errors)
                rm = mf.str("registered_model")
                vm = _version_map(mf, "versions")
                mf.finish()
                check_versions(vm, mpath + ("versions",), [mname])
                per_model.append((mname, MlflowModelMap(rm, vm)))
        else:
            sub.raw("models")
    for key in list(sub.data):
        if key not in allowed:
            sub.raw(key)
            f.errors.add(sub.path + (key,), f"unknown field for registry type {kind} "
                                            f"(known: {', '.join(sorted(allowed))})")
    sub.finish()
    return RegistryConfig(kind, path, url, tracking_uri, registered_model, versions, version_tag, alias,
                          tuple(per_model), token_env, d.timeout_s if timeout is None else timeout, retry)
