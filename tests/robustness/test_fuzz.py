"""Hypothesis fuzz: mutated GGUF files, recipes (and export flags) and dataset files go through the real CLI
(`edgesmith.cli.main`, in-process for speed). Every case must end with exit 0 or exit 2 and one
`edgesmith CMD: error: ...` line: no traceback, no "internal error", no dead process. Derandomized, so CI
replays the same ~1,200 cases every run."""
from __future__ import annotations

import copy
import itertools
import json
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from robustness.conftest import REPO, assert_clean_error, cli, count

def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, phases=[Phase.explicit, Phase.generate], derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])

N_GGUF, N_RECIPE, N_EXPORT, N_DATA = 500, 110, 70, 330
_ids = itertools.count()


def _fresh(dirpath: Path, suffix: str) -> Path:
    # a new name per case: validation results are cached by (path, size, mtime), and mtimes are coarse
    return dirpath / f"case-{next(_ids)}{suffix}"


# ---------------------------------------------------------------- GGUF files

byte_edit = st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=8))
small_ints = st.sampled_from([0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 31, 32, 33, 255, 256, 1 << 16, 1 << 31, (1 << 32) - 1,
                              1 << 40, (1 << 63) - 1, (1 << 64) - 1])


@st.composite
def gguf_mutation(draw):
    kind = draw(st.sampled_from(["bytes", "int", "truncate", "insert", "delete"]))
    return kind, draw(st.floats(0, 1)), draw(st.binary(min_size=1, max_size=8)), draw(small_ints), draw(st.sampled_from([4, 8]))


@pytest.fixture(scope="module")
def gguf_seeds(tiny_gguf, tiny_gguf_q8):
    from edgesmith.gguf_check import validate_gguf

    return [(p.read_bytes(), validate_gguf(p)["data_offset"]) for p in (tiny_gguf, tiny_gguf_q8)]


def _mutate(data: bytes, header_end: int, muts) -> bytes:
    b = bytearray(data)
    for kind, where, blob, num, width in muts:
        # 90% of edits land in the header + tensor table, where a parser can go wrong
        span = header_end if where < 0.9 else len(b)
        pos = min(int(where / 0.9 * span) if where < 0.9 else int(where * len(b)), max(len(b) - 1, 0))
        if kind == "bytes":
            b[pos:pos + len(blob)] = blob
        elif kind == "int":
            b[pos:pos + width] = (num % (1 << (8 * width))).to_bytes(width, "little")
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = blob
        else:
            del b[pos:pos + len(blob)]
    return bytes(b)


@fuzz(N_GGUF)
@given(seed=st.integers(0, 1), muts=st.lists(gguf_mutation(), min_size=1, max_size=4))
def test_fuzz_gguf(gguf_seeds, tmp_path, seed, muts):
    data, header_end = gguf_seeds[seed]
    p = _fresh(tmp_path, ".gguf")
    p.write_bytes(_mutate(data, header_end, muts))
    rc, _, err = cli("info", p)
    assert_clean_error(rc, err, allow_ok=True)
    count("gguf")


# ---------------------------------------------------------------- recipes and flags

RECIPES = {name: yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text()) for name in ("prune-default", "distill-default", "lora-alpaca")}

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=12), st.sampled_from(["90M", "2:4", "0.5", "1e-3", "15m", "bf16", "lora", "magnitude",
                                                               "Q4_K_M", "-1", "", "default", "forward_kl", "yes"]))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)


@st.composite
def recipe_edit(draw, base: dict):
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "set", "add", "delete", "nested"]))
        keys = list(data) or ["x"]
        k = draw(st.sampled_from(keys))
        if op == "set":
            data[k] = draw(json_value)
        elif op == "add":
            data[draw(st.text(string.ascii_lowercase + "_.", min_size=1, max_size=12))] = draw(json_value)
        elif op == "delete":
            data.pop(k, None)
        elif isinstance(data.get("train"), dict):
            tk = draw(st.sampled_from(list(data["train"]) + ["no_such_knob"]))
            data["train"][tk] = draw(json_value)
    return data


def _yaml_text(data: dict, noise: tuple | None) -> str:
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    if noise:  # text-level damage: YAML syntax errors, tags, tabs, anchors
        where, junk = noise
        i = int(where * len(text))
        text = text[:i] + junk + text[i:]
    return text


yaml_noise = st.one_of(st.none(), st.tuples(st.floats(0, 1), st.sampled_from(
    [":", ": :", "[", "{", "\t", "&a", "*a", "!!python/object/apply:os.system ['true']", "- ", "'", '"', "%YAML 9\n",
     "\x00", "\n  bad indent: 1\n", "? ", "|", ">"])))


@pytest.fixture(scope="module")
def not_a_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("nomodel") / "empty-dir"
    d.mkdir()
    return d


def _recipe_case(tmp_path, data, noise, not_a_model, which):
    # a recipe that validates stops at the model (an empty directory): no case loads a real model, also when
    # the edit deleted the key (its default would be the real model)
    data[{"prune": "model", "finetune": "model", "distill": "student"}[which]] = str(not_a_model)
    p = _fresh(tmp_path, ".yaml")
    p.write_text(_yaml_text(data, noise), encoding="utf-8")
    return p


