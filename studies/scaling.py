"""How `edgesmith prune`, `edgesmith export` and a 2-minute `edgesmith distill` scale with model size on this machine
(issue 20).

    .venv/bin/python studies/scaling.py [--sizes 0.5b,1b,3b] [--stages prune,export,distill] [--redo]
    .venv/bin/python studies/scaling.py build 1b /tmp/llama-1b     # just write one random bf16 checkpoint
    .venv/bin/python studies/scaling.py --report-only               # redo scaling.md/png from scaling.json

For each size a random-initialised Llama-family model is built from a config (the real SmolLM2 tokenizer, vocab
49152, tied embeddings; no weights are needed to measure memory and time), saved in bf16 with `save_pretrained` into
a temporary folder under /tmp (deleted afterwards), then run as subprocesses, one stage at a time:

    prune    edgesmith prune DIR --intermediate-size I/2 --num-layers 3L/4   (activation ranking, block influence)
    export   edgesmith export PRUNED --gguf F16,Q4_K_M
    distill  edgesmith distill --teacher DIR --student PRUNED --data alpaca_en_demo.json, 2 minutes of training
             (train.time_budget) with the memory-bounded settings: the teacher held in bf16, gradient checkpointing
             (DISTILL below). distill estimates its peak before loading anything and refuses (exit 2, one line with
             the numbers) when it exceeds MemAvailable: a refused full-parameter run is recorded, then run again with
             lora=true (LoRA adapters on the student, the documented memory fallback).

Each stage's peak memory is measured two ways: the kernel's maximum RSS of the largest process of the tree
(`/usr/bin/time -f %M`, exact) and the sum of the RSS of every live process of the tree, sampled 5 times a second
with psutil (the export runs llama.cpp's converter and quantiser as child processes). Wall time is the stage's.
Results: studies/results/scaling/{scaling.json, scaling.md, scaling.png}, with a least-squares line of peak RSS and
time against parameters, extrapolated to 8B (for distill also distill's own estimator at the 8B shapes).

Resumable: a stage already in scaling.json for a size is not measured again unless --redo; the pruned checkpoint a
distill needs as its student is made again by a prune when prune itself is already recorded (that rerun's numbers go
under the distill entry, `student_prune`, the recorded prune stays). A distill that needs more than 10 GiB waits until
MemAvailable holds its estimate plus 3 GiB (other people's jobs share the machine), up to --mem-wait seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "studies" / "results" / "scaling"
EDGESMITH = [str(REPO / ".venv" / "bin" / "edgesmith")]

# Llama-family shapes (head_dim 64 or 128, GQA 3:1 or 4:1, tied embeddings, SmolLM2's 49152-token vocabulary)
SIZES = {
    "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=24, num_key_value_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8),
}
# Llama 3.1 8B's shape with the same vocabulary, for the extrapolation's parameter count
EIGHT_B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)


# The 1B prune before the memory-bounded path (fp32 upcast of the bf16 model, the pruned model built in memory, then
# cast and saved), measured here on 2026-12-01 with the same model and command: /usr/bin/time maximum RSS.
STAGES = ("prune", "export", "distill")
BEFORE = {"1b": {"prune_max_rss_mib": 9537, "prune_seconds": 288}}

# The distill stage: the pruned model learns from its unpruned source on real instruction data for 2 minutes of
# training, with the memory-bounded settings (the teacher in bf16, gradient checkpointing). One 512-token packed
# block per step, so that even the 3B gets a few steps in the budget on 2 cores; no validation split (its baseline and
# final evaluation would run outside the budget, and nothing here is about quality); precision auto = bf16 autocast
# on CPUs with AVX512-BF16/AMX. LORA is added when full-parameter training is refused.
DISTILL_DATA = REPO.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"
DISTILL = {"teacher_dtype": "bfloat16", "train.grad_checkpointing": True, "train.time_budget": "2m",
           "train.max_steps": 100000, "train.batch_size": 1, "max_length": 512, "val_fraction": 0,
           "train.progress": False}
LORA = {"lora": True}
MEM_MARGIN_GIB = 3      # a run that needs more than BIG_RUN_GIB waits for its estimate plus this much MemAvailable
BIG_RUN_GIB = 10


def say(*a) -> None:
    print(*a, flush=True)


def n_params(shape: dict, vocab: int = 49152) -> int:
    """Parameters of a bias-free tied Llama of this shape."""
    D, I, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    hd = D // shape["num_attention_heads"]
    attn = D * hd * (2 * shape["num_attention_heads"] + 2 * shape["num_key_value_heads"])
    return vocab * D + L * (attn + 3 * D * I + 2 * D) + D


def build(size: str, dest: Path) -> Path:
    """A random bf16 Llama of `size` plus the default model's tokenizer at `dest`. Parameters are created on the meta
    device and filled tensor by tensor in bf16 (normal(0, 0.02), norms 1), so building never holds an fp32 copy."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from edgesmith.modelio import resolve

    cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2, **SIZES[size])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(dest, safe_serialization=True)
    tok = resolve("default")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tok / f).exists():
            shutil.copy(tok / f, dest / f)
    return dest


