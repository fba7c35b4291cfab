"""`edgesmith report RESULTS...`: merge bench results (schema 1) into one markdown table and PNG
plots (accuracy vs size, decode tok/s vs size), written atomically to --out."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from edgesmith.errors import EdgesmithError
from edgesmith.fsutil import atomic_path, ensure_writable_dir, write_text

SCHEMA = 1


def load_results(paths: list[str]) -> list[dict]:
    """Every result row of every results JSON (files, or directories searched for *.json)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise EdgesmithError(f"{p}: no such results file or directory")
    rows = []
    for f in files:
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EdgesmithError(f"{f}: not a readable results JSON ({e})") from None
        if not isinstance(doc, dict) or "results" not in doc or "schema" not in doc:
            if any(p == str(f) for p in paths):
                raise EdgesmithError(f"{f}: not an edgesmith bench results file (no 'schema'/'results')")
            continue  # other JSON in a results directory
        if doc["schema"] != SCHEMA:
            raise EdgesmithError(f"{f}: results schema {doc['schema']} is not supported (expected {SCHEMA})")
        for r in doc["results"]:
            rows.append({**r, "_run": f.name, "_machine": (doc.get("machine") or {}).get("cpu", "?"),
                         "_threads": (doc.get("settings") or {}).get("threads")})
    if not rows:
        raise EdgesmithError(f"no bench results found in {', '.join(paths)}")
    return rows


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def columns(rows: list[dict]) -> tuple[list[str], list[str]]:
    mc, gen = [], []
    for r in rows:
        for k, v in (r.get("tasks") or {}).items():
            (mc if "acc" in v else gen).append(k)
    return list(dict.fromkeys(mc)), list(dict.fromkeys(gen))


def table(rows: list[dict], sep: str = "|") -> list[list[str]]:
    mc, gen = columns(rows)
    head = ["artifact", "backend", "MiB", "bpw", "ppl"] + [f"{t} acc/norm" for t in mc] + [f"{t} rougeL" for t in gen]
    head += ["KL", "top1 %", "load s", "TTFT ms", "pp512 tok/s", "tg128 tok/s", "peak MB"]
    out = [head]
    for r in rows:
        if "error" in r:
            out.append([Path(r["artifact"]).name, r.get("backend", "?"), "FAILED (see below)"] + [""] * (len(head) - 3))
            continue
        t = r.get("tasks") or {}
        a = r.get("agreement") or {}
        lat = r.get("latency") or {}
        ppl = r.get("perplexity") or {}
        row = [Path(r["artifact"]).name, r["backend"], _fmt(r.get("file_mb"), ".1f"), _fmt(r.get("bpw")), _fmt(ppl.get("value"), ".3f")]
        row += [f"{100 * t[k]['acc']:.1f} ± {100 * (t[k].get('acc_stderr') or 0):.1f} / {100 * t[k]['acc_norm']:.1f}"
                if k in t else "-" for k in mc]
        row += [_fmt(t[k]["rougeL"], ".3f") if k in t else "-" for k in gen]
        row += [_fmt(a.get("kl"), ".4f"), _fmt(100 * a["top1"] if "top1" in a else None, ".1f"), _fmt(lat.get("load_s")),
                _fmt(lat.get("ttft_ms"), ".0f"), _fmt(lat.get("prefill_tok_s"), ".1f"),
                f"{lat['decode_tok_s']:.1f} ± {lat['decode_tok_s_std']:.1f}" if "decode_tok_s" in lat else "-",
                _fmt(lat.get("peak_rss_mb", r.get("peak_rss_mb")), ".0f")]
        out.append(row)
    return out


def md_table(t: list[list[str]]) -> str:
    """header + rows of cells -> a markdown table"""
    return "\n".join(["| " + " | ".join(t[0]) + " |", "|" + "|".join("---" for _ in t[0]) + "|"]
                     + ["| " + " | ".join(r) + " |" for r in t[1:]])


