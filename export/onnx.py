"""ONNX export: an HF Llama-family model -> a decoder with KV cache (optimum-onnx,
`text-generation-with-past`) that `optimum.onnxruntime.ORTModelForCausalLM` loads, plus optional
weight-only quantisation with onnxruntime (int8 / int4: `MatMulNBits` blocks; a tied embedding gathers its rows
from the lm_head's blocks, an untied one gets its own table).

Also `OnnxLM`, a small text generator over such a directory that needs only onnxruntime, numpy,
`tokenizers` (and jinja2 for chat templates): what `edgesmith chat` and the device benchmarks use
where torch is not installed.

Why the tied embedding is untied before quantising: optimum exports `lm_head` as
`MatMul(x, Transpose(embed_tokens))`, so no quantiser sees a constant lm_head weight, and the
embedding `Gather` is left in fp32 by default. In SmolLM2-135M the 49152x576 table is 21% of the
weights, which alone would keep an int4 file above 25% of fp32. We materialise the transpose as
its own initializer and quantise both the lm_head MatMul and the embedding Gather.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edgesmith.errors import EdgesmithError
from edgesmith.fsutil import atomic_dir, check_free_space, dir_size, quick_fingerprint

from .onnx_runtime import MODEL_FILE, OnnxLM, ppl_every_position

QUANTS = {None: "onnx-fp32", "int8": "onnx-int8", "int4": "onnx-int4"}
# the acceptance bar: quantised model file vs the fp32 one
MAX_SIZE_RATIO = {"int8": 0.40, "int4": 0.25}
PARITY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
)
PARITY_NEW_TOKENS = 32
# a fixed short English text for a cheap perplexity figure in every export's checks
PPL_TEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
    "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction, "
    "the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure in the "
    "world, a title it held for 41 years until the Chrysler Building in New York City was finished in 1930. "
    "It was the first structure to reach a height of 300 metres. Due to the addition of a broadcasting "
    "aerial at the top of the tower in 1957, it is now taller than the Chrysler Building by 5.2 metres."
)
PROVENANCE = "edgesmith_onnx.json"
INT4_BLOCK = 32  # MatMulNBits block size: 32 keeps 4-bit error low on 576-wide rows (576 = 18 * 32)
# 8-bit needs no small blocks: the largest of these dividing the model's widths (MatMulNBits pads a
# row to a block multiple, so 128 on SmolLM2's 576-wide rows would store 640 columns)
INT8_BLOCKS = (128, 64, 32, 16)


# ---------------------------------------------------------------- export


def _source_id(hf_dir: Path) -> dict:
    """What an fp32 export was made from, so a later quantised export can reuse it safely."""
    weights = sorted(p for p in hf_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"hf_dir": str(hf_dir.resolve()), "weights": {p.name: quick_fingerprint(p) for p in weights}}


def _export_fp32(hf_dir: Path, dest: Path) -> None:
    """optimum-onnx export of a decoder with past key values into `dest` (model.onnx + tokenizer files)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from optimum.exporters.onnx import main_export

    # do_validation=False: our own parity check below (greedy tokens with the KV cache) is stricter
    main_export(str(hf_dir), str(dest), task="text-generation-with-past", do_validation=False, local_files_only=True)
    if not (dest / MODEL_FILE).is_file():
        raise EdgesmithError(f"{hf_dir}: optimum-onnx produced no {MODEL_FILE}")
    _retie_exported(dest)
    # optimum copies tokenizer.json/config; make sure the chat template travels too
    for f in ("chat_template.jinja", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_dir / f).is_file() and not (dest / f).exists():
            shutil.copy(hf_dir / f, dest / f)


