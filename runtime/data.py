"""Byte-level text that needs no download: the Python standard library's own sources by default.

Batches are a pure function of (seed, step, rank), so every run, whatever its placement, sees the
same tokens, and a resumed run continues exactly where the uninterrupted one would be.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import torch

from cost_models.files import InputError

VOCAB = 256


def load_corpus(path: str | None = None, max_bytes: int = 4_000_000) -> np.ndarray:
    """uint8 bytes of the named text file, or of the stdlib's .py files in sorted order."""
    if path:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read the text file: {exc.strerror or exc}", path) from None
    else:
        root = Path(sysconfig.get_paths()["stdlib"])
        chunks, size = [], 0
        for f in sorted(root.glob("*.py")):
            try:
                b = f.read_bytes()
            except OSError:
                continue
            chunks.append(b)
            size += len(b)
            if size >= max_bytes:
                break
        data = b"".join(chunks)
    data = data[:max_bytes]
    if len(data) < 1024:
        raise InputError(f"the text has {len(data)} bytes; at least 1024 are needed", path)
    return np.frombuffer(data, dtype=np.uint8).copy()


class Batches:
    """Global batch of `world * batch` sequences per step; rank r takes its own slice."""

    def __init__(self, corpus: np.ndarray, seq_len: int, batch: int, world: int, rank: int, seed: int):
        if len(corpus) <= seq_len + 1:
            raise InputError(f"the text ({len(corpus)} bytes) is shorter than a sequence ({seq_len + 1})")
        self.corpus = torch.from_numpy(corpus.astype(np.int64))
        self.seq_len, self.batch, self.world, self.rank, self.seed = seq_len, batch, world, rank, seed

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.corpus) - self.seq_len - 1, (self.world * self.batch,), generator=g)
        mine = starts[self.rank * self.batch:(self.rank + 1) * self.batch]
        idx = mine[:, None] + torch.arange(self.seq_len + 1)[None, :]
        seq = self.corpus[idx]
        return seq[:, :-1], seq[:, 1:]
