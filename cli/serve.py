"""``thinkcap serve``: the proxy and its admin listener until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from thinkcap.cli.runtime import LOOPS, RESERVED_FILES, listen_flag, raise_open_files
from thinkcap.cli.runtime import run as run_loop
from thinkcap.proxy.admin import create_admin_app
from thinkcap.proxy.app import DataPlane, create_app
from thinkcap.proxy.logs import configure, logger
from thinkcap.proxy.serve_file import Settings, load_settings
from thinkcap.proxy.state import ProxyState, build_state


@contextlib.asynccontextmanager
async def listening(state: ProxyState) -> AsyncIterator[tuple[DataPlane, int, int]]:
    """Both listeners, started (the data plane and the admin API); yields the plane and the
    bound ports, and closes both on the way out (the admin API first, then the plane drains)."""
    p = state.settings.proxy
    async with create_app(state) as plane:
        admin = web.AppRunner(create_admin_app(state), access_log=None)
        try:
            await admin.setup()
            await web.TCPSite(admin, p.admin_host, p.admin_port).start()
            yield plane, plane.port, int(admin.addresses[0][1])
        finally:
            await admin.cleanup()


async def serve(settings: Settings) -> None:
    """Run until a signal; then drain: ``/readyz`` fails at once, requests are still taken for
    ``min_drain_s``, then the listener closes and requests in flight finish (up to
    ``drain_timeout_s``; what still runs then ends with an error); a second signal stops at once."""
    files = raise_open_files()
    wanted = settings.proxy.max_connections
    if files is not None and wanted > files - RESERVED_FILES:
        allowed = max(1, files - RESERVED_FILES)
        logger().warning(
            "max_connections",
            warning=f"the open-files limit is {files}: at most {allowed} client connections, not {wanted}",
        )
        settings = settings.with_proxy(max_connections=allowed)
    state = build_state(settings)
    async with contextlib.AsyncExitStack() as stack:
        try:
            plane, port, admin_port = await stack.enter_async_context(listening(state))
        except OSError as exc:  # the address is taken or not ours
            p = settings.proxy
            where = f"{p.host}:{p.port} or {p.admin_host}:{p.admin_port}"
            raise ValueError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        logger().info(
            "listening",
            url=f"http://{settings.proxy.host}:{port}",
            admin=f"http://{settings.proxy.admin_host}:{admin_port}",
        )
        await run_until_stopped(state, plane)


async def run_until_stopped(state: ProxyState, plane: DataPlane) -> None:
    """Until a signal; then drain (see :func:`serve`), up to the point the listeners close."""
    settings = state.settings
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:  # the first drains; a second stops at once
        if stop.is_set():
            hurry.set()
            plane.server.hurry()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    p = settings.proxy
    # /readyz answers 503 at once; requests are still taken for min_drain_s, the time a load
    # balancer needs to see it (its probe's period x failure threshold).
    state.draining = True
    logger().info("drain", min_drain_s=p.min_drain_s, in_flight=state.admission.in_flight,
                  queued=state.admission.queued)  # fmt: skip
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hurry.wait(), timeout=p.min_drain_s)
    logger().info(
        "shutdown",
        in_flight=state.admission.in_flight,
        queued=state.admission.queued,
        drain_timeout_s=0.0 if hurry.is_set() else p.drain_timeout_s,
    )


def add_parser(sub: Any) -> None:
    """Register ``serve``."""
    sp = sub.add_parser("serve", help="run the proxy in front of an OpenAI-compatible server")
    sp.add_argument("--config", required=True, help="thinkcap TOML config with a [backend] table")
    sp.add_argument("--listen", help='override [proxy] listen, "host:port"')
    sp.add_argument("--backend", help="override [backend] url")
    sp.add_argument("--loop", choices=LOOPS, default="auto", help="event loop (auto: uvloop when installed)")
    sp.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``thinkcap serve``."""
    settings = load_settings(args.config)
    if args.backend:
        if not args.backend.startswith(("http://", "https://")):
            raise ValueError(f"--backend: must be an http(s) URL, got {args.backend!r}")
        settings = settings.with_backend(url=args.backend, replicas=())  # one replica, all the slots
    if args.listen:
        host, port = listen_flag(args.listen)
        settings = settings.with_proxy(host=host, port=port)
    configure()
    run_loop(serve(settings), args.loop)
    return 0
