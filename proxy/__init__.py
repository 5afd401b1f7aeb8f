"""The I/O layer: configuration, CLI, and (later) the HTTP proxy and control loop."""

from thinkcap.proxy.config import ConfigError, ModelConfig, TypeConfig, load_model

__all__ = ["ConfigError", "ModelConfig", "TypeConfig", "load_model"]
