"""Importance matrix (`--imatrix`): mean of x^2 per input column of every linear layer, gathered with
PyTorch forward hooks on calibration text and written in llama.cpp's GGUF imatrix format
(`<tensor>.in_sum2` + `<tensor>.counts`, what `llama-imatrix` writes); read back (GGUF or legacy .dat)
normalised the way llama.cpp's quantize tool does.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from edgesmith.errors import EdgesmithError
from edgesmith.fsutil import atomic_path

IMATRIX_CHUNK = 512      # tokens per calibration chunk (llama-imatrix's default n_ctx)
IMATRIX_MAX_CHUNKS = 32  # 16k tokens: enough for a stable per-column mean on small models, ~1 min CPU


def compute_imatrix(hf_dir: Path, calib: Path, out_path: Path, chunk: int = IMATRIX_CHUNK,
                    max_chunks: int = IMATRIX_MAX_CHUNKS, say: Callable[[str], None] = print) -> Path:
    """Mean of x^2 per input column of every nn.Linear over calibration text, saved as a llama.cpp
    GGUF imatrix (`<gguf tensor>.in_sum2` sums, `<gguf tensor>.counts` token counts)."""
    import gguf
    import numpy as np
    import torch

    from edgesmith.modelio import load

    calib = Path(calib)
    try:
        text = calib.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgesmithError(f"{calib}: cannot read calibration text ({e})") from None
    model, tok = load(hf_dir, dtype="float32")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
    step = chunk - (bos is not None)
    n = min(max_chunks, len(ids) // step)
    if n < 1:
        raise EdgesmithError(f"{calib}: calibration text too short: {len(ids)} tokens, need at least {step}")
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
            "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma3_text": gguf.MODEL_ARCH.GEMMA3}[model.config.model_type]
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(gname):
        def fn(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()  # x: [tokens, in]
            sums[gname] = sums.get(gname, 0) + (x * x).sum(0)         # -> [in]
            counts[gname] = counts.get(gname, 0) + x.shape[0]
        return fn

    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            gname = names.get_name(mname + ".weight", try_suffixes=(".weight",))
            if gname:
                hooks.append(mod.register_forward_hook(hook(gname)))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            piece = ids[i * step:(i + 1) * step]
            x = torch.tensor([([bos] if bos is not None else []) + piece])
            model(x)
    for h in hooks:
        h.remove()
    say(f"imatrix: {len(sums)} tensors from {n} chunks x {chunk} tokens of {calib.name} ({time.perf_counter() - t0:.0f}s)")
    with atomic_path(out_path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="imatrix")
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [calib.name])
        w.add_uint32("imatrix.chunk_count", n)
        w.add_uint32("imatrix.chunk_size", chunk)
        for gname in sorted(sums):
            w.add_tensor(gname + ".in_sum2", sums[gname].numpy().astype(np.float32))
            w.add_tensor(gname + ".counts", np.array([counts[gname]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out_path


def load_imatrix(path: Path) -> tuple[dict[str, Any], dict]:
    """An imatrix file (llama.cpp GGUF format or legacy .dat) -> ({tensor: mean x^2 [in]}, info),
    normalised exactly like llama.cpp's quantize tool does."""
    import numpy as np

    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    data: dict[str, Any] = {}
    info: dict[str, Any] = {"file": str(path)}
    if magic == b"GGUF":
        from edgesmith.gguf_read import read

        r = read(path)
        t = {x["name"]: np.asarray(r.tensor_array(x["name"]), dtype=np.float32).reshape(-1) for x in r.tensors}
        for key in t:
            if not key.endswith(".in_sum2"):
                continue
            base = key[: -len(".in_sum2")]
            if base + ".counts" not in t:
                raise EdgesmithError(f"{path}: imatrix has sums but no counts for {base}")
            sums, cnt = t[key], t[base + ".counts"]
            per = sums.reshape(len(cnt), -1)  # [experts, in]
            data[base] = np.where(cnt[:, None] > 0, per / np.maximum(cnt[:, None], 1), 1.0).reshape(-1).astype(np.float32)
        for k in ("imatrix.chunk_count", "imatrix.chunk_size"):
            if k in r.fields:
                info[k.split(".")[1]] = int(r.fields[k])
        if "imatrix.datasets" in r.fields:
            info["datasets"] = r.fields["imatrix.datasets"]
    else:  # legacy: n_entries, then (len, name, ncall, nval, float[nval]) per entry
        raw = path.read_bytes()
        try:
            off = 0
            (n,) = np.frombuffer(raw, np.int32, 1, off); off += 4
            for _ in range(int(n)):
                (ln,) = np.frombuffer(raw, np.int32, 1, off); off += 4
                name = raw[off:off + ln].decode(); off += ln
                ncall, nval = np.frombuffer(raw, np.int32, 2, off); off += 8
                vals = np.frombuffer(raw, np.float32, int(nval), off); off += 4 * int(nval)
                data[name] = (vals / ncall if ncall > 0 else vals).astype(np.float32)
        except (ValueError, UnicodeDecodeError):
            raise EdgesmithError(f"{path}: not an imatrix file (GGUF imatrix or legacy .dat)") from None
    if not data:
        raise EdgesmithError(f"{path}: imatrix file holds no entries")
    bad = [k for k, v in data.items() if not np.isfinite(v).all()]
    if bad:
        raise EdgesmithError(f"{path}: imatrix has non-finite values for {bad[0]}")
    info["entries"] = len(data)
    return data, info


def is_imatrix_file(path: Path) -> bool:
    """True for a GGUF imatrix or a legacy .dat; False for calibration text."""
    path = Path(path)
    if path.suffix in (".dat", ".imatrix"):
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        return False
    from edgesmith.gguf_read import metadata

    return metadata(path).get("general.type") == "imatrix"
