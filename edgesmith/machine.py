"""What this machine is and has, read from /proc (never assumed): CPU flags, memory, the process's peak RSS,
thread pinning, and the machine record every results JSON carries.

Standard library only (plus llama.cpp's own report of its build), so the device-side harness can use it.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

# the instruction sets worth recording: what decides which kernels llama.cpp, onnxruntime and torch can use
RECORDED_FLAGS = ("sse3", "ssse3", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                  "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "asimddp", "sve")


def proc_kb(path: str, key: str) -> int | None:
    """The `key:  N kB` field of a /proc file (meminfo, self/status) in kB, or None where unknown."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def mem_available() -> int | None:
    """MemAvailable in bytes (what can be allocated without swapping), or None where unknown."""
    kb = proc_kb("/proc/meminfo", "MemAvailable")
    return None if kb is None else kb * 1024


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM) in MiB."""
    kb = proc_kb("/proc/self/status", "VmHWM")
    return None if kb is None else round(kb / 1024, 1)


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """(model name, every flag) from /proc/cpuinfo; x86 'flags' or Arm 'Features'."""
    cpu, flags = platform.processor() or "?", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("?", "", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith(("flags", "Features")) and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    return cpu, flags


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls pay off on CPUs that report AVX512-BF16 or AMX-BF16 (forward+backward of the demo student
    1.6-1.8x faster than fp32); on AVX2-only CPUs bf16 autocast is ~4x slower."""
    flags = cpu_model_and_flags()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pin_threads(threads: int) -> list[int] | None:
    """Restrict this process to its first `threads` usable CPUs -> the CPUs it runs on."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if threads < len(cpus):
        cpus = cpus[:threads]
        os.sched_setaffinity(0, cpus)
    return cpus


def machine_info(threads: int) -> dict:
    """The machine record of a results JSON: CPU, its instruction sets, memory, libraries, llama.cpp's build."""
    from importlib.metadata import PackageNotFoundError, version

    from edgesmith import llamacpp

    cpu, flags = cpu_model_and_flags()
    total_kb = proc_kb("/proc/meminfo", "MemTotal")
    libs = {}
    for d in ("edgesmith", "numpy", "llama_cpp_python", "onnxruntime", "tokenizers", "torch", "transformers", "gguf"):
        try:
            libs[d] = version(d)
        except PackageNotFoundError:
            pass
    return {
        "cpu": cpu, "cpu_flags": [f for f in flags if f in RECORDED_FLAGS], "cores": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": None if total_kb is None else round(total_kb / 2**20, 1), "os": platform.platform(),
        "python": platform.python_version(), "libraries": libs,
        "llama_cpp": llamacpp.build_info(), "threads": threads, "hostname": platform.node(),
    }