def measure(cmd: list[str], log: Path, ok: tuple[int, ...] = (0,)) -> dict:
    """Run `cmd` under /usr/bin/time; return wall seconds, the largest process's max RSS (kernel) and the sampled
    peak of the whole tree's summed RSS (MiB); an exit status other than 0 that `ok` allows is returned as "exit"."""
    import psutil

    full = ["/usr/bin/time", "-f", "MAXRSS_KB=%M", *cmd]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(full, stdout=f, stderr=subprocess.STDOUT)
        peak = [0]

        def poll():  # the tree's summed RSS: llama.cpp's tools run as children of the stage
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    procs = [root] + root.children(recursive=True)
                    peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs if p.is_running()))
                except psutil.Error:
                    pass
                time.sleep(0.2)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = proc.wait()
        th.join()
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    kb = [int(line.split("=")[1]) for line in text.splitlines() if line.startswith("MAXRSS_KB=")]
    if rc not in ok:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {log}:\n{text[-2000:]}")
    res = {"seconds": round(wall, 1), "max_rss_mib": round(kb[-1] / 1024) if kb else None,
           "tree_rss_mib": round(peak[0] / 2**20)}
    return res if rc == 0 else {**res, "exit": rc}


def dir_mib(p: Path) -> float:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20


def mem_available_gib() -> float:
    from edgesmith.machine import mem_available

    return mem_available() / 2**30


def distill_overrides(settings: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in settings.items()]


def distill_estimate(settings: dict, teacher: Path, student: Path) -> float:
    """distill's own estimate of its peak (GiB) for these settings, computed as `edgesmith distill` computes it."""
    import re

    from edgesmith.distill.distill import DistillConfig, check_memory_fits
    from edgesmith.config import load_config

    cfg = load_config(DistillConfig, None, distill_overrides({"teacher": str(teacher), "student": str(student),
                                                             "data": str(DISTILL_DATA), **settings}))
    line = check_memory_fits(cfg, teacher, student, need_teacher=True, available=2**62)
    return float(re.search(r"estimated peak memory ([\d.]+) GiB", line).group(1))


def wait_for_memory(need_gib: float, max_wait: float) -> None:
    """Share the machine: a run of more than BIG_RUN_GIB waits until MemAvailable holds it plus MEM_MARGIN_GIB. One
    that cannot fit in this machine's RAM at all goes at once (distill refuses it before loading anything)."""
    import psutil

    total = psutil.virtual_memory().total / 2**30
    if need_gib <= BIG_RUN_GIB or need_gib + MEM_MARGIN_GIB > total:
        return
    t0 = time.time()
    while (avail := mem_available_gib()) < need_gib + MEM_MARGIN_GIB:
        if time.time() - t0 > max_wait:
            raise SystemExit(f"waited {max_wait:.0f}s for {need_gib + MEM_MARGIN_GIB:.1f} GiB MemAvailable "
                             f"(estimate {need_gib:.1f} + {MEM_MARGIN_GIB}); have {avail:.1f}")
        say(f"  waiting for memory: {avail:.1f} GiB available, the run needs {need_gib:.1f} + {MEM_MARGIN_GIB} GiB spare")
        time.sleep(30)


