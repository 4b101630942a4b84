"""Training data from the tokenizer stage's packed token shards, memory-mapped.

The shards are one virtual token stream cut into windows of seq_len + 1 tokens (inputs and
shifted targets). The last `val_fraction` of the windows is held out. Training windows are visited
in a seeded permutation per epoch; sample number i of the run (counting every rank) is fully
determined by (seed, i), so a resumed run continues exactly where the checkpoint left off, and each
rank touches only the pages of the windows it reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class TokenWindows:
    def __init__(self, tokens_dir: str | Path, seq_len: int, val_fraction: float = 0.05, seed: int = 0):
        tokens_dir = Path(tokens_dir)
        index_path = tokens_dir / "index.json"
        if not index_path.is_file():
            raise ValueError(f"{index_path} is missing: run pipelines.tokenizer first (or fix data.tokens)")
        self.index = json.loads(index_path.read_text())
        train = [s for s in self.index["shards"] if s.get("split", "train") == "train" and s["tokens"]]
        held = [s for s in self.index["shards"] if s.get("split") == "validation" and s["tokens"]]
        self.shards = [np.memmap(tokens_dir / s["bin"], dtype=self.index["dtype"], mode="r") for s in train + held]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.seq_len, self.seed = seq_len, seed
        train_tokens = int(self.starts[len(train)])
        n_train, n_val = (train_tokens - 1) // seq_len, (int(self.starts[-1]) - train_tokens - 1) // seq_len
        if n_val >= 1:  # the validation split's documents, after the training stream
            self.n_train, self.n_val, self.val_start = n_train, n_val, train_tokens
        else:  # no validation split, or too little of it for a window: the stream's last windows
            n_val = max(1, int(n_train * val_fraction))
            self.n_train, self.n_val, self.val_start = n_train - n_val, n_val, (n_train - n_val) * seq_len
        if self.n_train < 1:
            raise ValueError(f"{tokens_dir} holds {train_tokens} training tokens: too few for one training "
                             f"and one validation window of train.seq_len={seq_len}")
        self._epoch, self._order = -1, None

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    def window(self, k: int) -> np.ndarray:
        """Window k's seq_len + 1 tokens, across shard boundaries: training windows (k < n_train)
        tile the training stream from its start, held-out ones (k >= n_train) from val_start."""
        start = k * self.seq_len if k < self.n_train else self.val_start + (k - self.n_train) * self.seq_len
        lo, hi = start, start + self.seq_len + 1
        parts, s = [], int(np.searchsorted(self.starts, lo, side="right")) - 1
        while lo < hi:
            take = min(hi, int(self.starts[s + 1])) - lo
            begin = lo - int(self.starts[s])
            parts.append(self.shards[s][begin:begin + take])
            lo, s = lo + take, s + 1
        return np.concatenate(parts).astype(np.int64)

    def train_window_id(self, i: int) -> int:
        """The window used as training sample number i of the run (epochs reshuffle)."""
        epoch, offset = divmod(i, self.n_train)
        if self._epoch != epoch:
            self._epoch, self._order = epoch, np.random.default_rng((self.seed, epoch)).permutation(self.n_train)
        return int(self._order[offset])

    def batch(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(np.stack([self.window(k) for k in ids]))
        return w[:, :-1], w[:, 1:]

    def train_batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training samples first .. first + size - 1 as (inputs, targets), each (size, seq_len)."""
        return self.batch([self.train_window_id(i) for i in range(first, first + size)])

    def val_batches(self, batch_size: int, max_batches: int):
        """The held-out windows in order, at most max_batches batches."""
        ids = [self.n_train + k for k in range(self.n_val)][:batch_size * max_batches]
        for i in range(0, len(ids), batch_size):
            yield self.batch(ids[i:i + batch_size])
