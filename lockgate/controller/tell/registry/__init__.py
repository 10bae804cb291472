"""Model registry feedback: ``base`` (interface), one module per adapter (``file``, ``mlflow``, ``webhook``)."""

from __future__ import annotations

from lockgate.config import LockgateConfig
from lockgate.controller.tell.registry.base import (STATUS_FOR_KIND, ModelRegistry, RegistryError, RegistryUpdate,
                                               update_from_event)


def make_registry(config: LockgateConfig) -> ModelRegistry:
    """The configured registry adapter (``registry.type``; default ``file`` in ``<state_dir>/registry``)."""
    rc = config.registry
    if rc.type == "mlflow":
        from lockgate.controller.tell.registry.mlflow import MlflowRegistry

        return MlflowRegistry(rc)
    if rc.type == "webhook":
        from lockgate.controller.tell.registry.webhook import WebhookRegistry

        assert rc.url
        return WebhookRegistry(rc.url, rc.timeout_s, rc.bearer_token_env)
    from lockgate.controller.tell.registry.file import FileRegistry

    return FileRegistry(rc.path or config.state_dir / "registry")


__all__ = ["STATUS_FOR_KIND", "ModelRegistry", "RegistryError", "RegistryUpdate", "make_registry",
           "update_from_event"]
