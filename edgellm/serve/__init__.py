"""A local OpenAI-compatible server on edgellm's sessions (``pip install "edgellm[serve]"``).

::

    import edgellm
    from edgellm.serve import ServerConfig, serve

    model = edgellm.load("smollm2.gguf", kv_budget="64MiB")
    serve(model, ServerConfig(port=8080, parallel=4))   # blocks; Ctrl-C stops it

or ``edgellm serve smollm2.gguf --kv-budget 64MiB``. Any OpenAI client then works against
``http://127.0.0.1:8080/v1``. Starlette and uvicorn are imported only here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from edgellm.errors import InvalidInputError
from edgellm.serve.app import Server, ServerConfig, create_app, require_stack
from edgellm.serve.guard import is_loopback

if TYPE_CHECKING:
    from collections.abc import Callable

    from edgellm.model import Model

logger = logging.getLogger(__name__)

__all__ = ["Server", "ServerConfig", "check_bind", "create_app", "serve"]


def check_bind(config: ServerConfig) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if not is_loopback(config.host) and not config.api_key:
        raise InvalidInputError(
            f"binding to {config.host!r} exposes the model to the network; give --api-key KEY (clients "
            "then send 'Authorization: Bearer KEY'), or bind 127.0.0.1"
        )


def serve(model: Model, config: ServerConfig | None = None,
          on_ready: Callable[[Server], None] | None = None) -> None:
    """Serve ``model`` until interrupted; the sessions are closed afterwards, the model is not.

    ``on_ready(server)`` runs once the sessions are open, before the socket is bound.
    """
    config = config or ServerConfig()
    check_bind(config)
    require_stack()
    import uvicorn

    server = Server(model, config)
    try:
        if on_ready is not None:
            on_ready(server)
        uvicorn.run(server.app, host=config.host, port=config.port, log_level="warning",
                    timeout_graceful_shutdown=5)
    finally:
        server.close()
