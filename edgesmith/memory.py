"""Training memory, estimated before anything is loaded: the peak bytes of one training process by part (weights,
gradients, AdamW states, activations, a teacher), the moments a sharded run peaks, and the one-line refusal when the
estimate exceeds MemAvailable -- so a stage stops up front with the numbers instead of being killed by the kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import EdgesmithError
from .machine import mem_available

GIB = 2**30
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2}  # per trainable parameter (train.optimizer)
RUNTIME_BYTES = GIB  # python, torch, transformers, tokenizers, data: measured ~0.8-1 GiB before any model is loaded


@dataclass
class ModelShape:
    """What a memory estimate needs to know about a decoder (edgesmith.facts reads it from the files, no weights)."""

    params: int
    """Parameters (tied embeddings once)."""
    layers: int
    """Decoder layers."""
    hidden: int
    """Residual-stream width D."""
    intermediate: int
    """MLP width I."""
    vocab: int
    """Vocabulary size V."""

    @classmethod
    def of(cls, path) -> "ModelShape":
        from .facts import facts

        f = facts(path)
        return cls(f.params_total, f.num_layers, f.hidden_size, f.intermediate_size, f.vocab_size)

    def layer_params(self) -> int:
        """One decoder layer: q, k, v, o (k/v taken as wide as q: an upper bound under GQA) and the 3 MLP matrices."""
        return 4 * self.hidden * self.hidden + 3 * self.hidden * self.intermediate

    def outer_params(self) -> int:
        """Everything outside the decoder layers (embeddings, output head, final norm): FSDP's root unit."""
        return min(self.params, max(self.params - self.layers * self.layer_params(), self.vocab * self.hidden))


