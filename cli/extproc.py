"""``thinkcap extproc``: the Envoy external processor (``[extproc] listen``, gRPC), beside the
same listeners as ``serve`` (``/metrics``, ``/readyz``, the admin API, and the proxy itself),
until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

from thinkcap.cli.runtime import LOOPS, listen_flag
from thinkcap.cli.runtime import run as run_loop
from thinkcap.cli.serve import listening, run_until_stopped
from thinkcap.proxy.extproc import serve_grpc
from thinkcap.proxy.logs import configure, logger
from thinkcap.proxy.serve_file import Settings, load_settings
from thinkcap.proxy.state import build_state


async def extproc(settings: Settings) -> None:
    """Run the processor and the listeners until a signal; then drain as ``serve`` does (the
    gRPC streams in progress get ``drain_timeout_s`` to end)."""
    if settings.backend.budget == "forced":
        raise ValueError('[backend] budget = "forced" needs thinkcap serve: a gateway\'s external processor sees one '
                         'request per answer and cannot continue it; use "native" or "auto"')  # fmt: skip
    state = build_state(settings)
    state.can_force = False
    x = settings.extproc
    async with contextlib.AsyncExitStack() as stack:
        try:
            plane, port, admin_port = await stack.enter_async_context(listening(state))
            grpc_server, grpc_port = await serve_grpc(state, x.host, x.port, message_timeout_s=x.message_timeout_s)
        except OSError as exc:
            p = settings.proxy
            where = f"{x.host}:{x.port}, {p.host}:{p.port} or {p.admin_host}:{p.admin_port}"
            raise ValueError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        logger().info(
            "listening",
            extproc=f"{x.host}:{grpc_port}",
            url=f"http://{settings.proxy.host}:{port}",
            admin=f"http://{settings.proxy.admin_host}:{admin_port}",
        )
        try:
            await run_until_stopped(state, plane)
        finally:
            await grpc_server.stop(settings.proxy.drain_timeout_s)


def add_parser(sub: Any) -> None:
    """Register ``extproc``."""
    sp = sub.add_parser("extproc", help="run as an Envoy external processor (ext_proc, gRPC) beside a gateway")
    sp.add_argument("--config", required=True, help="thinkcap TOML config (the same file as serve)")
    sp.add_argument("--listen", help='override [extproc] listen, "host:port"')
    sp.add_argument("--loop", choices=LOOPS, default="auto", help="event loop (auto: uvloop when installed)")
    sp.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``thinkcap extproc``."""
    settings = load_settings(args.config)
    if args.listen:
        host, port = listen_flag(args.listen)
        settings = settings.with_extproc(host=host, port=port)
    configure()
    run_loop(extproc(settings), args.loop)
    return 0
