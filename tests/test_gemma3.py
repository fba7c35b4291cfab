"""Gemma 3, Qwen3 and Qwen2 beyond Llama, on tiny random configs (milliseconds to seconds each).

Pruning is exact (pruned logits == the original's with the removed units zeroed) on every supported axis: MLP
channels, query heads, whole layers, hidden channels (Qwen3 and Qwen2; refused for Gemma 3) and all together, with
Gemma 3's four norms per block, Qwen3's and Gemma 3's per-head q/k norms, Qwen2's q/k/v biases and sliding-window
layer types cut with the layers. Each family converts to GGUF, the original as F16 and a model pruned on every
supported axis as F32, whose llama.cpp logits equal HF's (a pruned Qwen2 as a Llama: llama.cpp's qwen2 graph needs
hidden == heads x head_dim), and exports to ONNX with KV cache whose prefill and cached one-token steps equal HF's.
Also: a SentencePiece tokenizer that disagrees with llama.cpp is refused; base models without a chat template get a
pass-through Modelfile and raw-text chat; hand-built sequences start with BOS where the tokenizer adds one. The real
Gemma 3 270M end to end is in tests/test_gemma3_real.py."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from edgesmith.compress.importance import Dims, magnitude_scores
from edgesmith.compress.prune import PruneConfig, run
from edgesmith.compress.surgery import acting_pruned, plan_keep, prune_model
from edgesmith.errors import EdgesmithError
from prune_ref import masked_reference, zero_eps

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            pad_token_id=2, tie_word_embeddings=True)


def tiny_gemma3(seed: int = 0, **kw):
    """A random Gemma 3 text model: 7 layers (5 sliding : 1 full, then sliding), window 4, 4 query heads on one
    KV head, GELU-tanh, q/k norms, norms that scale by (1 + w) (randomised, so the +1 matters)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(**{**TINY, "sliding_window": 4, "query_pre_attn_scalar": 32, "rms_norm_eps": 1e-6, **kw})
    m = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.3)
    return m


QWEN = {**TINY, "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 2, "rms_norm_eps": 1e-6}


def _tiny_qwen(model_cls, config_cls, seed: int, **kw):
    """3 layers, 6 query heads on 2 KV heads, norms (and biases, if any) randomised."""
    torch.manual_seed(seed)
    m = model_cls(config_cls(**{**QWEN, **kw})).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):  # Qwen2's q/k/v biases: zero at init, where a dropped one would not show
                p.normal_(0, 0.2)
    return m


def tiny_qwen3(seed: int = 0):
    """A random Qwen3: per-head q/k norms, no biases, heads of 32 (6 x 32 != hidden 64, as in the real Qwen3s)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _tiny_qwen(Qwen3ForCausalLM, Qwen3Config, seed)


def tiny_qwen2(seed: int = 0):
    """A random Qwen2: q/k/v projection biases, no q/k norms, heads of 16 (6 x 16 = hidden 96, as in the real Qwen2s,
    until query heads or hidden channels are pruned)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    m = _tiny_qwen(Qwen2ForCausalLM, Qwen2Config, seed, hidden_size=96, head_dim=16)
    assert m.model.layers[0].self_attn.q_proj.bias is not None
    return m


TINY_MODELS = {"gemma3": tiny_gemma3, "qwen3": tiny_qwen3, "qwen2": tiny_qwen2}
# targets for Gemma 3 (7 layers, 4 query heads on 1 KV head); QWEN_TARGETS overrides them for 3-layer, 6:2-head Qwen
AXES = {"mlp": dict(intermediate_size=64), "heads": dict(num_attention_heads=2), "layers": dict(num_layers=4),
        "hidden": dict(hidden_size=48),
        "all": dict(intermediate_size=64, num_attention_heads=2, num_layers=4, hidden_size=48)}
QWEN_TARGETS = dict(num_layers=2, num_attention_heads=4)  # 2 of 3 query heads in each of the 2 groups
SURGERY_CASES = [(f, a) for f in TINY_MODELS for a in AXES if (f, a) != ("gemma3", "hidden")]  # Gemma 3: refused