def _retie_lm_head(model) -> int:
    """The opposite of _untie_lm_head, for fp32: where the exporter stored a tied lm_head as its own constant
    [hidden, vocab] equal to the embedding table transposed (Gemma 3: a second 640 MiB copy of the 262k x 640
    table, 1.6x the checkpoint), point the MatMul at `Transpose(embedding)` instead and drop the copy. Returns how
    many copies were dropped. SmolLM2's export already has the Transpose form: nothing to do there."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    tables = {n.input[0] for n in g.node if n.op_type == "Gather" and n.input[0] in inits}
    done = 0
    for n in list(g.node):
        if n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        w = inits[n.input[1]]
        for t in tables:
            e = inits[t]
            if len(e.dims) != 2 or list(w.dims) != list(e.dims)[::-1] or e.data_type != w.data_type:
                continue
            if not np.array_equal(numpy_helper.to_array(w), numpy_helper.to_array(e).T):
                continue
            users = [u for u in g.node if n.input[1] in u.input]
            out = t + "_tied_T"
            if not any(x.output and x.output[0] == out for x in g.node):
                g.node.insert(list(g.node).index(n), helper.make_node("Transpose", [t], [out], perm=[1, 0], name=out))
            for u in users:
                u.input[:] = [out if i == n.input[1] else i for i in u.input]
            g.initializer.remove(w)
            del inits[w.name]
            done += 1
            break
    return done


def _retie_exported(d: Path) -> int:
    """_retie_lm_head on d/model.onnx, rewritten in place (external data files replaced) only if it changed."""
    import onnx

    model = onnx.load(str(d / MODEL_FILE))
    n = _retie_lm_head(model)
    if n:
        old = [f for f in d.iterdir() if f.name.startswith(MODEL_FILE)]
        for f in old:
            f.unlink()
        _save_onnx(model, d / MODEL_FILE)
    return n


def _untie_lm_head(model) -> int:
    """Replace lm_head's `MatMul(x, Transpose(W))` on a constant W by `MatMul(x, W_T)` with W_T a real
    initializer, so quantisers see (and shrink) it. Returns how many MatMuls were rewritten."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    done, drop = 0, []
    for n in list(g.node):
        if n.op_type != "Transpose" or n.input[0] not in inits:
            continue
        users = consumers.get(n.output[0], [])
        if not users or any(u.op_type != "MatMul" or u.input[1] != n.output[0] for u in users):
            continue
        w = numpy_helper.to_array(inits[n.input[0]])  # [vocab, hidden]
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), list(range(w.ndim))[::-1])
        wt = np.ascontiguousarray(np.transpose(w, perm))  # [hidden, vocab]
        name = n.input[0] + "_untied_T"
        g.initializer.append(numpy_helper.from_array(wt, name))
        for u in users:
            u.input[1] = name
        drop.append(n)
        done += 1
    for n in drop:
        g.node.remove(n)
    onnx.checker.check_model(model) if model.ByteSize() < 2**31 - 2**26 else None
    return done


def _save_onnx(model, path: Path) -> None:
    import onnx

    big = model.ByteSize() > 2**31 - 2**27  # protobuf's 2 GiB limit: larger models keep weights outside
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + ".data" if big else None)