def distill_stage(size: str, src: Path, pruned: Path, root: Path, logs: Path, max_wait: float) -> dict:
    """The 2-minute distill of `pruned` from `src`: full-parameter first; when distill refuses that up front (its
    estimate exceeds MemAvailable) the refusal is recorded and the run repeated with lora=true."""
    import re

    out = root / f"llama-{size}-distilled"
    refused = None
    for settings in (DISTILL, {**DISTILL, **LORA}):
        est = distill_estimate(settings, src, pruned)
        wait_for_memory(est, max_wait)
        avail = round(mem_available_gib(), 1)
        mode = "lora" if settings.get("lora") else "full"
        say(f"[{size}] distill ({mode}): estimate {est:.1f} GiB, {avail:.1f} GiB available")
        cmd = EDGESMITH + ["distill", "--teacher", str(src), "--student", str(pruned), "--data", str(DISTILL_DATA),
                           "--out", str(out)]
        for ov in distill_overrides(settings):
            cmd += ["--set", ov]
        log = logs / f"{size}-distill-{mode}.log"
        m = measure(cmd, log, ok=(0, 2))
        text = log.read_text(errors="replace")
        line = next((x for x in text.splitlines() if "estimated peak memory" in x), "")
        logged = re.search(r"estimated peak memory ([\d.]+) GiB", line)
        entry = {"date": time.strftime("%Y-%m-%d"), "settings": settings, "estimate_gib": float(logged.group(1)) if logged else est,
                 "mem_available_gib": avail, **m}
        if m.get("exit") == 2:
            if "exceeds" not in line or mode == "lora":
                raise SystemExit(f"distill ({mode}) failed (exit 2); see {log}:\n{text[-2000:]}")
            refused = {**entry, "message": line.strip()}
            say(f"[{size}] distill ({mode}) refused: {line.strip()}")
            continue
        info = json.loads((out / "distill.json").read_text())
        res = info["result"]
        entry.update({"estimate": line.removeprefix("distill: ").strip(), "lora": mode == "lora",
                      "trainable_params": res["trainable_params"], "steps": res["steps"], "stopped": res["stopped"],
                      "tokens": res["tokens"], "train_seconds": res["seconds"],
                      "tokens_per_s": info["train_tokens_per_s"], "precision": res["precision"],
                      "epochs": info["epochs"], "train_loss": res["train_loss"]})
        if refused:
            entry["refused"] = refused
        shutil.rmtree(out)
        return entry
    raise AssertionError("unreachable")


