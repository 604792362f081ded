"""The HTTP server: OpenAI-compatible API, LoRAX extras, admin, metrics, playground page."""

from lorafleet.lazy import lazy_exports

# Each name is imported from its submodule on first use: the CLI reads ServerConfig without
# importing fastapi.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "AuthConfig": ".auth",
        "Principal": ".auth",
        "ServerConfig": ".config",
        "ServerState": ".state",
        "create_app": ".app",
    },
)