@fuzz(N_RECIPE)
@given(which=st.sampled_from(["prune", "distill", "finetune"]), data=st.data(), noise=yaml_noise)
def test_fuzz_recipes(tmp_path, not_a_model, shared_data, which, data, noise):
    base = {"prune": RECIPES["prune-default"], "distill": RECIPES["distill-default"], "finetune": RECIPES["lora-alpaca"]}[which]
    recipe = data.draw(recipe_edit(base))
    p = _recipe_case(tmp_path, recipe, noise, not_a_model, which)
    args = {"prune": ["prune", "--recipe", p, "--out", tmp_path / "out"],
            "distill": ["distill", "--recipe", p, "--student", not_a_model, "--out", tmp_path / "out"],
            "finetune": ["finetune", "--recipe", p, "--data", shared_data / "instruct" / "identity.json",
                         "--out", tmp_path / "out"]}[which]
    rc, _, err = cli(*args)
    assert_clean_error(rc, err)  # never 0: a valid recipe reaches the empty model directory
    count("recipes")


flag_text = st.one_of(st.text(string.ascii_letters + string.digits + "_,. -:", max_size=24),
                      st.lists(st.sampled_from(["F16", "Q4_K_M", "q8_0", "Q9_9", "IQ2_XXS", "none", "", "F64", "Q4_0", "int8", "int3"]),
                               max_size=4).map(",".join))


@fuzz(N_EXPORT)
@given(gguf=flag_text, onnx_quant=flag_text, threads=st.sampled_from(["0", "-1", "2", "x", "1e3"]), base=st.sampled_from(["F16", "BF16", "F32"]),
       modelfile=st.booleans(), out_is_file=st.booleans())
def test_fuzz_export_flags(tmp_path, not_a_model, gguf, onnx_quant, threads, base, modelfile, out_is_file):
    out = _fresh(tmp_path, "-export-out")
    if out_is_file:
        out.write_text("I am a file, not a directory")
    args = ["export", not_a_model, "--out", out, "--gguf", gguf, "--onnx-quant", onnx_quant, "--threads", threads, "--base", base]
    rc, _, err = cli(*args + (["--modelfile"] if modelfile else []))
    assert_clean_error(rc, err)
    count("recipes")


# ---------------------------------------------------------------- dataset files


def _seed_rows(shared_data: Path) -> dict[str, list]:
    alpaca = json.loads((shared_data / "instruct" / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:4]
    tools = json.loads((shared_data / "instruct" / "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))[:2]
    ident = json.loads((shared_data / "instruct" / "identity.json").read_text(encoding="utf-8"))[:3]
    return {"alpaca": alpaca, "sharegpt": tools, "identity": ident}


@st.composite
def row_edit(draw, rows: list):
    rows = copy.deepcopy(rows)
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(rows) - 1)) if rows else 0
        op = draw(st.sampled_from(["set", "set", "drop_key", "rename", "replace_row", "drop_row", "turns"]))
        if not rows:
            rows.append(draw(json_value))
            continue
        r = rows[i]
        if op == "replace_row" or not isinstance(r, dict):
            rows[i] = draw(json_value)
        elif op == "drop_row":
            rows.pop(i)
        elif not r:
            continue
        else:
            k = draw(st.sampled_from(sorted(r)))
            if op == "set":
                r[k] = draw(json_value)
            elif op == "drop_key":
                r.pop(k)
            elif op == "rename":
                r[draw(st.text(max_size=8))] = r.pop(k)
            elif op == "turns" and isinstance(r.get("conversations"), list) and r["conversations"]:
                j = draw(st.integers(0, len(r["conversations"]) - 1))
                t = r["conversations"][j]
                if isinstance(t, dict) and t:
                    t[draw(st.sampled_from(sorted(t)))] = draw(json_value)
    return rows


def _encode(text: str, enc: str) -> bytes:
    if enc == "utf-8-sig":
        return b"\xef\xbb\xbf" + text.encode("utf-8")
    return text.encode(enc, errors="replace")


@fuzz(N_DATA)
@given(seed=st.sampled_from(["alpaca", "sharegpt", "identity"]), layout=st.sampled_from(["json", "jsonl", "csv"]),
       data=st.data(), enc=st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]),
       cut=st.one_of(st.none(), st.floats(0, 1)), junk=st.one_of(st.none(), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=6))))
def test_fuzz_datasets(shared_data, byte_model, tmp_path, seed, layout, data, enc, cut, junk):
    rows = data.draw(row_edit(_seed_rows_cached(shared_data)[seed]))
    if layout == "json":
        text = json.dumps(rows, ensure_ascii=False, indent=1)
    elif layout == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        import csv
        import io

        keys = sorted({k for r in rows if isinstance(r, dict) for k in r if isinstance(k, str)}) or ["text"]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(keys)
        for r in rows:
            w.writerow([json.dumps(r.get(k)) if isinstance(r, dict) and isinstance(r.get(k), (list, dict)) else
                        (r.get(k, "") if isinstance(r, dict) else r) for k in keys])
        text = buf.getvalue()
    raw = _encode(text, enc)
    if cut is not None:
        raw = raw[: int(cut * len(raw))]
    if junk is not None:
        i = int(junk[0] * len(raw))
        raw = raw[:i] + junk[1] + raw[i:]
    p = _fresh(tmp_path, "." + layout)
    p.write_bytes(raw)
    rc, _, err = cli("data", "prepare", p, "--out", tmp_path / "prepared", "--model", byte_model)
    assert_clean_error(rc, err, allow_ok=True)
    count("datasets")


_SEEDS: dict = {}


def _seed_rows_cached(shared_data: Path) -> dict:
    if not _SEEDS:
        _SEEDS.update(_seed_rows(shared_data))
    return _SEEDS