def _quantize(src: Path, dest: Path, quant: str) -> dict:
    """Quantise src/model.onnx into dest/model.onnx (other files copied). Returns what was done."""
    import onnx

    for f in src.iterdir():
        if f.is_file() and f.name != PROVENANCE and not f.name.startswith(MODEL_FILE):
            shutil.copy(f, dest / f.name)
    model = onnx.load(str(src / MODEL_FILE))
    untied = _untie_lm_head(model)
    if quant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # MatMuls: weight-only 8-bit (MatMulNBits, activations stay fp32). quantize_dynamic on MatMuls
        # also quantises activations to uint8: on SmolLM2-135M that took short-text perplexity from 8.69
        # to 12.9 per-tensor, and its per-channel mode produced garbage (perplexity > 1e6).
        cfg = json.loads((src / "config.json").read_text())
        widths = [cfg.get("hidden_size", 0), cfg.get("intermediate_size", 0)]
        block = next((b for b in INT8_BLOCKS if all(w % b == 0 for w in widths)), INT8_BLOCKS[-1])
        model = _nbits(model, bits=8, block=block, ops=("MatMul",))
        shared = _gather_from_lm_head(model, bits=8, block=block)
        if shared:  # a tied table: the embedding reads lm_head's 8-bit blocks (one table in the file, not two)
            _save_onnx(model, dest / MODEL_FILE)
            return {"untied_lm_head": untied, "shared_embedding": shared,
                    "method": f"MatMulNBits 8-bit weight-only, block {block} (MatMul); GatherBlockQuantized on the "
                              "lm_head's blocks (tied embedding)"}
        # untied embedding Gather: quantize_dynamic stores the table in int8 and dequantises the gathered rows
        # (weights only: nothing else to quantise there). It wants files, so go through a temp dir.
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            tmp_model = Path(tmp) / MODEL_FILE
            _save_onnx(model, tmp_model)
            del model
            quantize_dynamic(str(tmp_model), str(dest / MODEL_FILE), weight_type=QuantType.QInt8, per_channel=False,
                             op_types_to_quantize=["Gather"],
                             use_external_data_format=tmp_model.stat().st_size > 2**31 - 2**27)
        return {"untied_lm_head": untied, "shared_embedding": 0,
                "method": f"MatMulNBits 8-bit weight-only, block {block} (MatMul); quantize_dynamic QInt8 (embedding Gather)"}
    if quant == "int4":
        model = _nbits(model, bits=4, block=INT4_BLOCK, ops=("MatMul",))
        shared = _gather_from_lm_head(model, bits=4, block=INT4_BLOCK)
        if not shared:  # an untied embedding gets its own 4-bit table
            model = _nbits(model, bits=4, block=INT4_BLOCK, ops=("Gather",))
        _save_onnx(model, dest / MODEL_FILE)
        return {"untied_lm_head": untied, "shared_embedding": shared,
                "method": f"MatMulNBits 4-bit symmetric, block {INT4_BLOCK} (MatMul); GatherBlockQuantized 4-bit "
                          + ("on the lm_head's blocks (tied embedding)" if shared else "(embedding)")}
    raise EdgesmithError(f"onnx quant {quant!r}: expected one of int8, int4")


def _gather_from_lm_head(model, bits: int, block: int) -> int:
    """A tied embedding quantised once: where the embedding Gather reads the fp32 table E [V, D] whose transpose
    _untie_lm_head handed to the lm_head (now MatMulNBits, symmetric: B [V, D/block, block*bits/8] uint8 + scales
    [V * D/block]), gather the rows from the lm_head's blocks instead, GatherBlockQuantized(Reshape(B) [V, D*bits/8],
    ids, Reshape(scales) [V, D/block]) -- same uint8 convention (zero point 2^(bits-1) when none is stored) -- and drop
    E. Without it the file holds the table twice (Gemma 3 270M: 262k x 640, 63% of the parameters). Returns how
    many Gathers now share."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    heads = {n.input[1]: n for n in g.node if n.op_type == "MatMulNBits"}
    done = 0
    for n in list(g.node):
        if n.op_type != "Gather" or n.input[0] not in inits:
            continue
        table = inits[n.input[0]]
        head = heads.get(f"{table.name}_untied_T_Q{bits}")
        if head is None or len(table.dims) != 2 or (len(head.input) > 3 and head.input[3]):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
        vocab, width = table.dims
        if (attrs.get("N"), attrs.get("K"), attrs.get("block_size"), attrs.get("bits")) != (vocab, width, block, bits) \
                or width % block or any(a.name == "axis" and a.i != 0 for a in n.attribute):
            continue
        shape = f"{table.name}_shared_rows"
        g.initializer.append(numpy_helper.from_array(np.array([vocab, -1], dtype=np.int64), shape))
        q, sc = f"{table.name}_shared_q{bits}", f"{table.name}_shared_scales"
        at = list(g.node).index(n)
        g.node.insert(at, helper.make_node("Reshape", [head.input[1], shape], [q], name=q))
        g.node.insert(at + 1, helper.make_node("Reshape", [head.input[2], shape], [sc], name=sc))
        g.node.insert(at + 2, helper.make_node("GatherBlockQuantized", [q, n.input[1], sc], [n.output[0]],
                                               name=f"{n.name or table.name}_shared", domain="com.microsoft",
                                               gather_axis=0, quantize_axis=1, block_size=block, bits=bits))
        g.node.remove(n)
        if not any(table.name in m.input for m in g.node):
            g.initializer.remove(table)
        done += 1
    return done


def _nbits(model, bits: int, block: int, ops: tuple[str, ...]):
    """onnxruntime's block-wise weight-only quantiser (MatMul -> MatMulNBits, Gather -> GatherBlockQuantized)."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4, bits=bits,
                                       op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))
    q = MatMulNBitsQuantizer(model, algo_config=cfg)
    q.process()
    return q.model.model