@pytest.mark.parametrize("family,axis", SURGERY_CASES)
def test_surgery_is_exact(family, axis):
    model = TINY_MODELS[family]()
    src = Dims.of(model.config)
    want = {k: QWEN_TARGETS.get(k, v) if family != "gemma3" else v for k, v in AXES[axis].items()}
    if family == "gemma3":
        want.pop("hidden_size", None)  # refused (test_gemma3_hidden_pruning_is_refused_other_axes_run)
    tgt = Dims(want.get("num_layers", src.num_layers), want.get("hidden_size", src.hidden_size),
               want.get("intermediate_size", src.intermediate_size),
               want.get("num_attention_heads", src.num_attention_heads), src.num_key_value_heads, src.head_dim)
    scores = magnitude_scores(model.state_dict(), src)
    layer_scores = torch.arange(src.num_layers, 0, -1).float()  # keep the first layers: drops the full-attention one
    if family == "gemma3":
        layer_scores[5] = 100.0  # ... but keep layer 5 (full attention) and drop sliding ones after it
    keep = plan_keep(scores, layer_scores, src, tgt)
    pruned, ref_model = prune_model(model, keep, tgt), masked_reference(model, keep, src)
    if tgt.hidden_size < src.hidden_size:  # eps is added to mean(x^2) over fewer channels
        pruned, ref_model = zero_eps(pruned), zero_eps(ref_model)
    ids = torch.randint(0, 49152, (2, 12))  # longer than the sliding window of 4: layer types matter
    with torch.no_grad():
        got = pruned(ids).logits
        ref = ref_model(ids).logits
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    if tgt.hidden_size < src.hidden_size:
        zero_eps(model)
    with torch.no_grad(), acting_pruned(model, keep):  # the --target-params search's way: hooks, nothing copied
        acted = model(ids).logits
    torch.testing.assert_close(acted, got, atol=2e-5, rtol=1e-4)
    c = pruned.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.head_dim) == \
        (tgt.num_layers, tgt.hidden_size, tgt.intermediate_size, tgt.num_attention_heads, src.head_dim)
    if getattr(model.config, "layer_types", None):
        assert c.layer_types == [model.config.layer_types[i] for i in keep.layers]
    if family == "gemma3" and "num_layers" in want:
        assert "full_attention" in c.layer_types and len(c.layer_types) == 4


def _save_tiny(model, dest, tokenizer_dir):
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(dest, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, dest / f.name)
    return dest


def test_gemma3_hidden_pruning_is_refused_other_axes_run(tmp_path, tokenizer_dir):
    d = _save_tiny(tiny_gemma3(), tmp_path / "g3", tokenizer_dir)
    with pytest.raises(EdgesmithError, match="hidden-size pruning is not supported for Gemma 3"):
        run(PruneConfig(model=str(d), out=str(tmp_path / "h"), hidden_size=32, importance="magnitude"), quiet=True)
    out = run(PruneConfig(model=str(d), out=str(tmp_path / "p"), intermediate_size=64, num_layers=6,
                          importance="magnitude", layer_importance="magnitude", round_to=32), quiet=True)
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(out)
    assert c.model_type == "gemma3_text" and c.intermediate_size == 64 and len(c.layer_types) == 6 == c.num_hidden_layers


def test_disagreeing_sentencepiece_tokenizer_is_refused(monkeypatch):
    from edgesmith import gguf_to_hf

    monkeypatch.setattr(gguf_to_hf, "tokenizer_disagreements", lambda p, tok, texts, isolated=True: [("Hello", [1, 2], [3])])
    with pytest.raises(EdgesmithError) as e:
        gguf_to_hf.check_tokenizer("m.gguf", None, ["Hello", "x"])
    msg = str(e.value)
    assert "\n" not in msg and "disagrees with llama.cpp's on 1 of 2" in msg and "refusing" in msg


def _pruned_for_export(family: str, model):
    """Gemma 3 loses layers 0 and 4 (types S S S F S: a sequence llama.cpp's default 5:1 sliding-window pattern
    would get wrong); Qwen loses its middle layer, a third of the MLP, one query head per group and hidden channels
    down to 48 (every supported axis at once)."""
    src = Dims.of(model.config)
    if family == "gemma3":
        tgt = Dims(5, src.hidden_size, src.intermediate_size, src.num_attention_heads, 1, src.head_dim)
        layer_scores = torch.tensor([1.0, 7, 6, 5, 4, 9, 8])
    else:
        tgt = Dims(2, 48, 64, 4, 2, src.head_dim)
        layer_scores = torch.tensor([3.0, 1, 2])
    pruned = prune_model(model, plan_keep(magnitude_scores(model.state_dict(), src), layer_scores, src, tgt), tgt)
    if family == "gemma3":
        assert pruned.config.layer_types == ["sliding_attention"] * 3 + ["full_attention", "sliding_attention"]
    return pruned


