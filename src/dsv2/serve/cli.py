"""`dsv2 serve`: flags, loading, and running uvicorn with a clean shutdown.

    dsv2 serve --model runs/demo/latest [--host 127.0.0.1] [--port 8000] [--served-model-name demo]
               [--api-key KEY] [--max-queue 256] [--max-batch 64] [--kv-memory 1GiB] ...

The bound address is printed on stdout (`dsv2 serve: listening on http://HOST:PORT`), which is how a
caller learns the port chosen for `--port 0`. SIGINT / SIGTERM stop accepting connections, give the
in-flight requests `--shutdown-timeout` seconds to finish, abort the rest, and exit with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from dsv2.engine.cli import add_engine_args, engine_kwargs, load_checkpoint


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, *.safetensors, tokenizer.json; "
                   "tokenizer_config.json's chat_template if any)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--served-model-name", default=None, help="the `model` name clients send (default: the "
                   "folder's name, or its parent's for a `latest` / `step-N` folder)")
    p.add_argument("--api-key", default=os.environ.get("DSV2_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DSV2_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests (choices) allowed to wait for admission; more get 429 (default 256)")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="chat completions without max_tokens generate at most this many (default 256)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM (default 5)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_engine_args(p)


def model_name(folder: Path) -> str:
    """runs/demo/latest -> demo; runs/demo/step-300 -> demo; ckpt -> ckpt."""
    folder = folder.resolve()
    if folder.name == "latest" or folder.name.startswith("step-"):
        return folder.parent.name
    return folder.name


def build_state(args: argparse.Namespace):
    """Load the checkpoint and build the engine, its loop and the app state (nothing runs yet)."""
    from dsv2.checkpoint import read_config
    from dsv2.engine import Engine
    from dsv2.serve.app import ServerState
    from dsv2.serve.chat import ChatTemplate
    from dsv2.serve.loop import EngineLoop
    from dsv2.serve.metrics import ServerMetrics

    folder = Path(args.model)
    if not (folder / "tokenizer.json").exists():
        raise FileNotFoundError(f"--model: no tokenizer.json in {folder}")
    for name in ("max_queue", "max_batch", "default_max_tokens"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'max_queue' else 1}")
    cfg = read_config(folder)  # a quantised folder's config too
    template = ChatTemplate.from_folder(folder)
    model, tokenizer, _, _ = load_checkpoint(folder, cfg, args.dtype, args.device, args.weights,
                                              args.group_size)
    engine = Engine(model, tokenizer=tokenizer, **engine_kwargs(args))
    if args.show_config:
        print(f"engine:\n{engine.config.describe()}", file=sys.stderr)
    metrics = ServerMetrics()
    loop = EngineLoop(engine, model, metrics, args.max_queue)
    capacity = int(engine.cache_report()["capacity_tokens"])
    return ServerState(loop, tokenizer, template, args.served_model_name or model_name(folder), cfg, capacity,
                       metrics, api_key=args.api_key or None, default_max_tokens=args.default_max_tokens)


def _server_class():
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with dsv2's shutdown: `grace` seconds after SIGINT/SIGTERM, `drain()` aborts what is
        still running (so every open stream ends with finish_reason "abort" and [DONE] instead of a cut
        connection); and no re-raising of the signal afterwards, so the process exits with status 0."""

        def __init__(self, config: uvicorn.Config, drain, grace: float) -> None:
            super().__init__(config)
            self.drain, self.grace = drain, grace

        async def shutdown(self, sockets=None) -> None:
            timer = asyncio.get_running_loop().call_later(self.grace, self.drain)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            import threading

            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    return Server


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from dsv2.serve.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import torch

        from dsv2.threads import pick_threads

        torch.set_num_threads(pick_threads(args.threads))
        state = build_state(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"dsv2 serve: error: {e}", file=sys.stderr)
        return 2
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        print(f"dsv2 serve: error: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(f"dsv2 serve: model {state.model_name!r} listening on http://{shown}:{port} "
          f"(OpenAI base_url http://{shown}:{port}/v1; {torch.get_num_threads()} threads)", flush=True)
    # uvicorn's own deadline is a backstop: the drain at --shutdown-timeout ends the streams first
    config = uvicorn.Config(create_app(state), log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout + 5, access_log=args.log_level == "debug")
    _server_class()(config, drain=state.loop.stop, grace=args.shutdown_timeout).run(sockets=[sock])
    state.loop.stop()  # no-op after a normal lifespan shutdown
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv2 serve", description="Serve a checkpoint over the OpenAI HTTP API.")
    add_serve_args(p)
    return run_serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