def onnx_model_bytes(d: Path) -> int:
    """Size of the model graph + weights (model.onnx and its external data), without tokenizer files."""
    return sum(f.stat().st_size for f in Path(d).iterdir() if f.is_file() and f.name.startswith(MODEL_FILE))


def _reusable_fp32(hf_dir: Path, out_dir: Path, fp32_dir: Path | None) -> Path | None:
    cands = [fp32_dir] if fp32_dir else [out_dir.parent / "onnx"]
    for c in cands:
        try:
            prov = json.loads((c / PROVENANCE).read_text())
        except (OSError, json.JSONDecodeError, TypeError):
            continue
        if prov.get("type") == QUANTS[None] and prov.get("source") == _source_id(hf_dir) and (c / MODEL_FILE).is_file():
            return c
    if fp32_dir:
        raise EdgesmithError(f"{fp32_dir}: not an fp32 ONNX export of {hf_dir} (missing or different {PROVENANCE})")
    return None


def export_onnx(hf_dir: Path, out_dir: Path, quant: str | None = None, check: bool = True,
                fp32_dir: Path | None = None, threads: int | None = None) -> dict:
    """Export `hf_dir` to ONNX in `out_dir` (atomically) and return its export.json entry.

    quant=None: fp32 with KV cache; "int8"/"int4": quantised from the fp32 export (`fp32_dir`, or a
    sibling `out_dir/../onnx` made from the same weights, or a fresh one in a temp dir).
    check=True: fp32 -> greedy parity with HF fp32 (3 prompts x 32 tokens, KV cache in use);
    int8/int4 -> runs, size ratio vs fp32, perplexity on a short text next to fp32's.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if quant not in QUANTS:
        raise EdgesmithError(f"onnx quant {quant!r}: expected one of int8, int4 (or none for fp32)")
    from edgesmith.hfdir import check_hf_dir

    check_hf_dir(hf_dir)
    weights = sum(p.stat().st_size for p in hf_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    check_free_space(out_dir.parent if out_dir.parent.exists() else Path.cwd(), 3 * weights, "the ONNX export")
    t0 = time.perf_counter()
    checks: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        if quant is None:
            _export_fp32(hf_dir, tmp)
            fp32 = tmp
            if check:
                checks.update(check_parity(hf_dir, tmp, threads=threads))
        else:
            with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".onnx-fp32-") as scratch:
                fp32 = _reusable_fp32(hf_dir, out_dir, fp32_dir)
                if fp32 is None:
                    fp32 = Path(scratch)
                    _export_fp32(hf_dir, fp32)
                checks.update(_quantize(fp32, tmp, quant))
                fp32_bytes, q_bytes = onnx_model_bytes(fp32), onnx_model_bytes(tmp)
                ratio = q_bytes / fp32_bytes
                checks.update(size_ratio_vs_fp32=round(ratio, 4), max_size_ratio=MAX_SIZE_RATIO[quant],
                              size_ratio_ok=ratio < MAX_SIZE_RATIO[quant], fp32_model_bytes=fp32_bytes, model_bytes=q_bytes)
                if check:
                    checks.update(check_quantized(tmp, fp32, threads=threads))
        prov = {"type": QUANTS[quant], "source": _source_id(hf_dir), "edgesmith_checks": checks}
        (tmp / PROVENANCE).write_text(json.dumps(prov, indent=2) + "\n")
    checks["seconds"] = round(time.perf_counter() - t0, 1)
    if quant and not checks["size_ratio_ok"]:
        print(f"edgesmith export: warning: {out_dir.name}: {quant} model is {checks['size_ratio_vs_fp32']:.1%} of fp32 "
              f"(target < {MAX_SIZE_RATIO[quant]:.0%})", file=sys.stderr)
    return {"path": str(out_dir), "type": QUANTS[quant], "size_bytes": dir_size(out_dir), "checks": checks}


# ---------------------------------------------------------------- checks


def hf_greedy(hf_dir: Path, ids: list[int], n: int) -> list[int]:
    """Reference: HF fp32 greedy decoding of exactly `n` tokens (no eos stop), using its KV cache."""
    import torch

    model = _hf_model(hf_dir)
    out, past = [], None
    x = torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(n):
            r = model(input_ids=x, past_key_values=past, use_cache=True)
            past = r.past_key_values
            nxt = int(r.logits[0, -1].argmax())
            out.append(nxt)
            x = torch.tensor([[nxt]])
    return out


_HF_CACHE: dict[str, Any] = {}


def _hf_model(hf_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    key = str(Path(hf_dir).resolve())
    if key not in _HF_CACHE:
        _HF_CACHE.clear()
        _HF_CACHE[key] = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return _HF_CACHE[key]


def check_parity(hf_dir: Path, onnx_dir: Path, prompts: Iterable[str] = PARITY_PROMPTS, n: int = PARITY_NEW_TOKENS,
                 threads: int | None = None) -> dict:
    """Greedy tokens from the ONNX export (KV cache) vs HF fp32; raises if any prompt differs."""
    lm = OnnxLM(onnx_dir, threads=threads)
    results = []
    for p in prompts:
        ids = lm.tokenize(p)
        ref = hf_greedy(hf_dir, ids, n)
        got = lm.generate(ids, n, eos_ids=())
        first_diff = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        results.append({"prompt_tokens": len(ids), "identical": ref == got, "first_diff": first_diff})
    _HF_CACHE.clear()
    ok = all(r["identical"] for r in results)
    if not ok:
        raise EdgesmithError(f"{onnx_dir}: ONNX greedy tokens differ from HF fp32 ({results})")
    ppl = lm.perplexity(lm.tokenize(PPL_TEXT))
    return {"greedy_parity": f"{len(results)} prompts x {n} tokens identical to HF fp32 (KV cache)",
            "parity_ok": ok, "perplexity_short_text": round(ppl, 4)}


def check_quantized(q_dir: Path, fp32_dir: Path, threads: int | None = None) -> dict:
    """A quantised export runs (greedy tokens, finite logits); perplexity next to fp32's on a short text."""
    q, f = OnnxLM(q_dir, threads=threads), OnnxLM(fp32_dir, threads=threads)
    ids = q.tokenize(PPL_TEXT)
    lq, lf = q.logits(ids), f.logits(ids)
    if not np.isfinite(lq).all():
        raise EdgesmithError(f"{q_dir}: quantised model produced non-finite logits")
    gen = q.generate(q.tokenize(PARITY_PROMPTS[0]), 8, eos_ids=())
    return {"runs": len(gen) == 8,
            "perplexity_short_text": round(ppl_every_position(lq, ids), 4), "fp32_perplexity_short_text": round(ppl_every_position(lf, ids), 4),
            "top1_agreement_vs_fp32": round(float((lq.argmax(-1) == lf.argmax(-1)).mean()), 4)}