@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_tiny_gguf_logits_equal_hf(family, tmp_path, tokenizer_dir):
    """llama.cpp's converter on a Gemma 3 / Qwen3 / Qwen2 HF directory (Gemma 3: norms stored +1, layer types as
    llama.cpp's sliding-window pattern; Qwen2: q/k/v biases; Qwen3: head_dim != hidden / heads): the original's F16
    GGUF gives HF's logits within F16 rounding, the pruned one's F32 GGUF gives them exactly (to float noise), on a
    sequence longer than Gemma's window. One conversion per model and type: each takes ~15 s of imports."""
    from edgesmith import llamacpp
    from edgesmith.export.gguf_convert import convert
    from edgesmith.gguf_read import metadata
    from edgesmith.modelio import load_model, resolve
    from edgesmith.native import run_isolated

    model = TINY_MODELS[family](seed=1)
    ids = [1] + torch.randint(3, 49152, (15,), generator=torch.Generator().manual_seed(0)).tolist()
    for name, m, outtype in (("orig", model, "F16"), ("pruned", _pruned_for_export(family, model), "F32")):
        d = _save_tiny(m, tmp_path / name, tokenizer_dir)
        g = convert(d, tmp_path / f"{name}.gguf", outtype)
        # a Qwen2 whose hidden size is no longer heads x head_dim is converted as a Llama (gguf_convert._converter_view)
        assert metadata(g)["general.architecture"] == ("llama" if (family, name) == ("qwen2", "pruned") else family)
        if (family, name) == ("qwen2", "pruned"):  # and read back it would be a Llama without biases: refused
            with pytest.raises(EdgesmithError, match="'llama' GGUF with attention biases"):
                resolve(g)
        got = run_isolated(llamacpp.logits, str(g), ids, what="llama.cpp")
        with torch.no_grad():
            hf = m(torch.tensor([ids])).logits[0].numpy()
        tol = 1e-3 * max(1.0, np.abs(hf).max()) if outtype == "F32" else 0.05 * hf.std() + 1e-3
        assert np.abs(got - hf).max() < tol, (name, outtype, np.abs(got - hf).max(), tol)
        if (family, name) == ("qwen3", "orig"):  # and back: a Qwen3 GGUF loads as Qwen3ForCausalLM with HF's logits
            back = load_model(resolve(g))
            assert type(back).__name__ == "Qwen3ForCausalLM"
            with torch.no_grad():
                assert np.abs(back(torch.tensor([ids])).logits[0].numpy() - hf).max() < tol


def _no_template_dir(tmp_path, tokenizer_dir):
    """A tiny Gemma 3 without a chat template (a base model): SmolLM2's tokenizer minus its template."""
    import json

    d = _save_tiny(tiny_gemma3(), tmp_path / "base", tokenizer_dir)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_base_model_modelfile_passes_the_prompt_through(ollama, tmp_path, tokenizer_dir):
    from edgesmith.export.ollama import write_modelfile

    d = _no_template_dir(tmp_path, tokenizer_dir)
    entry = write_modelfile(tmp_path / "m-F16.gguf", d, tmp_path / "Modelfile.F16", "F16")
    text = (tmp_path / "Modelfile.F16").read_text()
    assert "TEMPLATE {{ .Prompt }}" in text and "no chat template" in text and "pass-through" in entry["checks"]["template"]
    assert ("template", "{{ .Prompt }}") in ollama.parse(text)
    for prompt in ("The capital of France is", "naïve {{ text }} \"\"\" with\nnewlines"):
        assert ollama.chat_prompt(text, [{"role": "user", "content": prompt}]) == prompt


