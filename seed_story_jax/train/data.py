"""Examples → per-step global batches, each process reading only the rows its devices hold.

Step i's global batch is examples [i·B, (i+1)·B) of the shuffled, repeated dataset, whatever the
number of processes or the mesh; a process reads exactly the rows that its devices' batch shards
cover. The iterator's state is the step index (grain `get_state`/`set_state`), the same in every
process, so a run resumes on a different process count or mesh with the same batches.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import jax
import numpy as np


class SyntheticLM:
    """Random tokens with structure: x[t+1] = perm[x[t]] with probability `p_follow`, else uniform.
    A model can learn it (cross-entropy floor ≈ (1−p)·ln V + H(p)), so the loss must fall."""

    def __init__(self, vocab_size: int, seq_len: int, num_examples: int, seed: int = 0, p_follow: float = 0.9):
        self.vocab_size, self.seq_len, self.num_examples, self.seed, self.p_follow = (
            vocab_size, seq_len, num_examples, seed, p_follow)
        self.perm = np.random.default_rng([seed, 7]).permutation(vocab_size)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, int(i)])
        x = np.empty(self.seq_len + 1, np.int64)
        x[0] = rng.integers(self.vocab_size)
        follow = rng.random(self.seq_len) < self.p_follow
        noise = rng.integers(self.vocab_size, size=self.seq_len)
        for t in range(self.seq_len):
            x[t + 1] = self.perm[x[t]] if follow[t] else noise[t]
        return {"input_ids": x[:-1].astype(np.int32), "labels": x[1:].astype(np.int32)}

    def __repr__(self) -> str:  # grain checkpoints compare data sources by repr
        return (f"SyntheticLM(vocab_size={self.vocab_size}, seq_len={self.seq_len}, "
                f"num_examples={self.num_examples}, seed={self.seed}, p_follow={self.p_follow})")


class StepBatches(grain.MapDataset):
    """Element i = this process's rows of global batch i, stacked."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, rows: Sequence[int]):
        super().__init__(parent)
        self._b, self._rows = global_batch, tuple(int(r) for r in rows)

    def __len__(self) -> int:
        return len(self._parent) // self._b

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        items = [self._parent[i * self._b + r] for r in self._rows]
        if any(x is None for x in items):
            raise ValueError(f"step {i}: the dataset returned a missing example; filter before batching")
        return jax.tree.map(lambda *xs: np.stack(xs), *items)

    def __str__(self) -> str:
        return f"StepBatches(global_batch={self._b}, rows={len(self._rows)})"


def batch_iterator(examples: Any, global_batch: int, rows: Sequence[int], *, seed: int,
                   prefetch: int = 2, threads: int = 1):
    """A grain iterator over this process's part of each global batch, shuffled per epoch."""
    ds = examples if isinstance(examples, grain.MapDataset) else grain.MapDataset.source(examples)
    ds = StepBatches(ds.shuffle(seed=seed).repeat(), global_batch, rows)
    opts = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(opts))


def local_rows(sharding, global_batch: int) -> list[int]:
    """Global batch rows held by this process's devices under `sharding` (any layout)."""
    rows: set[int] = set()
    for idx in sharding.addressable_devices_indices_map((global_batch,)).values():
        rows.update(range(global_batch)[idx[0]])
    return sorted(rows)


def to_global(local: dict, shardings: dict, rows: Sequence[int], global_batch: int) -> dict:
    """Assemble global jax arrays from this process's rows (in `rows` order)."""
    pos = {r: i for i, r in enumerate(rows)}

    def make(x, sharding):
        shape = (global_batch,) + x.shape[1:]

        def cb(index):
            want = range(global_batch)[index[0]]
            return x[[pos[r] for r in want]][(slice(None),) + tuple(index[1:])]

        return jax.make_array_from_callback(shape, sharding, cb)

    return jax.tree.map(make, local, shardings)