def text_table(t: list[list[str]]) -> str:
    """header + rows of cells -> aligned columns for a terminal, columns with no value in any row left out"""
    keep = [i for i in range(len(t[0])) if any(r[i] not in ("-", "") for r in t[1:])] or list(range(len(t[0])))
    w = [max(len(r[i]) for r in t) for i in range(len(t[0]))]
    line = lambda r: "  ".join(r[i].ljust(w[i]) for i in keep)  # noqa: E731
    return "\n".join([line(t[0]), "  ".join("-" * w[i] for i in keep)] + [line(r) for r in t[1:]])


def markdown(rows: list[dict]) -> str:
    lines = [md_table(table(rows))]
    failed = [r for r in rows if "error" in r]
    if failed:  # the table marks the row; the message, whole, is here
        lines += ["", "Failed:", ""] + [f"- `{Path(r['artifact']).name}`: {r['error']}" for r in failed]
    return "\n".join(lines)


def terminal_table(doc: dict) -> str:
    return text_table(table(doc["results"]))


def _label(r: dict) -> str:
    name = Path(r["artifact"]).name
    return name[:-5] if name.endswith(".gguf") else name


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    ok = [r for r in rows if "error" not in r and r.get("file_mb")]
    markers = {"gguf": "o", "onnx": "s", "hf": "^"}
    mc, _ = columns(ok)

    def scatter(name, ylabel, value, title, err=None):
        pts = [(r["file_mb"], value(r), r) for r in ok if value(r) is not None]
        if not pts:
            return
        fig, ax = plt.subplots(figsize=(7, 4.5))
        placed: list[tuple[float, float]] = []
        for x, y, r in pts:
            e = err(r) if err else None
            if e:
                ax.errorbar(x, y, yerr=e, fmt="none", ecolor="0.5", capsize=3, lw=1)
            ax.scatter(x, y, marker=markers.get(r["backend"], "o"), s=40)
            # labels of nearby points are stacked instead of drawn over each other
            near = sum(1 for px, py in placed if abs(px - x) < 0.06 * (ax.get_xlim()[1] - ax.get_xlim()[0] or 1)
                       and abs(py - y) < 0.05 * (ax.get_ylim()[1] - ax.get_ylim()[0] or 1))
            placed.append((x, y))
            ax.annotate(_label(r), (x, y), fontsize=7, xytext=(4, 3 + 9 * near), textcoords="offset points")
        ax.set_xlabel("size on disk (MiB)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        made.append(path)

    if mc:
        def acc(r):
            t = r.get("tasks") or {}
            vals = [t[k]["acc"] for k in mc if k in t]
            return 100 * sum(vals) / len(vals) if vals else None
        def acc_se(r):  # standard error of the mean over tasks (independent items)
            t = r.get("tasks") or {}
            ses = [t[k].get("acc_stderr") for k in mc if k in t]
            if not ses or any(x is None for x in ses):
                return None
            return 100 * sum(x * x for x in ses) ** 0.5 / len(ses)
        scatter("accuracy_vs_size.png", f"mean acc % ({', '.join(mc)}), ± standard error", acc, "accuracy vs size", acc_se)
    scatter("perplexity_vs_size.png", "perplexity (lower is better)", lambda r: (r.get("perplexity") or {}).get("value"),
            "perplexity vs size")
    scatter("decode_vs_size.png", "decode tok/s (tg128)", lambda r: (r.get("latency") or {}).get("decode_tok_s"),
            "decode speed vs size")
    return made


def sweep_plot(doc: dict, path: Path) -> Path:
    """Two panels of a sweep (edgesmith/sweep.py): WikiText perplexity vs decode tok/s, and mean accuracy
    (± standard error) vs file size, one point per student labelled by its fraction, the teacher as a star, the
    Pareto front (faster and lower perplexity than any other student) joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, t, q = doc["points"], doc.get("teacher") or {}, doc["quant"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for p in pts:
        c = "tab:red" if p.get("pareto") else "tab:blue"
        if p.get("decode_tok_s") and p.get("wikitext_ppl"):
            a1.scatter(p["decode_tok_s"], p["wikitext_ppl"], color=c, s=40, zorder=3)
            a1.annotate(f"{p['fraction']:.0%}", (p["decode_tok_s"], p["wikitext_ppl"]), fontsize=8, xytext=(5, 4), textcoords="offset points")
        if p.get("file_mb") and p.get("mean_acc") is not None:
            a2.errorbar(p["file_mb"], 100 * p["mean_acc"], yerr=100 * (p.get("mean_acc_stderr") or 0), fmt="o", color=c, capsize=3)
            a2.annotate(f"{p['fraction']:.0%}", (p["file_mb"], 100 * p["mean_acc"]), fontsize=8, xytext=(5, 4), textcoords="offset points")
    front = sorted((p["decode_tok_s"], p["wikitext_ppl"]) for p in pts if p.get("pareto") and p.get("decode_tok_s") and p.get("wikitext_ppl"))
    if len(front) > 1:
        a1.plot(*zip(*front), color="tab:red", lw=1, alpha=0.6, label="Pareto front")
    if t.get("decode_tok_s") and t.get("wikitext_ppl"):
        a1.scatter(t["decode_tok_s"], t["wikitext_ppl"], marker="*", s=160, color="black", label="teacher", zorder=4)
    if t.get("file_mb") and t.get("mean_acc") is not None:
        a2.errorbar(t["file_mb"], 100 * t["mean_acc"], yerr=100 * (t.get("mean_acc_stderr") or 0), fmt="*", ms=12, color="black",
                    capsize=3, label="teacher")
    a1.set_yscale("log")
    a1.set_xlabel(f"{q} decode tok/s (tg128, this machine)")
    a1.set_ylabel("WikiText-2 perplexity (HF, lower is better)")
    a1.set_title("quality vs speed")
    a2.set_xlabel(f"{q} file size (MiB)")
    a2.set_ylabel("mean accuracy % ± standard error")
    a2.set_title("accuracy vs size")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------- a pipeline's report: teacher vs student, every format


def role(path: str, ctx_paths: dict) -> tuple[str, str]:
    """(model, format) of a bench row: teacher or student, and HF / GGUF <type> / ONNX <quant>."""
    p = Path(path)
    if p.suffix == ".gguf":
        fmt = "GGUF " + p.stem.rsplit("-", 1)[-1] if "-" in p.stem else "GGUF"
        if "." in p.stem and p.stem.rsplit(".", 1)[-1].upper() == p.stem.rsplit(".", 1)[-1]:
            fmt = "GGUF " + p.stem.rsplit(".", 1)[-1]  # SmolLM2-135M-Instruct.Q4_1.gguf
    elif any(p.glob("*.onnx")) if p.is_dir() else False:
        fmt = "ONNX " + (p.name.split("-", 1)[1] if "-" in p.name else "fp32")
    else:
        fmt = "HF fp32"
    export = ctx_paths.get("export")
    owner = "student" if export and str(p.resolve()).startswith(str(Path(export).resolve())) else None
    if owner is None:
        owner = "student" if ctx_paths.get("_model") and p.resolve() == Path(ctx_paths["_model"]).resolve() else "teacher"
    return owner, fmt


def params_of(path: str) -> tuple[int | None, int | None]:
    from edgesmith.facts import facts

    try:
        f = facts(path)
        return f.params_total, f.params_non_embedding
    except Exception:  # noqa: BLE001 - ONNX dirs etc.: filled from the model they were exported from
        return None, None


def join_runs(root: Path, ctx_paths: dict) -> list[dict]:
    """One row per (model, format), joining the WikiText and held-out-corpus bench runs."""
    docs = {n: json.loads((root / "bench" / f"{n}.json").read_text()) for n in ("wikitext", "corpus")
            if (root / "bench" / f"{n}.json").is_file()}
    rows: dict[str, dict] = {}
    for name, doc in docs.items():
        for r in doc["results"]:
            row = rows.setdefault(r["artifact"], {"artifact": r["artifact"], "backend": r.get("backend", "?")})
            if "error" in r:
                row["error"] = r["error"]
                continue
            if name == "wikitext" and "corpus" in (r.get("perplexity_on") or {}):
                row["corpus_ppl"] = r["perplexity_on"]["corpus"]["value"]
            if name == "corpus":
                row["corpus_ppl"] = (r.get("perplexity") or {}).get("value")
                for k in ("latency",):
                    if r.get(k) and not row.get(k):
                        row[k] = r[k]
                row.setdefault("file_mb", r.get("file_mb"))
                row.setdefault("bpw", r.get("bpw"))
                row.setdefault("agreement", r.get("agreement"))
            else:
                row.update({k: v for k, v in r.items() if k != "summary"})
    params = {}
    for a, row in rows.items():
        row["model"], row["format"] = role(a, ctx_paths)
        if row["format"] == "HF fp32":
            params[row["model"]] = params_of(a)
    for row in rows.values():
        row["params"], row["params_non_embedding"] = params.get(row["model"], (None, None))
    return list(rows.values())


def pipeline_table(rows: list[dict]) -> list[list[str]]:
    tasks = list(dict.fromkeys(k for r in rows for k, v in (r.get("tasks") or {}).items() if "acc" in v))
    head = ["model", "format", "params M", "MiB", "bpw", "WikiText ppl", "corpus ppl"] + [f"{t} acc %" for t in tasks]
    head += ["KL vs teacher", "top-1 %", "prefill tok/s", "decode tok/s", "TTFT ms", "peak MB"]
    out = [head]
    for r in rows:
        if "error" in r:
            out.append([r["model"], r["format"], "FAILED: " + r["error"][:80]] + [""] * (len(head) - 3))
            continue
        lat, a, t = r.get("latency") or {}, r.get("agreement") or {}, r.get("tasks") or {}
        out.append([r["model"], r["format"], _fmt(r["params"] / 1e6 if r.get("params") else None, ".1f"), _fmt(r.get("file_mb"), ".1f"),
                    _fmt(r.get("bpw")), _fmt((r.get("perplexity") or {}).get("value")), _fmt(r.get("corpus_ppl"))]
                   + [acc_text(t.get(k)) for k in tasks]
                   + [_fmt(a.get("kl"), ".4f"), _fmt(100 * a["top1"] if "top1" in a else None, ".1f"),
                      _fmt(lat.get("prefill_tok_s"), ".1f"),
                      f"{lat['decode_tok_s']:.1f} ± {lat.get('decode_tok_s_std', 0):.1f}" if "decode_tok_s" in lat else "-",
                      _fmt(lat.get("ttft_ms"), ".0f"), _fmt(lat.get("peak_rss_mb"), ".0f")])
    return out


def acc_text(v: dict | None) -> str:
    """accuracy % with its standard error, e.g. 46.2 ± 2.2"""
    if not v or "acc" not in v:
        return "-"
    se = v.get("acc_stderr")
    return f"{100 * v['acc']:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "winogrande": 0.5, "boolq": 0.5, "copa": 0.5}


def kept_fraction(student: dict, teacher: dict, task: str) -> float | None:
    """(student - chance) / (teacher - chance) for one task's accuracies, or None where the teacher is not more than
    two standard errors above chance (SmolLM2-135M's WinoGrande, 51.0 ± 2.2, is not: the ratio there is noise)."""
    if task not in CHANCE or "acc" not in student or "acc" not in teacher:
        return None
    margin = teacher["acc"] - CHANCE[task]
    if margin <= 2 * (teacher.get("acc_stderr") or 0) or margin <= 0:
        return None
    return (student["acc"] - CHANCE[task]) / margin


def kept_above_chance(student: dict, teacher: dict) -> float | None:
    """Mean of kept_fraction over the tasks both were scored on (task -> {acc, acc_stderr})."""
    fr = [f for t in student if t in teacher for f in [kept_fraction(student[t], teacher[t], t)] if f is not None]
    return sum(fr) / len(fr) if fr else None


def headline(rows: list[dict]) -> list[str]:
    """Teacher vs student in a few sentences: perplexity ratio, accuracy kept above chance (with whether each
    difference is outside noise: |diff| > 2·sqrt(se_t² + se_s²)), and Q4_K_M decode speed and size ratios."""
    by = {(r["model"], r["format"]): r for r in rows if "error" not in r}
    t, s = by.get(("teacher", "HF fp32")), by.get(("student", "HF fp32"))
    out = []
    if t and s and t.get("perplexity") and s.get("perplexity"):
        out.append(f"- WikiText ppl: student {s['perplexity']['value']:.2f} vs teacher {t['perplexity']['value']:.2f} "
                   f"(**{s['perplexity']['value'] / t['perplexity']['value']:.2f}×**); student non-embedding parameters "
                   f"{(s.get('params_non_embedding') or 0) / max(1, t.get('params_non_embedding') or 1):.0%} of the teacher's.")
    if t and s and t.get("tasks") and s.get("tasks"):
        kept = []
        for k in t["tasks"]:
            a, b = t["tasks"].get(k) or {}, s["tasks"].get(k) or {}
            if "acc" not in a or "acc" not in b:
                continue
            se = math.sqrt((a.get("acc_stderr") or 0) ** 2 + (b.get("acc_stderr") or 0) ** 2)
            d = b["acc"] - a["acc"]
            noise = "within noise" if abs(d) <= 2 * se else "outside noise"
            line = f"- {k} (n={b.get('n')}): student {acc_text(b)} vs teacher {acc_text(a)}: {100 * d:+.1f} points, {noise} (2σ = {200 * se:.1f})"
            f = kept_fraction(b, a, k)
            if f is not None:
                kept.append(f)
                line += f"; {f:.0%} of the teacher's accuracy above chance kept"
            out.append(line)
        if kept:
            out.append(f"- mean accuracy above chance kept: **{sum(kept) / len(kept):.0%}**")
    tq, sq = by.get(("teacher", "GGUF Q4_K_M")), by.get(("student", "GGUF Q4_K_M"))
    if tq and sq and (tq.get("latency") or {}).get("decode_tok_s") and (sq.get("latency") or {}).get("decode_tok_s"):
        tl, sl = tq["latency"], sq["latency"]
        out.append(f"- GGUF Q4_K_M decode: student {sl['decode_tok_s']:.1f} vs teacher {tl['decode_tok_s']:.1f} tok/s "
                   f"(**{sl['decode_tok_s'] / tl['decode_tok_s']:.2f}×**), prefill {sl.get('prefill_tok_s', 0) / max(1e-9, tl.get('prefill_tok_s', 1)):.2f}×, "
                   f"file {sq.get('file_mb', 0):.1f} vs {tq.get('file_mb', 0):.1f} MiB")
    return out


# ---------------------------------------------------------------- a pipeline's report (OUT/report/, the end-of-run summary)


def bench_rows(root: Path) -> list[dict]:
    """report_rows of a finished pipeline output root: the student is the last HF model a stage wrote."""
    from edgesmith.stages import ORDER

    ctx_paths = {s: str(root / s) for s in ORDER if (root / s).exists()}
    for s in ("merge", "distill", "prune"):
        if s in ctx_paths and (root / s / "config.json").is_file():
            ctx_paths["_model"] = ctx_paths[s]
            break
    return join_runs(root, ctx_paths)


def stage_times(root: Path) -> list[list[str]]:
    from edgesmith.stages import ORDER

    out = [["stage", "seconds", "finished output"]]
    for s in ORDER:
        m = root / s / "manifest.json"
        if m.is_file():
            d = json.loads(m.read_text())
            out.append([s, f"{d.get('seconds', 0):.1f}", f"{s}/ ({d.get('started', '')})"])
    return out


def write_report(root: Path, recipe, work: Path) -> Path:
    """OUT/report/{report.md, *.png} and a copy OUT/report.md with links into report/ (recipe: pipeline.Recipe)."""
    from edgesmith import __version__

    rows = bench_rows(root)
    md = [f"# {recipe.name}: edgesmith pipeline report", ""]
    if recipe.description:
        md += [recipe.description.strip(), ""]
    md += [f"Start model: `{recipe.model}`; output: `{root}`; edgesmith {__version__}; "
           f"{time.strftime('%Y-%m-%d %H:%M')}", ""]
    if rows:
        bench = root / "bench"
        # the machine and settings of a results document (not the stage's manifest.json, which has neither)
        doc = json.loads(next(p for p in (bench / "wikitext.json", bench / "corpus.json") if p.is_file()).read_text())
        mach = doc.get("machine", {})
        md += [f"Measured on {mach.get('cpu', '?')} ({mach.get('cores', '?')} cores, {doc.get('settings', {}).get('threads')} "
               f"threads). WikiText ppl: WikiText-2 raw test, llama-perplexity method (windows of "
               f"{doc.get('settings', {}).get('ctx')} tokens, second half scored). Corpus ppl: held-out slice of the "
               "teacher-generated distillation corpus. KL/top-1: agreement with the teacher's next-token distribution.", "",
               ]
        top = headline(rows)
        if top:
            md += ["## Teacher vs student", ""] + top + [""]
        md += ["## Every format", "", "Accuracy: % ± standard error.", "", md_table(pipeline_table(rows)), ""]
    md += ["## Stage times", "", md_table(stage_times(root)), ""]
    export = root / "export"
    if (export / "export.json").is_file():
        ex = json.loads((export / "export.json").read_text())
        mfs = sorted(p.name for p in export.glob("Modelfile.*"))
        md += ["## Ollama", "", f"GGUF files and Modelfiles side by side in `{export}`:", "", "```"]
        md += [f"ollama create {ex['name']}:{m.split('.', 1)[1].lower()} -f {export / m}" for m in mfs] + ["```", ""]
    pngs = plot([{**r, "artifact": f"{r['model']} {r['format']}"} for r in rows if "error" not in r], work) if rows else []
    md_body = "\n".join(md)
    write_text(work / "report.md", md_body + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n")
    write_text(root / "report.md", md_body + "\n" + "\n".join(f"![{p.stem}](report/{p.name})" for p in pngs) + "\n")
    return work / "report.md"


def summary(root: Path) -> str:
    """What the user sees at the end: where the Ollama-ready files are, and the table."""
    lines = []
    export = root / "export"
    if (export / "export.json").is_file():
        mfs = sorted(export.glob("Modelfile.*"))
        lines.append(f"Ollama-ready files (GGUF + Modelfile side by side): {export}")
        if mfs:
            name = json.loads((export / "export.json").read_text())["name"]
            pick = next((m for m in mfs if m.name == "Modelfile.Q4_K_M"), mfs[0])
            lines.append(f"  ollama create {name} -f {pick}")
    rows = bench_rows(root) if (root / "bench").is_dir() else []
    if rows:
        lines += ["", text_table(pipeline_table(rows))]
        top = headline(rows)
        if top:
            lines += ["", "Teacher vs student:"] + top
    if (root / "report.md").is_file():
        lines += ["", f"report: {root / 'report.md'}"]
    return "\n".join(lines)


def report(paths: list[str], out_dir: str | Path) -> Path:
    rows = load_results(paths)
    out = ensure_writable_dir(out_dir)
    pngs = plot(rows, out)
    machines = sorted({f"{r['_machine']} ({r['_threads']} threads)" for r in rows})
    md = ["# edgesmith bench report", "", f"Runs: {', '.join(sorted({r['_run'] for r in rows}))}  ",
          f"Machines: {'; '.join(machines)}", "", markdown(rows), ""]
    md += [f"![{p.stem}]({p.name})" for p in pngs]
    path = out / "report.md"
    write_text(path, "\n".join(md) + "\n")
    return path
