"""The teacher's top-k next-token log-probabilities, computed once over the training examples and kept on disk
(memory-mapped while the student trains), so the teacher need not run, or even be in memory, during training.
"""
from __future__ import annotations

from pathlib import Path

from edgesmith.data import IGNORE

from .losses import unwrap


def build_topk_cache(teacher, examples: list[dict], k: int, key: str, pad_id: int, batch_size: int = 8) -> Path:
    """Run the teacher once over `examples`; store top-k log-probs of every trained position.

    Layout (numpy, memory-mapped at training time): idx.npy int32 [R, k], logp.npy float16 [R, k],
    offsets.npy int64 [E+1] (rows of example e are offsets[e]:offsets[e+1], in position order).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from edgesmith.fsutil import atomic_dir, cache_dir, write_json
    from edgesmith.trainconfig import collate

    dest = cache_dir() / "teacher-topk" / key
    if (dest / "meta.json").is_file():
        return dest
    idx_rows, logp_rows, offsets = [], [], [0]
    head = unwrap(teacher).get_output_embeddings()
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            b = {k: v.to(head.weight.device) for k, v in collate(examples[s:s + batch_size], pad_id).items()}
            out = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True, logits_to_keep=1)
            h = out.hidden_states[-1][:, :-1]            # [B, L-1, H]
            m = b["labels"][:, 1:] != IGNORE             # [B, L-1]
            for e in range(h.shape[0]):
                rows = h[e][m[e]]                        # [n_e, H]
                for c in range(0, rows.shape[0], 256):
                    logp = F.log_softmax(head(rows[c:c + 256]).float(), -1)  # [c, V]
                    v, i = logp.topk(k, dim=-1)
                    idx_rows.append(i.to(torch.int32).cpu().numpy())
                    logp_rows.append(v.to(torch.float16).cpu().numpy())
                offsets.append(offsets[-1] + rows.shape[0])
    with atomic_dir(dest) as tmp:
        np.save(tmp / "idx.npy", np.concatenate(idx_rows) if idx_rows else np.zeros((0, k), np.int32))
        np.save(tmp / "logp.npy", np.concatenate(logp_rows) if logp_rows else np.zeros((0, k), np.float16))
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        write_json(tmp / "meta.json", {"k": k, "examples": len(examples), "rows": offsets[-1]})
    return dest


class TopkCache:
    def __init__(self, path: Path):
        import numpy as np

        self.idx = np.load(path / "idx.npy", mmap_mode="r")
        self.logp = np.load(path / "logp.npy", mmap_mode="r")
        self.offsets = np.load(path / "offsets.npy")

    def rows(self, example_ids, device, counts=None):
        """Concatenated rows of these examples (batch order) -> (idx [R, k] long, logp [R, k] float).
        counts: rows to take from the start of each example (an example truncated to max_length)."""
        import numpy as np
        import torch

        sl = [slice(int(self.offsets[e]), int(self.offsets[e + 1]) if counts is None else int(self.offsets[e]) + int(c))
              for e, c in zip(example_ids, counts if counts is not None else example_ids)]
        idx = torch.from_numpy(np.concatenate([self.idx[s] for s in sl]).astype(np.int64)).to(device)
        logp = torch.from_numpy(np.concatenate([self.logp[s] for s in sl]).astype(np.float32)).to(device)
        return idx, logp
