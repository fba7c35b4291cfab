"""Tiny real GGUF files written with gguf-py's GGUFWriter (the same writer llama.cpp's converter uses):
a llama-family model small enough that validating/fuzzing one takes a millisecond, yet complete
enough that llama.cpp itself loads it and decodes (byte-level BPE vocabulary, every block tensor)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def byte_vocab() -> list[str]:
    """GPT-2's byte -> printable-unicode alphabet: 256 single-byte tokens (no merges needed)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tiny_gguf(path: Path, *, arch: str = "llama", hidden: int = 64, ff: int = 128, layers: int = 1,
                    heads: int = 4, kv: int = 2, qtype: str = "F32", tokenizer_model: str = "gpt2",
                    skip_tensor: str | None = None, seed: int = 0) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    tokens = byte_vocab() + ["<|im_start|>", "<|im_end|>"]
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name("tiny-robustness")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_file_type(0 if qtype == "F32" else int(gguf.LlamaFileType.MOSTLY_Q8_0))
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3, 3])
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    hd = hidden // heads

    def t(name, *shape):  # numpy shape is [out, in]: gguf stores ne = [in, out]
        if name == skip_tensor:
            return
        a = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        if len(shape) == 1:
            a[:] = 1.0
        if qtype == "Q8_0" and len(shape) == 2:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)

    t("token_embd.weight", n_vocab, hidden)
    t("output_norm.weight", hidden)
    for b in range(layers):
        t(f"blk.{b}.attn_norm.weight", hidden)
        t(f"blk.{b}.attn_q.weight", heads * hd, hidden)
        t(f"blk.{b}.attn_k.weight", kv * hd, hidden)
        t(f"blk.{b}.attn_v.weight", kv * hd, hidden)
        t(f"blk.{b}.attn_output.weight", hidden, heads * hd)
        t(f"blk.{b}.ffn_norm.weight", hidden)
        t(f"blk.{b}.ffn_gate.weight", ff, hidden)
        t(f"blk.{b}.ffn_up.weight", ff, hidden)
        t(f"blk.{b}.ffn_down.weight", hidden, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
