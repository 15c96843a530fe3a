"""Starting and stopping `bitnet serve`: the engine, the batch scheduler and uvicorn on one socket."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

from bitnet_cli.engine import DEFAULT_KV_CACHE
from bitnet_cli.errors import BitnetError

# `bitnet serve`'s defaults (the CLI shows these): loopback only, llama-server's port range, 4 slots
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_PARALLEL = 4
DEFAULT_MAX_QUEUE = 64


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a taken port is one clear error (port 0: any free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise BitnetError(f"host {host!r}: {e}", param="host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise BitnetError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def served_name(model: str | Path, model_id: str | None) -> str:
    """The model id clients ask for: `model_id`, else the file name without its extension.

    Every response carries it in JSON, which holds only Unicode text: a `model_id` that is not UTF-8
    (argv bytes arrive as lone surrogates) is refused; such bytes in a file name are shown as U+FFFD.
    Either once failed every request with a 500 (UnicodeEncodeError) after a clean start."""
    from bitnet_cli.tokenizer import bad_text, shown_text

    if model_id:
        why = bad_text(model_id)
        if why:
            raise BitnetError(f"model_id is {why}", param="model_id")
        return model_id
    return shown_text(Path(model).stem)


def serve(model: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, threads: int | None = None,
          parallel: int = DEFAULT_PARALLEL, ctx_size: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
          model_id: str | None = None, ready: Callable[[dict], None] = lambda info: None, kv_cache: str = DEFAULT_KV_CACHE,
          api_key: str | None = None, lookup: int = 0) -> None:
    """Serve `model` until SIGINT/SIGTERM, then finish the requests in flight and return.

    ready(info) is called once the socket listens, with the URL and the engine's figures. api_key:
    every endpoint but /health then needs `Authorization: Bearer api_key`. lookup: prompt lookup's draft tokens
    per sequence and step at most (0: none; the text is the same either way)."""
    try:
        import uvicorn
        from starlette.applications import Starlette  # noqa: F401
    except ImportError:
        raise BitnetError("bitnet serve needs the serve extra: pip install 'bitnet-cli[serve]'") from None
    from bitnet_cli.engine import Engine
    from bitnet_cli.lookup import check_lookup
    from bitnet_cli.serve.app import Server, check_api_key
    from bitnet_cli.serve.scheduler import Scheduler, check_limits

    if type(port) is not int or not 0 <= port <= 65535:
        raise BitnetError(f"port must be between 0 and 65535, got {port!r}", param="port")
    check_limits(parallel, max_queue)  # before the model is loaded
    check_api_key(api_key)
    check_lookup(lookup)
    name = served_name(model, model_id)
    engine = Engine.load(model, threads=threads, ctx_size=ctx_size, kv_cache=kv_cache)
    sock = _listen(host, port)
    scheduler = Scheduler(engine, parallel, max_queue, lookup)
    class Uvicorn(uvicorn.Server):
        """uvicorn drains in-flight requests on SIGINT/SIGTERM, then re-raises the signal (exit code
        130/143); a server asked to stop that stopped cleanly exits 0, so the signal is dropped."""

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    api = Server(engine, scheduler, name, api_key)
    server = Uvicorn(uvicorn.Config(api.app, log_level="warning", access_log=False, lifespan="on",
                                    timeout_graceful_shutdown=None))
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    info = {"url": f"http://{shown}:{bound[1]}/v1", "model": name, "parallel": parallel, "threads": engine.threads,
            "ctx_size": engine.ctx_size, "kv_cache": engine.kv_cache, "kv_bytes_per_slot": engine.kv_bytes_per_sequence,
            "max_queue": max_queue, "isa": engine.isa, "api_key": api_key is not None, "lookup": lookup,
            # None: the chat template shows no way to call (no "auto"); listed: the calls as one JSON list between tags;
            # tag "": one call as the whole reply (Llama's); tool_calls: how a call is written, in short
            "tool_call_tag": api.tool_calls and api.tool_calls.tag,
            "tool_calls_listed": bool(api.tool_calls and api.tool_calls.listed),
            "tool_calls": str(api.tool_calls) if api.tool_calls else None}
    try:
        # from the start-up line on, SIGINT/SIGTERM ask uvicorn to stop, not only once it runs: the CLI's
        # handler raises where the program is, and raised in a weakref callback Python ignored it
        # (the server ran on); a stop asked before uvicorn runs makes it start and stop at once
        with server.capture_signals():
            ready(info)
            server.run(sockets=[sock])
    finally:
        sock.close()
        scheduler.close()
        engine.close()
