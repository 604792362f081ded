"""The HTTP server: OpenAI-compatible API, LoRAX extras, admin, metrics, playground page."""

from lorafleet.serve.api.app import create_app
from lorafleet.serve.api.auth import AuthConfig, Principal
from lorafleet.serve.api.state import ServerConfig, ServerState

__all__ = ["AuthConfig", "Principal", "ServerConfig", "ServerState", "create_app"]