def test_chat_on_a_base_model_warns_and_completes_raw_text(tmp_path, tokenizer_dir):
    import subprocess
    import sys

    from edgesmith.chat_backends import HFChat, raw_prompt

    d = _no_template_dir(tmp_path, tokenizer_dir)
    bot = HFChat(str(d))
    assert bot.raw and bot.prompt_text([{"role": "system", "content": "s"}, {"role": "user", "content": "Hi there"}]) == "Hi there"
    assert raw_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]) == "c"
    r = subprocess.run([sys.executable, "-m", "edgesmith", "chat", str(d), "--prompt", "The capital of France is",
                        "--max-new-tokens", "4", "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "has no chat template" in r.stderr and "raw text" in r.stderr and "4 new tokens" in r.stderr
    assert r.stdout.strip()  # a random model's 4 tokens: an answer, not an empty one


@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_tiny_onnx_parity_with_kv_cache(family, tmp_path, tokenizer_dir):
    """optimum-onnx's export with KV cache (gemma3_text / qwen3 / qwen2), the tied embedding stored once: logits equal HF's for a 20-token prefill
    and for 17 cached one-token steps, for Gemma 3 well past the sliding window of 4 (the sliding layers must drop
    the old keys)."""
    from edgesmith.export.onnx import export_onnx, onnx_model_bytes
    from edgesmith.export.onnx_runtime import OnnxLM

    model = TINY_MODELS[family](seed=2)
    d = _save_tiny(model, tmp_path / family, tokenizer_dir)
    export_onnx(d, tmp_path / "onnx", check=False)
    # a tied embedding is stored once (optimum writes Gemma 3's lm_head as a second, transposed copy: re-tied)
    weights = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    assert onnx_model_bytes(tmp_path / "onnx") < 1.2 * weights
    lm = OnnxLM(tmp_path / "onnx")
    ids = [1] + torch.randint(3, 49152, (19,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(lm.logits(ids) - hf).max() < 1e-4
    lg, past = lm._step(ids[:3], lm._empty_past(), 0)
    rows = list(lg)
    for i in range(3, len(ids)):
        lg, past = lm._step([ids[i]], past, i)
        rows.append(lg[-1])
    assert np.abs(np.array(rows) - hf).max() < 1e-4


def _bos_tokenizer(tokenizer_dir, dest):
    """The SmolLM2 tokenizer made to start every text with BOS (<|im_start|>, id 1), as Gemma's does."""
    import json

    from transformers import AutoTokenizer

    shutil.copytree(tokenizer_dir, dest)
    d = json.loads((dest / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    d["post_processor"] = {"type": "Sequence", "processors": [d["post_processor"], {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}]}
    (dest / "tokenizer.json").write_text(json.dumps(d))
    return AutoTokenizer.from_pretrained(dest)


def test_hand_built_sequences_start_with_bos_where_the_tokenizer_adds_it(tokenizer_dir, tmp_path):
    """Gemma's tokenizer starts every text with BOS and the model needs it (without it Gemma 3 270M's WikiText
    perplexity is 1.6x higher, and after <eos> alone it samples garbage): calibration windows, free-running teacher
    samples and encoded training records start with it; a tokenizer that adds none (SmolLM2) is left as it was."""
    from transformers import AutoTokenizer

    from edgesmith.compress.calibration import pack
    from edgesmith.data import IGNORE, encode_record
    from edgesmith.distill.teacher_data import text_seed
    from edgesmith.modelio import bos_prefix

    plain, bos = AutoTokenizer.from_pretrained(tokenizer_dir), _bos_tokenizer(tokenizer_dir, tmp_path / "bos")
    assert bos_prefix(plain) == [] and bos_prefix(bos) == [1]
    texts = ["The quick brown fox jumps over the lazy dog."] * 8
    w_plain, w_bos = pack(plain, texts, 16, 3), pack(bos, texts, 16, 3)
    assert w_plain.shape == w_bos.shape == (3, 16) and (w_bos[:, 0] == 1).all() and not (w_plain[:, 0] == 1).any()
    body = (plain(texts[0], add_special_tokens=False)["input_ids"] + [plain.eos_token_id]) * 2  # texts joined by eos
    assert w_plain[0].tolist() == body[:16] and w_bos[0].tolist() == [1] + body[:15]
    assert text_seed(bos, "science") == [1] + bos("Science", add_special_tokens=False)["input_ids"]
    assert text_seed(plain, "science")[0] == plain.convert_tokens_to_ids("<|endoftext|>")
    ex, _ = encode_record({"text": "hello world"}, bos, 64)
    assert ex["input_ids"][0] == 1 and ex["labels"][0] == IGNORE and ex["input_ids"][1:] == ex["labels"][1:]
    assert encode_record({"text": "hello world"}, plain, 64)[0]["input_ids"] == plain("hello world")["input_ids"]
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    ids = encode_record(chat, bos, 64)[0]["input_ids"]  # SmolLM2's template already starts with <|im_start|>: not twice
    assert ids[0] == 1 and ids[1] != 1
