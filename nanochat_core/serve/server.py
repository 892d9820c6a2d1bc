"""`nanochat serve`: the chat page and the OpenAI-compatible API on a trained checkpoint.

    nanochat serve                                    # the most post-trained model in the base dir, 127.0.0.1:8000
    nanochat serve --source sft --step 700 --port 8080
    nanochat serve --checkpoint models:/nanochat/3 --workers-per-device 2
    NANOCHAT_API_KEY=secret nanochat serve --host 0.0.0.0     # exposed: require a key

Then open http://127.0.0.1:8000/ , or point any OpenAI client at http://127.0.0.1:8000/v1 .
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

from nanochat_core.config import ServingConfig
from nanochat_core.flags import config_from_args, stage_parser
from nanochat_core.errors import UserError, exit_on_user_error


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("nanochat serve", "Serve the chat page and the OpenAI-compatible API.",
                          {"inference": None, "serve": None}, ServingConfig)
    cfg = config_from_args(parser.parse_args(argv), ServingConfig)
    from nanochat_core.serve.app import API_KEY_ENV, create_app
    from nanochat_core.serve.loading import load_replicas
    from nanochat_core.serve.pool import ReplicaPool, claim_cpu_threads

    s = cfg.serve
    has_key = bool(os.environ.get(API_KEY_ENV))
    if not _is_loopback(s.host) and not has_key:
        print(f"warning: serving on {s.host} without an API key: anyone who can reach this port can use the "
              f"model; set {API_KEY_ENV}", file=sys.stderr)
    sock = bind(s.host, s.port)  # seconds before the model would load: a taken port is one `error:` line
    port = sock.getsockname()[1]
    replicas = load_replicas(cfg.inference, s.workers_per_device)
    claim_cpu_threads(replicas)
    app = create_app(cfg, ReplicaPool(replicas, s.max_queue))
    meta = replicas[0].meta
    print(f"nanochat serve: {meta['label']} step {meta.get('step')} ({meta['checkpoint']}) on "
          f"{len(replicas)} replica(s) [{', '.join(sorted({str(r.device) for r in replicas}))}]; "
          f"open http://{s.host}:{port}/ , OpenAI API at http://{s.host}:{port}/v1"
          + (" (API key required)" if has_key else ""), flush=True)
    run(app, sock)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (--port 0 takes any free port).

    Created as an IPPROTO_TCP socket on purpose: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    connections of sockets whose proto says TCP, and with it on, every streamed reply stalled ~40 ms on
    the client's delayed ACK before its first token (bench/serve_load.py: single-client TTFT 44 ms
    through this socket against 2 ms through one uvicorn bound itself).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:  # port in use, address not available here
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None
    return sock


def run(app, sock: socket.socket) -> None:
    """uvicorn on `sock` until SIGINT/SIGTERM (in-flight streams get 5 s to finish)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])


if __name__ == "__main__":
    main()
