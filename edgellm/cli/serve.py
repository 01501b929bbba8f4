"""``edgellm serve MODEL``: a local OpenAI-compatible server (``pip install "edgellm[serve]"``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edgellm.cli._common import add_command, add_load_args, format_bytes, load_model, positive_int

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``serve``."""
    p = add_command(subparsers, "serve", "serve a model over the OpenAI API on this machine",
                    "Serve MODEL at http://HOST:PORT/v1 (chat/completions, completions, models), plus "
                    "/health and /metrics. Requests run on --parallel sessions of the model, each with "
                    "its own KV cache (sharing --kv-budget); more wait in a queue of --max-queue; past "
                    "it the server answers 503.\n\n"
                    "examples:\n"
                    "  edgellm serve ./smollm2.gguf --kv-budget 64MiB\n"
                    "  edgellm serve ./smollm2-ov --host 0.0.0.0 --api-key \"$KEY\"")
    add_load_args(p, model_help="converted model folder or .gguf file")
    srv = p.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default 127.0.0.1; anything else needs --api-key)")
    srv.add_argument("--port", type=positive_int, default=8080, help="port (default 8080)")
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $EDGELLM_API_KEY)")
    srv.add_argument("--parallel", type=positive_int, default=4,
                     help="sessions generating at once (default 4; fewer if --kv-budget holds fewer)")
    srv.add_argument("--max-queue", type=int, default=8, help="requests that may wait (default 8)")
    srv.add_argument("--alias", help="model id clients use (default: the model's name)")
    srv.add_argument("--cors-origin", action="append", default=[], metavar="URL",
                     help="allow browser requests from this origin (repeatable; default none)")
    srv.add_argument("--allowed-host", action="append", metavar="NAME",
                     help="Host header names to answer (default: loopback names on a loopback bind)")
    srv.add_argument("--max-body", type=positive_int, default=1 << 20, metavar="BYTES",
                     help="largest request body (default 1 MiB)")
    return p


def _model_id(args: argparse.Namespace, manifest: dict[str, Any]) -> str:
    if args.alias:
        return str(args.alias)
    path = Path(args.model)
    return str(manifest.get("name") or (path.stem if path.suffix == ".gguf" else path.name))


def run(args: argparse.Namespace) -> int:
    """Load the model, serve it until Ctrl-C."""
    import os

    from edgellm.errors import InvalidInputError
    from edgellm.serve import ServerConfig, check_bind, require_stack, serve

    if args.max_queue < 0:
        raise InvalidInputError(f"--max-queue must be >= 0, got {args.max_queue}")
    config = ServerConfig(
        host=args.host, port=args.port, model_id="", parallel=args.parallel, n_ctx=args.n_ctx,
        max_queue=args.max_queue, api_key=args.api_key or os.environ.get("EDGELLM_API_KEY") or None,
        cors_origins=tuple(args.cors_origin), allowed_hosts=args.allowed_host, max_body_bytes=args.max_body,
    )
    check_bind(config)  # before the model is loaded: a refused bind costs nothing
    require_stack()
    model = load_model(args)
    try:
        from dataclasses import replace

        serve(model, replace(config, model_id=_model_id(args, model.manifest)), on_ready=_announce)
    finally:
        model.close()
    return 0


def _announce(server: Any) -> None:
    pool, cfg, model = server.pool, server.config, server.model
    kv = pool.slots * pool.n_ctx * model.engine.kv_bytes_per_token()
    print(f"edgellm: serving {cfg.model_id!r} ({model.engine.backend}) at http://{cfg.host}:{cfg.port}/v1 "
          f"- {pool.slots} sessions x {pool.n_ctx} tokens ({format_bytes(kv)} of KV), queue {cfg.max_queue}"
          f"{', API key required' if cfg.api_key else ''}; Ctrl-C stops", file=sys.stderr)