def run_size(size: str, root: Path, logs: Path, stages: list[str], row: dict | None, redo: bool, max_wait: float) -> dict:
    """Measure the `stages` of `size` not yet in `row` (all of them with `redo`); returns the updated row."""
    shape = SIZES[size]
    row = dict(row or {})
    todo = [st for st in stages if redo or st not in row]
    if not todo:
        say(f"[{size}] {', '.join(stages)} already measured (--redo to measure again)")
        return row
    src, pruned, export = root / f"llama-{size}", root / f"llama-{size}-pruned", root / f"llama-{size}-export"
    say(f"[{size}] to measure: {', '.join(todo)}; building {n_params(shape) / 1e9:.2f}B random bf16 checkpoint ...")
    t = time.perf_counter()
    build(size, src)
    build_s = round(time.perf_counter() - t, 1)
    row.update({"size": size, "shape": shape, "params": n_params(shape), "checkpoint_mib": round(dir_mib(src))})
    if "build_seconds" not in row or "prune" in todo:
        row["build_seconds"] = build_s
    I, L = shape["intermediate_size"] // 2, (3 * shape["num_hidden_layers"]) // 4
    pshape = dict(shape, intermediate_size=I, num_hidden_layers=L)
    say(f"[{size}] prune: MLP {shape['intermediate_size']} -> {I}, layers {shape['num_hidden_layers']} -> {L}"
        + ("" if "prune" in todo else " (the distill's student; prune itself is already recorded)"))
    pm = measure(EDGESMITH + ["prune", str(src), "--out", str(pruned), "--intermediate-size", str(I),
                              "--num-layers", str(L)], logs / f"{size}-prune.log")
    say(f"[{size}] prune {pm}")
    if "prune" in todo:
        row["prune"] = pm
    row["pruned_params"] = n_params(pshape)
    row["pruned_mib"] = round(dir_mib(pruned))
    row["pruned_files"] = sorted(f.name for f in pruned.iterdir() if "safetensors" in f.name)
    if "distill" not in todo:
        shutil.rmtree(src)  # disk: the largest checkpoint is not needed any more (distill's teacher needs it)
    if "export" in todo:
        say(f"[{size}] export F16 + Q4_K_M")
        row["export"] = measure(EDGESMITH + ["export", str(pruned), "--out", str(export), "--gguf", "F16,Q4_K_M"], logs / f"{size}-export.log")
        row["export_files"] = {f.name: round(f.stat().st_size / 2**20) for f in export.glob("*.gguf")}
        say(f"[{size}] export {row['export']}")
        shutil.rmtree(export)
    if "distill" in todo:
        d = distill_stage(size, src, pruned, root, logs, max_wait)
        if "prune" not in todo:
            d["student_prune"] = pm
        row["distill"] = d
        say(f"[{size}] distill {({k: d[k] for k in ('seconds', 'max_rss_mib', 'tree_rss_mib', 'estimate_gib', 'lora', 'steps', 'tokens', 'tokens_per_s')})}")
        shutil.rmtree(src)
    shutil.rmtree(pruned)
    return row


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def pruned_shape(shape: dict) -> dict:
    """The study's recipe: MLP halved, a quarter of the layers dropped."""
    return dict(shape, intermediate_size=shape["intermediate_size"] // 2, num_hidden_layers=(3 * shape["num_hidden_layers"]) // 4)


def distill_estimate_at(shape: dict, settings: dict, vocab: int = 49152, untied: bool = False, cached: bool = False) -> float:
    """distill's estimator (edgesmith.memory.training_memory, as check_memory_fits calls it) for a teacher of `shape`
    and its pruned student, in GiB, without any files: the extrapolation's second opinion. cached: the targets come
    from the teacher's cached top-k (data: teacher), the teacher is not in memory while the student trains."""
    from edgesmith.distill.distill import DistillConfig, lora_params
    from edgesmith.config import load_config
    from edgesmith.memory import ModelShape, training_memory

    cfg = load_config(DistillConfig, None, distill_overrides(settings))

    def ms(sh: dict) -> ModelShape:
        head = vocab * sh["hidden_size"] if untied else 0
        return ModelShape(n_params(sh, vocab) + head, sh["num_hidden_layers"], sh["hidden_size"], sh["intermediate_size"], vocab)

    teacher, student = ms(shape), ms(pruned_shape(shape))
    trainable = lora_params(student, cfg.lora_r) if cfg.lora else student.params
    parts = training_memory(student, trainable, cfg.train.batch_size, cfg.max_length, cfg.chunk_size,
                            cfg.train.grad_checkpointing, None if cached else teacher,
                            2 if cfg.teacher_dtype == "bfloat16" else 4, teacher_logits=not cached)
    return sum(parts.values()) / 2**30


def line_fit(rows: list[dict], get, p8: int, p8_real: int) -> dict:
    a, b = fit([r["params"] / 1e9 for r in rows], [get(r) for r in rows])
    return {"intercept": round(a, 1), "per_billion": round(b, 1), "at_8b": round(a + b * p8 / 1e9, 1),
            "at_llama31_8b": round(a + b * p8_real / 1e9, 1), "sizes": [r["size"] for r in rows]}


def report(rows: list[dict], env: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    p8 = n_params(EIGHT_B)
    p8_real = n_params(EIGHT_B, vocab=128256) + 128256 * EIGHT_B["hidden_size"]  # Llama 3.1 8B: 128k vocab, untied head
    extra = {}
    for stage in ("prune", "export"):
        have = [r for r in rows if stage in r]
        if len(have) >= 2:
            for k in ("max_rss_mib", "tree_rss_mib", "seconds"):
                extra[f"{stage}.{k}"] = line_fit(have, lambda r: r[stage][k], p8, p8_real)
    dist = [r for r in rows if "distill" in r]
    full = [r for r in dist if not r["distill"]["lora"]]
    if len(full) >= 2:  # a line through the full-parameter runs only: LoRA's memory is another line
        for k in ("max_rss_mib", "tree_rss_mib", "seconds"):
            extra[f"distill.{k}"] = line_fit(full, lambda r: r["distill"][k], p8, p8_real)
    est8 = {}
    if dist:
        for mode, settings, cached in (("full", DISTILL, False), ("lora", {**DISTILL, **LORA}, False),
                                       ("lora, cached teacher targets", {**DISTILL, **LORA}, True)):
            est8[mode] = {"at_8b": round(distill_estimate_at(EIGHT_B, settings, cached=cached), 1),
                          "at_llama31_8b": round(distill_estimate_at(EIGHT_B, settings, 128256, True, cached), 1)}
        extra["distill.estimate_gib"] = est8
    data = {"env": env, "rows": rows, "fit": extra, "eight_b_params": p8}
    (OUT / "scaling.json").write_text(json.dumps(data, indent=2) + "\n")

    def gib(mib):
        return f"{mib / 1024:.2f}"

    def settings_text(st: dict) -> str:
        return ", ".join(f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in st.items() if k != "train.progress")

    stages = "prune, export and a 2-minute distill" if dist else "prune + export"
    lines = [f"# Scaling: {stages} of 0.5B-3B Llama-family models on this machine", "",
             f"Machine: {env['cpus']} CPU cores, {env['mem_gib']} GiB RAM, no GPU; {env['date']}"
             + (f" (distill: {', '.join(sorted({r['distill']['date'] for r in dist}))})"
                if {r["distill"]["date"] for r in dist} - {env["date"]} else "")
             + ". The CPU was shared with other work while this ran: **times are approximate, peak RSS is not** "
             "(it does not depend on speed).",
             "Random-initialised bf16 checkpoints built from configs (`studies/scaling.py`), SmolLM2 tokenizer (vocab 49152), "
             "tied embeddings. Prune: MLP to half, a quarter of the layers dropped (activation ranking, block influence, "
             "16x256 calibration tokens, 4 held-out perplexity windows). Export: GGUF F16 + Q4_K_M of the pruned model."
             + (" Distill: the pruned model (student, loaded in fp32) learns from its unpruned source (teacher) on the "
                "Alpaca demo set (999 instructions, chat template, packed 512-token blocks, one per step), 2 minutes of "
                "training (`train.time_budget=2m`), the teacher in bf16 (`teacher_dtype=bfloat16`), gradient "
                "checkpointing, bf16 autocast (AMX), no validation split; full-parameter AdamW unless distill refuses it "
                "up front, then `lora=true` (rank 16 on every linear, merged on save)." if dist else ""),
             "Peak RSS: the largest process (kernel max RSS, `/usr/bin/time`), and the summed RSS of the process tree "
             "sampled 5x a second (the export runs llama.cpp's converter and quantiser as children).", ""]
    head = ("| model | params | checkpoint GiB | prune peak GiB (largest / tree) | peak / checkpoint | prune s | pruned params | "
            "export peak GiB (largest / tree) | export s |")
    rule = "|---|---|---|---|---|---|---|---|---|"
    if dist:
        head += " distill peak GiB (largest / tree) | distill s |"
        rule += "---|---|"
    lines += [head, rule]
    for r in rows:
        if "prune" not in r or "export" not in r:  # measured with --stages distill only
            continue
        p, e = r["prune"], r["export"]
        cells = (f"| {r['size']} | {r['params'] / 1e9:.2f}B | {gib(r['checkpoint_mib'])} | {gib(p['max_rss_mib'])} / "
                 f"{gib(p['tree_rss_mib'])} | {p['max_rss_mib'] / r['checkpoint_mib']:.2f}x | {p['seconds']:.0f} | "
                 f"{r['pruned_params'] / 1e9:.2f}B | {gib(e['max_rss_mib'])} / {gib(e['tree_rss_mib'])} | {e['seconds']:.0f} |")
        if dist:
            d = r.get("distill")
            cells += (f" {gib(d['max_rss_mib'])} / {gib(d['tree_rss_mib'])}{' (LoRA)' if d['lora'] else ''} | "
                      f"{d['seconds']:.0f} |" if d else " – | – |")
        lines.append(cells)
    lines += ["", "The peak's ratio to the checkpoint falls with size: about 0.5 GiB of every peak is the interpreter and "
              "libraries, and a few hundred MB the calibration and perplexity activations (4 windows x 256 tokens, logits "
              "over 49152 tokens), whatever the model size. The source checkpoint is memory-mapped (its pages count in RSS "
              "once), the pruned model is written one decoder layer at a time."]
    for size, b in BEFORE.items():
        r = next((r for r in rows if r["size"] == size), None)
        if r and "prune" in r:
            lines += ["", f"Before the memory-bounded prune (bf16 upcast to fp32, the pruned model built in memory, then "
                      f"cast and saved), the {size} prune peaked at {gib(b['prune_max_rss_mib'])} GiB "
                      f"({b['prune_max_rss_mib'] / r['checkpoint_mib']:.1f}x the checkpoint); now "
                      f"{gib(r['prune']['max_rss_mib'])} GiB."]
    if dist:
        lines += ["", "## Distill, 2 minutes of training", "",
                  "distill's own estimate is the line it prints before loading anything (`distill: estimated peak memory "
                  "...`; edgesmith/memory.py), the one it refuses on when it exceeds MemAvailable (shown at the start of "
                  "the run). Wall time is the stage's: loading, the 2-minute budget (the step under way when it runs out "
                  "finishes), merging and saving the student.", "",
                  "| model | teacher / student params | training | estimate GiB (available) | peak GiB (largest / tree) | "
                  "peak / estimate | wall s | train s | steps | tokens | tokens/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in dist:
            d = r["distill"]
            both = f"{r['params'] / 1e9:.2f}B / {r['pruned_params'] / 1e9:.2f}B"
            if d.get("refused"):
                f_ = d["refused"]
                lines.append(f"| {r['size']} | {both} | full: **refused** (exit 2 after {f_['seconds']:.0f} s, peak "
                             f"{gib(f_['max_rss_mib'])} GiB) | {f_['estimate_gib']:.1f} ({f_['mem_available_gib']:.1f}) | – | – | "
                             f"– | – | – | – | – |")
            mode = f"LoRA r16 ({d['trainable_params'] / 1e6:.1f}M trainable)" if d["lora"] else "full"
            lines.append(f"| {r['size']} | {both} | {mode} | {d['estimate_gib']:.1f} ({d['mem_available_gib']:.1f}) | "
                         f"{gib(d['max_rss_mib'])} / {gib(d['tree_rss_mib'])} | {d['max_rss_mib'] / 1024 / d['estimate_gib']:.2f} | "
                         f"{d['seconds']:.0f} | {d['train_seconds']:.0f} | {d['steps']} | {d['tokens']} | {d['tokens_per_s']:.1f} |")
        lines.append("")
        for r in dist:
            d = r["distill"]
            if d.get("refused"):
                lines.append(f"- {r['size']}: full-parameter training was refused before anything was loaded, "
                             f"`{d['refused']['message'].removeprefix('distill: ')}`; measured with `lora=true` instead.")
            elif d["lora"]:
                lines.append(f"- {r['size']}: trained with `lora=true`.")
            if d["max_rss_mib"] / 1024 > d["estimate_gib"]:
                lines.append(f"- {r['size']}: the measured peak is {d['max_rss_mib'] / 1024 / d['estimate_gib']:.2f}x "
                             f"distill's estimate: the estimate is not an upper bound for this run.")
        lines.append(f"- Settings: `{settings_text(DISTILL)}` (`--set KEY=VALUE`); "
                     f"the steps' precision: {', '.join(sorted({r['distill']['precision'] for r in dist}))}.")
        reruns = [r for r in dist if r["distill"].get("student_prune")]
        if reruns:
            lines.append("- The students came from prunes run again for the distill (prune itself was already recorded); "
                         "their peaks: " + ", ".join(f"{r['size']} {gib(r['distill']['student_prune']['max_rss_mib'])} GiB "
                                                     f"(recorded {gib(r['prune']['max_rss_mib'])})" for r in reruns) + ".")
    if extra:
        f = extra
        lines += ["", f"Least-squares line against parameters, extrapolated to Llama 3.1 8B's shape with this vocabulary "
                  f"({p8 / 1e9:.2f}B, {p8 * 2 / 2**30:.1f} GiB in bf16) and to Llama 3.1 8B itself (128k vocabulary, untied "
                  f"head: {p8_real / 1e9:.2f}B, {p8_real * 2 / 2**30:.1f} GiB). Same recipe (MLP halved, a quarter of the "
                  "layers dropped):", "",
                  f"| stage | peak RSS GiB per B params | peak RSS GiB at {p8 / 1e9:.2f}B | at {p8_real / 1e9:.2f}B | "
                  f"seconds at {p8_real / 1e9:.2f}B (approx.) |", "|---|---|---|---|---|"]
        for stage in ("prune", "export", "distill"):
            if f"{stage}.max_rss_mib" not in f:
                continue
            m, s = f[f"{stage}.max_rss_mib"], f[f"{stage}.seconds"]
            name = f"distill, full-parameter (line through {', '.join(m['sizes'])})" if stage == "distill" else stage
            lines.append(f"| {name} | {m['per_billion'] / 1024:.2f} | {m['at_8b'] / 1024:.1f} | {m['at_llama31_8b'] / 1024:.1f} | "
                         f"{s['at_llama31_8b']:.0f} |")
        if est8:
            ratios = [r["distill"]["max_rss_mib"] / 1024 / r["distill"]["estimate_gib"] for r in dist]
            lines += ["", f"distill's own estimator at the 8B shapes, same settings (student pruned by the same recipe; "
                      f"the measured peaks above were {min(ratios):.2f}-{max(ratios):.2f}x its estimates):", "",
                      f"| distill | estimate GiB at {p8 / 1e9:.2f}B | at {p8_real / 1e9:.2f}B |", "|---|---|---|",
                      f"| full-parameter | {est8['full']['at_8b']:.1f} | {est8['full']['at_llama31_8b']:.1f} |",
                      f"| `lora=true` | {est8['lora']['at_8b']:.1f} | {est8['lora']['at_llama31_8b']:.1f} |",
                      f"| `lora=true`, `data: teacher` (training on the teacher's cached top-k targets, no teacher in "
                      f"memory) | {est8['lora, cached teacher targets']['at_8b']:.1f} | "
                      f"{est8['lora, cached teacher targets']['at_llama31_8b']:.1f} |"]
            worst = max(1.0, *ratios)  # an estimate the measurements exceeded is scaled up by the worst ratio
            fits = [m for m, e in est8.items() if e["at_llama31_8b"] * worst + MEM_MARGIN_GIB <= env["mem_gib"]]
            if "full" in fits:
                verdict = "fits in full."
            elif "lora" in fits:
                verdict = "fits only with `lora=true`."
            elif fits:
                verdict = ("is refused even with `lora=true` (the student is held in fp32, LoRA or not, next to the "
                           "bf16 teacher); LoRA on a `data: teacher` corpus would fit (the teacher writes the corpus "
                           "first and is not in memory while the student trains).")
            else:
                verdict = "does not fit, even with `lora=true` on the teacher's cached targets."
            lines += ["", f"By these estimates (times {worst:.2f}, the worst measured peak / estimate, with "
                      f"{MEM_MARGIN_GIB} GiB to spare), on this {env['mem_gib']} GiB machine "
                      f"Llama 3.1 8B's distill {verdict}"]
    lines += ["", "Reproduce: `.venv/bin/python studies/scaling.py` (about as long as the table's times, plus building the "
              "checkpoints; needs ~4x the largest checkpoint free under /tmp). A stage already in scaling.json is skipped "
              "(`--redo` measures it again; `--stages distill` runs only that stage, re-creating the checkpoints it needs)."]
    (OUT / "scaling.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
    xs = [r["params"] / 1e9 for r in rows]
    for stage, mk in (("prune", "o"), ("export", "s")):
        have = [r for r in rows if stage in r]
        ax[0].plot([r["params"] / 1e9 for r in have], [r[stage]["max_rss_mib"] / 1024 for r in have], mk + "-", label=f"{stage} peak RSS")
        ax[1].plot([r["params"] / 1e9 for r in have], [r[stage]["seconds"] for r in have], mk + "-", label=stage)
    if dist:
        lora = [r for r in dist if r["distill"]["lora"]]
        color = None
        for group, fill, what in ((full, None, "full"), (lora, "none", "LoRA")):  # two settings: two lines
            if not group:
                continue
            gx = [r["params"] / 1e9 for r in group]
            ln = ax[0].plot(gx, [r["distill"]["max_rss_mib"] / 1024 for r in group], "^-", color=color, mfc=fill,
                            label=f"distill peak RSS (2 min, {what})")
            color = ln[0].get_color()
            ax[0].plot(gx, [r["distill"]["estimate_gib"] for r in group], "^:", color=color, mfc=fill, alpha=0.5,
                       label=f"distill's estimate ({what})")
        dx = [r["params"] / 1e9 for r in dist]
        ax[1].plot(dx, [r["distill"]["seconds"] for r in dist], "^-", label="distill (2 min budget)")
        for r in dist:
            d, x = r["distill"], r["params"] / 1e9
            if d["lora"]:
                ax[0].annotate("LoRA", (x, d["max_rss_mib"] / 1024), textcoords="offset points", xytext=(-30, 6))
            if d.get("refused"):
                y = d["refused"]["estimate_gib"]
                ax[0].plot([x], [y], "rx", ms=9)
                ax[0].annotate(f"full: estimate {y:.0f} GiB,\nrefused", (x, y), textcoords="offset points",
                               xytext=(-95, -10), fontsize=8)
    ax[0].plot(xs, [r["checkpoint_mib"] / 1024 for r in rows], "k--", label="bf16 checkpoint size")
    ax[0].axhline(env["mem_gib"], color="r", lw=0.8, label=f"RAM ({env['mem_gib']} GiB)")
    ax[0].set_xlabel("parameters (B)"), ax[0].set_ylabel("GiB"), ax[0].legend(fontsize=8), ax[0].set_title("peak memory")
    ax[1].set_xlabel("parameters (B)"), ax[1].set_ylabel("seconds (shared CPU: approximate)"), ax[1].legend(fontsize=8)
    ax[1].set_title("wall time")
    fig.tight_layout()
    fig.savefig(OUT / "scaling.png", dpi=120)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "build":
        build(sys.argv[2], Path(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5b,1b,3b")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"of {', '.join(STAGES)}")
    ap.add_argument("--redo", action="store_true", help="measure the stages again even where scaling.json has them")
    ap.add_argument("--tmp", default="/tmp", help="where the temporary checkpoints go")
    ap.add_argument("--mem-wait", type=float, default=3600,
                    help="seconds a large distill may wait for MemAvailable to hold it plus 3 GiB before giving up")
    ap.add_argument("--report-only", action="store_true", help="rewrite scaling.md/png from scaling.json, run nothing")
    args = ap.parse_args()
    if args.report_only:
        data = json.loads((OUT / "scaling.json").read_text())
        report(data["rows"], data["env"])
        say((OUT / "scaling.md").read_text())
        return 0
    sizes, stages = args.sizes.split(","), args.stages.split(",")
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"--sizes: unknown size {s!r} (choose from {', '.join(SIZES)})")
    for s in stages:
        if s not in STAGES:
            raise SystemExit(f"--stages: unknown stage {s!r} (choose from {', '.join(STAGES)})")
    if "distill" in stages and not DISTILL_DATA.is_file():
        raise SystemExit(f"distill: {DISTILL_DATA} is missing (the shared data folder)")
    free = shutil.disk_usage(args.tmp).free
    # the source, the pruned model and either the exported GGUFs or the distilled student (saved in fp32)
    need = max(n_params(SIZES[s]) * 2 + n_params(SIZES[s]) // 2 * (2 + (4 if "distill" in stages else 3)) for s in sizes)
    if free < need:
        raise SystemExit(f"{args.tmp}: {free / 2**30:.1f} GiB free, need ~{need / 2**30:.1f} GiB")
    import psutil

    env = {"cpus": os.cpu_count(), "mem_gib": round(psutil.virtual_memory().total / 2**30), "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d"), "shared_cpu": True}
    OUT.mkdir(parents=True, exist_ok=True)
    prev = json.loads((OUT / "scaling.json").read_text()) if (OUT / "scaling.json").is_file() else {"rows": []}
    rows = {r["size"]: r for r in prev["rows"]}
    env = prev.get("env") or env  # the machine of the first run; a stage measured later carries its own date
    with tempfile.TemporaryDirectory(prefix="es-scaling-", dir=args.tmp) as tmp:
        logs = Path(tmp) / "logs"
        logs.mkdir()
        for s in sizes:
            rows[s] = run_size(s, Path(tmp), logs, stages, rows.get(s), args.redo, args.mem_wait)
            ordered = [rows[k] for k in SIZES if k in rows]
            report(ordered, env)  # after every size: a later failure keeps what was measured
    say((OUT / "scaling.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
