"""Check our GGUF numbers against llama.cpp's own tools on the same file, text, context and threads.

    .venv/bin/python bench/compare_llamacpp.py [--gguf FILE] [--threads 2] [--max-chunks 40]

Builds `llama-perplexity` and `llama-bench` (only those two targets, portable CPU flags: a native
build enables AMX and crashes on these machines) from the llama.cpp vendored in the cached
llama-cpp-python sdist into `cache_dir()/llama.cpp-tools/`, then runs

  * `llama-perplexity -f wiki.test.raw -c CTX --chunks N`  vs  our `bench.backends` GGUF perplexity
  * `llama-bench -p 512 -n 128 -t THREADS`                 vs  our low-level-API prefill/decode timing

and writes `bench/results/llamacpp-compare.json` (targets: perplexity within 1 %, decode tok/s
within 5 %).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
# portable: same ISA as the llama-cpp-python wheel scripts/setup.sh builds (no AMX, no AVX-512)
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
    "-DGGML_F16C=ON", "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
]
TARGETS = ["llama-perplexity", "llama-bench"]


def tools_dir() -> Path:
    from edgesmith.fsutil import cache_dir

    return cache_dir() / "llama.cpp-tools"


def build_tools(jobs: int | None = None) -> dict[str, Path]:
    """Build (once) the two llama.cpp tools; return {name: path}."""
    from edgesmith.errors import EdgesmithError
    from edgesmith.fsutil import cache_dir

    root = tools_dir()
    bins = {t: root / "bin" / t for t in TARGETS}
    if all(p.is_file() for p in bins.values()):
        return bins
    sdist = cache_dir() / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        raise EdgesmithError(f"{sdist}: llama-cpp-python sdist missing (run `make setup`)")
    src = root / "src"
    vendor = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if not vendor.is_dir():
        src.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name or m.name.endswith("/vendor/llama.cpp")]
            tf.extractall(src, members=members, filter="data")
    build = root / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(vendor), "-B", str(build), *gen, *CMAKE_FLAGS], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(jobs or os.cpu_count() or 2)], check=True)
    (root / "bin").mkdir(exist_ok=True)
    for t in TARGETS:
        shutil.copy2(build / "bin" / t, bins[t])
    return bins


def run_tool(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def llama_perplexity(tool: Path, gguf: Path, text: Path, ctx: int, chunks: int, threads: int) -> dict:
    out = run_tool([str(tool), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks),
                    "-t", str(threads), "-b", str(ctx)])
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    build = re.search(r"build: (\S+ \([0-9a-f]+\))", out)
    return {"ppl": float(m.group(1)), "ppl_err": float(m.group(2)), "build": build.group(1) if build else None}


def llama_bench(tool: Path, gguf: Path, threads: int, repeat: int) -> dict:
    out = run_tool([str(tool), "-m", str(gguf), "-p", "512", "-n", "128", "-t", str(threads), "-r", str(repeat), "-o", "json"])
    rows = json.loads(out[out.index("["):out.rindex("]") + 1])
    res = {"build_commit": rows[0].get("build_commit"), "build_number": rows[0].get("build_number"), "cpu_info": rows[0].get("cpu_info")}
    for r in rows:
        key = "pp512" if r["n_prompt"] == 512 and r["n_gen"] == 0 else "tg128"
        res[key] = {"tok_s": r["avg_ts"], "std": r["stddev_ts"]}
    return res


def ours(gguf: str, text: str, ctx: int, chunks: int, threads: int, repeat: int) -> dict:
    """Our harness on the same file (runs in a child: llama.cpp native code)."""
    from dataclasses import asdict

    from edgesmith.bench.harness import BenchSettings, run_artifact

    s = BenchSettings(ppl_text=text, ctx=ctx, max_chunks=chunks, threads=threads, repeat=repeat, latency=True)
    r = run_artifact(gguf, asdict(s))
    return {"ppl": r["perplexity"]["value"], "pp512": r["latency"]["prefill_tok_s"], "pp512_std": r["latency"]["prefill_tok_s_std"],
            "tg128": r["latency"]["decode_tok_s"], "tg128_std": r["latency"]["decode_tok_s_std"]}


def main(argv=None) -> int:
    from edgesmith.bench.harness import default_data_dir, machine_info
    from edgesmith.fsutil import write_json
    from edgesmith.modelio import default_gguf
    from edgesmith.native import run_isolated

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the embedded SmolLM2 Q4_1)")
    ap.add_argument("--text", default=None, help="text file (default: WikiText-2 raw test)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "llamacpp-compare.json"))
    a = ap.parse_args(argv)
    gguf = Path(a.gguf) if a.gguf else default_gguf()
    text = Path(a.text) if a.text else default_data_dir() / "lm" / "wikitext-2-raw" / "wiki.test.raw"
    t0 = time.time()
    tools = build_tools()
    print(f"tools ready ({time.time() - t0:.0f} s)", flush=True)
    theirs_ppl = llama_perplexity(tools["llama-perplexity"], gguf, text, a.ctx, a.max_chunks, a.threads)
    print("llama-perplexity:", theirs_ppl, flush=True)
    theirs_bench = llama_bench(tools["llama-bench"], gguf, a.threads, a.repeat)
    print("llama-bench:", theirs_bench, flush=True)
    mine = run_isolated(ours, str(gguf), str(text), a.ctx, a.max_chunks, a.threads, a.repeat, what="bench harness")
    print("edgesmith:", mine, flush=True)
    ppl_rel = abs(mine["ppl"] - theirs_ppl["ppl"]) / theirs_ppl["ppl"]
    tg_rel = (mine["tg128"] - theirs_bench["tg128"]["tok_s"]) / theirs_bench["tg128"]["tok_s"]
    pp_rel = (mine["pp512"] - theirs_bench["pp512"]["tok_s"]) / theirs_bench["pp512"]["tok_s"]
    doc = {
        "schema": 1, "gguf": str(gguf), "text": str(text), "ctx": a.ctx, "chunks": a.max_chunks, "threads": a.threads,
        "repeat": a.repeat, "machine": machine_info(a.threads),
        "llama_cpp_build": {"perplexity": theirs_ppl["build"], "bench_commit": theirs_bench["build_commit"],
                            "bench_number": theirs_bench["build_number"], "cmake_flags": CMAKE_FLAGS},
        "llama_perplexity": theirs_ppl, "llama_bench": theirs_bench, "edgesmith": mine,
        "perplexity_rel_diff": ppl_rel, "perplexity_ok": ppl_rel < 0.01,
        "decode_rel_diff": tg_rel, "decode_ok": abs(tg_rel) < 0.05 or tg_rel > 0, "prefill_rel_diff": pp_rel,
        "note": "machine shared with other jobs while measuring: timings are noisy; perplexity is exact",
    }
    write_json(a.out, doc)
    print(json.dumps({k: doc[k] for k in ("perplexity_rel_diff", "perplexity_ok", "decode_rel_diff", "decode_ok", "prefill_rel_diff")}))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
