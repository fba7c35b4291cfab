"""edgesmith finetune / merge: exact assistant-only masking, LoRA/DoRA/IA3 merges reproducing the adapted
model, refusals (prefix tuning, 4-bit merge, QLoRA on CPU), and an end-to-end run through the CLI."""
from __future__ import annotations

import json

import pytest

from edgesmith.errors import ConfigError, EdgesmithError
from edgesmith.data import IGNORE, encode_record


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _runs(ids, labels):
    """Contiguous runs of labelled tokens -> list of token-id lists."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def test_loss_only_on_assistant_tokens_exactly(tokenizer_dir):
    tok = _tok(tokenizer_dir)
    rec = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a primary colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And another one, please?"},
        {"role": "assistant", "content": "Blue, of course."},
    ]}
    ex, truncated = encode_record(rec, tok, max_length=4096)
    assert not truncated
    runs = _runs(ex["input_ids"], ex["labels"])
    # exactly the two answers, each followed by the end-of-turn token, and nothing else
    assert [tok.decode(r) for r in runs] == ["Red.<|im_end|>", "Blue, of course.<|im_end|>"]
    for r, answer in zip(runs, ["Red.", "Blue, of course."]):
        assert r == tok(answer + "<|im_end|>", add_special_tokens=False).input_ids
    # every prompt token (system, user turns, role headers) is masked
    n_masked = sum(1 for x in ex["labels"] if x == IGNORE)
    assert n_masked == len(ex["input_ids"]) - sum(len(r) for r in runs)
    assert tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE]).count("Name a primary colour.") == 1


def test_truncation_is_counted_and_plain_text_trains_every_token(tokenizer_dir):
    from edgesmith.data import encode_records

    tok = _tok(tokenizer_dir)
    long = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 200}]}
    exs, counts = encode_records([long, {"text": "plain text row"}], tok, max_length=32)
    assert counts["truncated"] == 1 and len(exs[0]["input_ids"]) == 32
    assert exs[1]["labels"] == exs[1]["input_ids"]


def test_method_registry_and_config_errors():
    from edgesmith.finetune.lora import METHODS, FinetuneConfig, peft_config

    assert set(METHODS) == {"lora", "dora", "ia3", "full"}
    for m in METHODS:
        cfg = FinetuneConfig(method=m)
        assert (peft_config(cfg) is None) == (m == "full")
    with pytest.raises(ConfigError, match="prefix tuning cannot be merged"):
        FinetuneConfig(method="prefix")
    with pytest.raises(ConfigError, match="lora_r"):
        FinetuneConfig(lora_r=0)
    lcfg = peft_config(FinetuneConfig())
    assert (lcfg.r, lcfg.lora_alpha) == (8, 16)
    assert set(lcfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_qlora_needs_cuda(tiny_llama, tmp_path):
    import torch

    from edgesmith.finetune.lora import FinetuneConfig, load_base

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(EdgesmithError, match="needs a CUDA GPU"):
        load_base(FinetuneConfig(model=str(tiny_llama), qlora=True))


@pytest.mark.gpu
def test_qlora_trains_and_merges_on_cuda(tiny_llama, tmp_path, shared_data):
    """QLoRA for real where a GPU is lent: 4-bit NF4 base (bitsandbytes), adapters learn, merged into 16 bits."""
    import json

    from edgesmith.finetune.lora import FinetuneConfig, run
    from edgesmith.finetune.merge import merge_adapter
    from edgesmith.modelio import load_model
    from edgesmith.trainconfig import TrainConfig

    out = run(FinetuneConfig(model=str(tiny_llama), data=str(shared_data / "instruct" / "identity.json"), out=str(tmp_path / "q"),
                             qlora=True, max_length=64,
                             train=TrainConfig(lr=5e-3, max_steps=20, warmup_steps=0, batch_size=4, precision="bf16",
                                               eval_every=10, progress=False)))
    res = json.loads((out / "finetune.json").read_text())["result"]
    assert res["best_val_loss"] < res["first_val_loss"] - 1e-3 and res["precision"] == "bf16"
    merged = merge_adapter(out, tmp_path / "merged", base=str(tiny_llama), dtype="bfloat16")
    assert str(load_model(merged).dtype) == "torch.bfloat16"


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merge_reproduces_the_adapted_model(tiny_llama, tmp_path, method):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from edgesmith.finetune.lora import FinetuneConfig, peft_config
    from edgesmith.finetune.merge import merge_adapter
    from edgesmith.hfdir import check_hf_dir

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), peft_config(FinetuneConfig(method=method)))
    with torch.no_grad():  # make the adapter non-trivial (LoRA's B starts at zero, IA3 at one)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    model.peft_config["default"].base_model_name_or_path = str(tiny_llama)
    model.save_pretrained(str(tmp_path / "adapter"))
    ids = torch.tensor([[1, 504, 3060, 282, 5248, 30, 2]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    out = merge_adapter(tmp_path / "adapter", tmp_path / "merged")  # base taken from the adapter config
    check_hf_dir(out)
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert _tok(out).chat_template  # chat template travels with the merged checkpoint


def test_merge_refuses_prefix_tuning_and_4bit(tiny_llama, tmp_path):
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgesmith.finetune.merge import merge_adapter

    m = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama)),
                       PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    m.save_pretrained(str(tmp_path / "prefix"))
    with pytest.raises(EdgesmithError, match="prefix tuning adapters cannot be merged"):
        merge_adapter(tmp_path / "prefix", tmp_path / "out", base=str(tiny_llama))
    with pytest.raises(EdgesmithError, match="never 4-bit"):
        merge_adapter(tmp_path / "prefix", tmp_path / "out", base=str(tiny_llama), dtype="int4")
    with pytest.raises(EdgesmithError, match="adapter_config.json missing"):
        merge_adapter(tmp_path, tmp_path / "out", base=str(tiny_llama))
    assert not (tmp_path / "out").exists()


def test_finetune_cli_end_to_end(tiny_llama, tmp_path, shared_data, capsys):
    """LoRA on 24 Alpaca rows through the CLI: validation loss goes down, adapter + manifest saved, merge works."""
    from edgesmith.cli import main

    out = tmp_path / "ft"
    rc = main(["finetune", "--model", str(tiny_llama), "--data", str(shared_data / "instruct" / "alpaca_en_demo.json"),
               "--out", str(out), "--max-examples", "24", "--max-length", "48", "--max-steps", "8", "--lr", "3e-2",
               "--batch-size", "4", "--eval-every", "4", "--eval-batches", "2", "--no-progress", "--set", "train.warmup_steps=1"])
    assert rc == 0
    man = json.loads((out / "finetune.json").read_text())
    res = man["result"]
    assert res["steps"] == 8 and res["best_val_loss"] < res["first_val_loss"] - 0.05  # first = before training
    assert man["data"]["train"]["truncated"] > 0  # 48 tokens is short for Alpaca: counted, not hidden
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["r"] == 8 and acfg["lora_alpha"] == 16 and acfg["base_model_name_or_path"] == str(tiny_llama)
    assert main(["merge", str(tiny_llama), str(out), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert "edgesmith merge" in capsys.readouterr().out
    # bad flag values are one-line errors naming the key
    assert main(["finetune", "--model", str(tiny_llama), "--data", "x.json", "--method", "prefix", "--out", str(tmp_path / "x")]) == 2
    assert "prefix tuning cannot be merged" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_default_model_lora_then_merge(default_hf, shared_data, tmp_path):
    """The real 135M model: a few LoRA steps on Alpaca lower the validation loss; the merged checkpoint
    equals the adapted model and still answers."""
    import torch

    from edgesmith.finetune.lora import FinetuneConfig, run
    from edgesmith.finetune.merge import merge_adapter
    from edgesmith.modelio import load
    from edgesmith.trainconfig import TrainConfig

    cfg = FinetuneConfig(model="default", data=str(shared_data / "instruct" / "alpaca_en_demo.json"), out=str(tmp_path / "ft"),
                         max_examples=32, max_length=128, val_fraction=0.02,
                         train=TrainConfig(lr=1e-3, max_steps=6, warmup_steps=1, batch_size=4, eval_every=3, eval_batches=2,
                                           progress=False, precision="bf16"))
    out = run(cfg)
    res = json.loads((out / "finetune.json").read_text())["result"]
    assert res["best_val_loss"] < res["first_val_loss"] - 1e-3  # learned: the baseline is not the best
    merged = merge_adapter(out, tmp_path / "merged")
    model, tok = load(merged)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
                                  return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
