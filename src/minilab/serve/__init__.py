"""`minilab serve MODEL`: an OpenAI-compatible HTTP API and a web chat page (see `app.py`).

    minilab serve my-model                        # http://127.0.0.1:8000/ (chat page), /v1/...
    minilab serve my-model --host 0.0.0.0 --api-key "$KEY"

Binding anything but loopback without an API key is refused unless `--allow-remote` says so:
a model server open to the network answers (and costs compute for) anyone who finds it.
The key may also come from $MINILAB_API_KEY, which keeps it out of the process list.
"""

from __future__ import annotations

import argparse
import logging
import os

from minilab.errors import MinilabError
from minilab.serve.net import base_url, bind_socket, is_loopback

log = logging.getLogger("minilab.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minilab.cliargs import flag, int_range
    from minilab.inference import add_model_flags
    from minilab.serve.guard import allowed_host_arg, origin_arg

    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_range(0, 65535), default=8000, help="port (default 8000; 0 picks a free one)")
    flag(p, "--api-key", default=os.environ.get("MINILAB_API_KEY"),
         help="require 'Authorization: Bearer KEY' on /v1 (default: $MINILAB_API_KEY, else none)")
    flag(p, "--allow-remote", action="store_true",
         help="allow a non-loopback --host without an API key (anyone who can reach it can use it)")
    flag(p, "--allowed-hosts", type=allowed_host_arg, action="append", default=[], metavar="NAME[,NAME]",
         help="Host names this server answers to besides localhost, IP addresses and --host (a guard against "
              "DNS rebinding); '*' for any. Default with an API key: any")
    flag(p, "--cors-origin", type=origin_arg, action="append", default=[], metavar="ORIGIN",
         help="let web pages from ORIGIN (scheme://host[:port]) call the API, with CORS headers; repeatable; "
              "'*' for any. Default: only the server's own chat page")
    flag(p, "--max-concurrency", type=int_range(1), default=8,
         help="requests decoded at the same time: rows of one continuous batch (worker threads for "
              "transformers-backed models)")
    flag(p, "--max-queue", type=int_range(0), default=64, help="requests waiting for a worker; more get HTTP 429")
    flag(p, "--max-body-bytes", type=int_range(1), default=1 << 20, help="largest request body (HTTP 413 beyond)")


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from minilab.inference import engine_from_args
    from minilab.serve.app import create_app
    from minilab.serve.guard import is_ip

    if not is_loopback(args.host) and not args.api_key and not args.allow_remote:
        raise MinilabError(f"refusing to serve on {args.host} without an API key: pass --api-key KEY (or set "
                           "MINILAB_API_KEY), or --allow-remote to serve it open to the network anyway")
    engine = engine_from_args(args)
    app = create_app(engine, api_key=args.api_key, max_concurrency=args.max_concurrency,
                     max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, host=args.host,
                     allowed_hosts=[n for names in args.allowed_hosts for n in names], cors_origins=args.cors_origin)
    sock = bind_socket(args.host, args.port)  # bound here: with --port 0 the log names the port chosen
    try:
        log.info("serving %s on %s/ (chat page), OpenAI API under /v1%s", engine.name, base_url(args.host, sock),
                 "" if args.api_key else " (no API key)")
        hosts = app.state.trusted_hosts
        log.info("answering Host names: %s", "any" if hosts is None else
                 ", ".join(sorted(h for h in hosts if not is_ip(h))) + " and IP addresses (more with --allowed-hosts)")
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