def training_memory(student: ModelShape, trainable: int, batch: int, seq_len: int, chunk: int,
                    grad_checkpointing: bool = False, teacher: ModelShape | None = None, teacher_bytes: int = 4,
                    teacher_logits: bool = True, shards: int = 1, optimizer: str = "adamw") -> dict[str, int]:
    """Peak bytes of one training process, by part (an upper bound for batches padded to seq_len):

    student weights   params x 4 (fp32 master weights; bf16 autocast casts per op)
    gradients         trainable x 4
    AdamW states      trainable x 8 (exp_avg, exp_avg_sq); adamw8bit: x 2 (8-bit moments; block scales ~1%)
    optimizer step    trainable x 4 (the foreach AdamW step's full-size temporaries; adamw8bit's CPU step too: its
                      measured peak saves 1.9 of the 2.5 GiB its moments save on a 0.45B model,
                      studies/results/optimizer-8bit.json)
                      sharded (sharding: fsdp over `shards` processes): these four / shards, plus
    gathered layers   the units FSDP holds whole while they run: the root (embeddings, head, final norm) through the
                      step, the running decoder layer and the next one (prefetched), with their gradients until the
                      reduce-scatter: 4 x (outer + 2 layers) + 4 x min(trainable, outer + layer); the teacher's
                      running and prefetched layers
    teacher weights   teacher params x teacher_bytes (0 when the targets come from the cached top-k); sharded, its
                      layers / shards (shard_frozen) and the rest (embeddings, head) whole
    activations       per token and layer autograd keeps ~10 D + 4 I floats (norm inputs/outputs, q/k/v/rope,
                      attention output, gate/up/act/product); with gradient checkpointing only each layer's input
                      (D) plus one layer recomputed. Plus the loss's logits chunk [chunk, V] x ~4 fp32 copies (x 2
                      more with full teacher logits) and the teacher's kept hidden states [(L_t+1), tokens, D_t].
    runtime           the interpreter and libraries
    Checked against /usr/bin/time on the demo's 97M student (teacher SmolLM2-135M in fp32, batch 4 x 256): 4.6 GiB
    estimated vs 4.4 measured; with gradient checkpointing 3.6 vs 3.6; tiny models 1.3 vs 0.9 (the runtime).
    """
    tokens = batch * seq_len
    per_layer = (10 * student.hidden + 4 * student.intermediate) * 4 * tokens   # bytes one layer's autograd keeps
    if grad_checkpointing:
        act = student.layers * student.hidden * 4 * tokens + per_layer
    else:
        act = student.layers * per_layer
    act += 4 * chunk * student.vocab * 4
    parts = {"student weights": -(-student.params * 4 // shards), "gradients": -(-trainable * 4 // shards),
             "AdamW states": -(-trainable * OPTIMIZER_STATE_BYTES[optimizer] // shards),
             "optimizer step": -(-trainable * 4 // shards)}
    if shards > 1:
        outer, layer = student.outer_params(), student.layer_params()
        parts["gathered layers"] = 4 * (outer + 2 * layer) + 4 * min(trainable, outer + layer)
    if teacher is not None:
        parts["teacher weights"] = teacher.params * teacher_bytes
        if shards > 1:
            parts["teacher weights"] = -(-teacher.params * teacher_bytes // shards) + teacher.outer_params() * teacher_bytes
            parts["gathered layers"] += 2 * teacher.layer_params() * teacher_bytes
        act += (teacher.layers + 1) * teacher.hidden * teacher_bytes * tokens           # output_hidden_states
        act += (4 * teacher.hidden + 3 * teacher.intermediate) * teacher_bytes * tokens  # one layer in flight
        if teacher_logits:
            act += 2 * chunk * teacher.vocab * 4
    parts["activations"] = act
    parts["runtime"] = RUNTIME_BYTES
    return parts


SHARDED_PARTS = ("student weights", "gradients", "AdamW states", "optimizer step")


@dataclass
class MemoryPhase:
    """One moment of a run's memory: the bytes each process holds, by part, and what the main process holds on top."""

    what: str
    """When: 'while training', ... (empty for a run with one moment worth estimating)."""
    each: dict[str, int]
    main: dict[str, int] = field(default_factory=dict)

    def total(self, processes: int) -> int:
        return sum(self.each.values()) * processes + sum(self.main.values())


def sharded_memory(training: dict[str, int], student: ModelShape, trainable: int, checkpoints: bool,
                   teacher_loaded: int = 0) -> list[MemoryPhase]:
    """The moments a sharded run peaks, `training` being one process's parts while it trains
    (training_memory(..., shards=N)):
    - training;
    - the whole teacher (`teacher_loaded` bytes) in every process, loaded before it is sharded;
    - the whole student in every process: it is loaded whole before being sharded, and `train` gathers it whole again
      at the end (AdamW states released first) next to the slices it trained;
    - with checkpoints (save_every; a signal writes one too), the main process gathering whole trainable weights and
      AdamW states to write them in the single-process layout, the others holding their slices.
    Checked with ru_maxrss on a 239M-parameter student (teacher 50M, fp32, 2 steps of batch 2 x 128 tokens): one
    process 5.0 GiB measured vs 6.1 estimated; sharded over 2 processes (batch 1 each, the teacher sharded too) 3.8
    and 3.9 vs 4.3 each."""
    held = {k: v for k, v in training.items() if k in ("teacher weights", "runtime")}
    slices = {"student weights": training["student weights"]}
    phases = [MemoryPhase("while training", training),
              MemoryPhase("while the whole student is loaded or gathered", {"whole student": student.params * 4, **slices, **held})]
    if teacher_loaded:
        phases.append(MemoryPhase("while the whole teacher is loaded", {"whole teacher": teacher_loaded,
                                                                        "runtime": training["runtime"]}))
    if checkpoints:
        phases.append(MemoryPhase("while the main process gathers a checkpoint",
                                  {**slices, "AdamW states": training["AdamW states"], **held},
                                  {"whole trainable weights": trainable * 4, "whole AdamW states": trainable * 8}))
    return phases


def check_memory(stage: str, parts: dict[str, int] | list[MemoryPhase], hints: str, processes: int = 1,
                 available: int | None = None, shards: int = 1) -> str:
    """Refuse up front (EdgesmithError, one line, exit 2) when the estimated peak of `processes` training processes on
    this machine exceeds MemAvailable, rather than being killed by the kernel mid-run; otherwise return the estimate as
    one line. parts: one process's peak by part, or the moments of a sharded run (sharded_memory), the largest counts;
    the line names it, its parts per process and what `shards` divides."""
    phases = parts if isinstance(parts, list) else [MemoryPhase("", parts)]
    peak = max(phases, key=lambda p: p.total(processes))
    total = peak.total(processes)
    avail = mem_available() if available is None else available

    def gib(v: int) -> str:
        return f"{v / GIB:.1f}"

    def note(k: str) -> str:
        if shards > 1 and k in SHARDED_PARTS:
            return f" (1/{shards})"
        if k == "teacher weights" and processes > 1:
            return f" (layers 1/{shards}, embeddings and head whole)" if shards > 1 else " (whole in each)"
        return ""

    detail = " + ".join(f"{k} {gib(v)}{note(k)}" for k, v in peak.each.items() if v)
    if processes > 1:
        detail = f"{processes} processes x {gib(sum(peak.each.values()))}: {detail}"
    if peak.main:
        detail += " + on the main process " + " + ".join(f"{k} {gib(v)}" for k, v in peak.main.items())
    line = f"estimated peak memory {gib(total)} GiB{' ' + peak.what if peak.what else ''} ({detail})"
    if avail is not None and total > avail:
        raise EdgesmithError(f"{stage}: {line} exceeds the {gib(avail)} GiB available (MemAvailable); {hints}")
    return line + (f" of {gib(avail)} GiB available" if avail is not None else "")
