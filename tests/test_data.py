"""Data I/O on the real shared datasets and on hand-made malformed files."""
import json

import pytest

from edgesmith.data import RowError, read_records, render
from edgesmith.prepare import PrepareConfig, prepare
from edgesmith.errors import ConfigError, EdgesmithError


def test_alpaca_en_zh(shared_data):
    for name, n in (("alpaca_en_demo.json", 999), ("alpaca_zh_demo.json", 1000), ("identity.json", 91)):
        recs, bad = read_records(shared_data / "instruct" / name)
        assert len(recs) == n and not bad
        m = recs[0]["messages"]
        assert [x["role"] for x in m] == ["user", "assistant"] and m[1]["content"]
    recs, _ = read_records(shared_data / "instruct" / "alpaca_zh_demo.json")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in recs[0]["messages"][0]["content"])


def test_sharegpt_with_tools(shared_data):
    recs, bad = read_records(shared_data / "instruct" / "glaive_toolcall_en_demo.json")
    assert len(recs) == 300 and not bad
    with_tools = [r for r in recs if r.get("tools")]
    assert with_tools and isinstance(with_tools[0]["tools"], list) and "name" in with_tools[0]["tools"][0]
    roles = {m["role"] for r in recs for m in r["messages"]}
    assert roles <= {"user", "assistant", "tool", "system"} and "tool" in roles


def test_formats_and_columns(tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"question": "2+2?", "answer": "4"}\n\n{"question": "3+3?", "answer": 6}\n')
    recs, _ = read_records(tmp_path / "qa.jsonl")
    assert recs[1]["messages"][1]["content"] == "6"
    (tmp_path / "m.json").write_text(json.dumps({"data": [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]}))
    assert read_records(tmp_path / "m.json")[0][0]["messages"][0]["role"] == "system"
    (tmp_path / "t.csv").write_text("prompt,response\nhello,world\n\"a, b\",c\n")
    recs, _ = read_records(tmp_path / "t.csv", columns="instruction=prompt,output=response")
    assert recs[1]["messages"][0]["content"] == "a, b" and recs[1]["messages"][1]["content"] == "c"
    (tmp_path / "p.txt").write_text("para one\nline two\n\n\npara two\n")
    assert [r["text"] for r in read_records(tmp_path / "p.txt")[0]] == ["para one\nline two", "para two"]


def test_parquet_and_datasets_dir(tmp_path):
    import datasets
    ds = datasets.Dataset.from_list([{"instruction": "i", "input": "x", "output": "o"}] * 3)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    recs, _ = read_records(tmp_path / "d.parquet")
    assert len(recs) == 3 and recs[0]["messages"][0]["content"] == "i\n\nx"
    ds.save_to_disk(str(tmp_path / "dsdir"))
    assert len(read_records(tmp_path / "dsdir")[0]) == 3


def test_malformed_rows_named(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 5.5, "input": ["x"]}\n{"instruction": "c"\n')
    with pytest.raises(RowError, match=r"bad\.jsonl: row 2: field 'input': expected a string"):
        read_records(f)
    g = tmp_path / "g.jsonl"
    g.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"\n{"conversations": [{"from": "alien", "value": "x"}]}\n{"instruction": "d", "output": "e"}\n')
    recs, bad = read_records(g, skip_bad=True)
    assert len(recs) == 2
    assert [(b["row"], b["field"]) for b in bad] == [(2, "-"), (3, "conversations[0].from")]
    with pytest.raises(RowError, match=r"row 2: field '-': invalid JSON"):
        read_records(g)


@pytest.mark.parametrize("content,msg", [
    (b"", "file is empty"),
    (b"\xff\xfe\x00bad", "not UTF-8"),
    (b"[1, 2", "invalid JSON at line 1"),
    (b'{"foo": 1}', "cannot tell the format"),
])
def test_bad_files(tmp_path, content, msg):
    f = tmp_path / "x.json"
    f.write_bytes(content)
    with pytest.raises(EdgesmithError, match=msg):
        read_records(f)


def test_prepare_config_validation():
    with pytest.raises(ConfigError, match="split"):
        PrepareConfig(inputs=["x"], split=[0.5, 0.5, 0.5])


def test_prepare_splits_and_summary(shared_data, tiny_llama, tmp_path):
    src = shared_data / "instruct" / "alpaca_en_demo.json"
    cfg = PrepareConfig(inputs=[str(src)], out=str(tmp_path / "a"), model=str(tiny_llama), max_length=256, seed=3)
    out = prepare(cfg)
    s = json.loads((out / "summary.json").read_text())
    assert s["kept"] + s["dropped"]["too_long"] + s["dropped"]["empty_output"] == 999
    assert s["dropped"]["too_long"] > 0 and s["tokens"]["max"] <= 256
    assert sum(s["counts"].values()) == s["kept"]
    rows = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert rows[0]["text"].startswith("<|im_start|>") and rows[0]["messages"][-1]["role"] == "assistant"
    # same seed -> same split
    out2 = prepare(PrepareConfig(inputs=[str(src)], out=str(tmp_path / "b"), model=str(tiny_llama), max_length=256, seed=3))
    assert (out / "test.jsonl").read_text() == (out2 / "test.jsonl").read_text()


def test_render_generation_prompt(tiny_llama):
    from edgesmith.modelio import load_tokenizer
    tok = load_tokenizer(tiny_llama)
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    full, prompt = render(rec, tok), render(rec, tok, add_generation_prompt=True)
    assert full.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n") and "yo" not in prompt
