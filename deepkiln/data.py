"""Training data from the tokenizer stage's packed token shards, memory-mapped.

The shards are one virtual token stream cut into windows of seq_len + 1 tokens (inputs and
shifted targets). The validation split's documents are the held-out windows (without one, the last
`val_fraction` of the windows). Training windows are visited in a seeded permutation per epoch;
sample number i of the run (counting every rank) is fully determined by (seed, i), so a resumed run
continues exactly where the checkpoint left off, and each rank touches only the pages of the
windows it reads.

With a mixture ({stratum: weight}, strata named by the documents' language or source file, see
deepkiln.splits.stratum_of), each stratum's documents are a stream of their own, cut into windows
the same way: sample i comes from the stratum that deficit sequencing gives it (every stratum
within one sample of its share at every prefix) and is the next window of that stratum's own
seeded permutation, epoch after epoch. A small stratum is repeated more often, never diluted. The
held-out windows are each stratum's validation documents, interleaved in the same proportions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from deepkiln.splits import OTHER, Blend, blend_finite, stratum_of


class Stream:
    """Token segments (memory-mapped slices) read as one stream."""

    def __init__(self, segments: list[np.ndarray]):
        self.segments = [s for s in segments if len(s)]
        self.starts = np.cumsum([0] + [len(s) for s in self.segments])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, lo: int, n: int) -> np.ndarray:
        """Tokens lo .. lo + n - 1, across segment boundaries."""
        hi, parts = lo + n, []
        s = int(np.searchsorted(self.starts, lo, side="right")) - 1
        while lo < hi:
            take = min(hi, int(self.starts[s + 1])) - lo
            begin = lo - int(self.starts[s])
            parts.append(self.segments[s][begin:begin + take])
            lo, s = lo + take, s + 1
        return np.concatenate(parts).astype(np.int64)


class TokenWindows:
    def __init__(self, tokens_dir: str | Path, seq_len: int, val_fraction: float = 0.05, seed: int = 0,
                 mixture: dict[str, float] | None = None, mixture_by: str = "lang"):
        tokens_dir = Path(tokens_dir)
        index_path = tokens_dir / "index.json"
        if not index_path.is_file():
            raise ValueError(f"{index_path} is missing: run pipelines.tokenizer first (or fix data.tokens)")
        self.index = json.loads(index_path.read_text())
        self.dir, self.seq_len, self.seed = tokens_dir, seq_len, seed
        train = [s for s in self.index["shards"] if s.get("split", "train") == "train" and s["tokens"]]
        held = [s for s in self.index["shards"] if s.get("split") == "validation" and s["tokens"]]
        self.shards = [np.memmap(tokens_dir / s["bin"], dtype=self.index["dtype"], mode="r") for s in train + held]
        self.mixture, self.mixture_by = dict(mixture or {}), mixture_by
        self.strata = list(self.mixture) or ["all"]
        self.docs = {k: 0 for k in self.mixture} | {None: 0}  # documents per stratum (None: left out)
        self.found: dict[str, int] = {}                        # documents per label
        if self.mixture:
            trains = self._mixed(train, self.shards[:len(train)], mixture_by, training=True)
            vals = self._mixed(held, self.shards[len(train):], mixture_by, training=False)
        else:
            trains, vals = [Stream(self.shards[:len(train)])], [Stream(self.shards[len(train):])]
        self.parts, self.held = [], []  # each stratum's training stream; (stream, first window) of its held-out ones
        n_train, n_val = [], []
        for name, tr, va in zip(self.strata, trains, vals):
            n, v = (len(tr) - 1) // seq_len, (len(va) - 1) // seq_len
            if v >= 1:  # the validation split's documents
                self.held.append((va, 0))
            else:  # no validation split, or too little of it for a window: the stream's last windows
                v = max(1, int(n * val_fraction))
                n -= v
                self.held.append((tr, n))
            if n < 1:
                where = f" in stratum {name!r} of train.mixture" if self.mixture else ""
                raise ValueError(f"{tokens_dir} holds {len(tr)} training tokens{where}: too few for one training "
                                 f"and one validation window of train.seq_len={seq_len}")
            self.parts.append(tr)
            n_train.append(n)
            n_val.append(v)
        self.train_windows, self.val_windows = dict(zip(self.strata, n_train)), dict(zip(self.strata, n_val))
        self.offsets = np.cumsum([0] + n_train)
        self.n_train, self.n_val = int(self.offsets[-1]), sum(n_val)
        self.blend = Blend(self.mixture) if self.mixture else None
        order = blend_finite(self.mixture, self.val_windows) if self.mixture else None
        self.val_order = None if order is None else [(self.strata.index(p), k) for p, k in order]
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # stratum -> (epoch, permutation)

    def _mixed(self, entries: list[dict], shards: list[np.ndarray], by: str, training: bool) -> list[Stream]:
        """One stream per mixture stratum of these shards' documents, in shard and document order."""
        keys, segments, found = list(self.mixture), [[] for _ in self.mixture], self.found
        for entry, tokens in zip(entries, shards):
            labels = entry.get("labels", {}).get(by)
            if labels is None:
                raise ValueError(f"{self.dir}/index.json has no per-document {by} labels (tokenized before "
                                 "train.mixture existed): re-run pipelines.tokenizer to train with train.mixture")
            legend = labels["legend"]  # a source's legend is already its files (the tokenizer stage cut the record)
            codes = np.load(self.dir / labels["codes"])
            of_code = np.array([keys.index(s) if (s := stratum_of(x, keys)) else -1 for x in legend], dtype=np.int64)
            doc_strata = of_code[codes]
            for x, n in zip(*np.unique(codes, return_counts=True)):
                found[legend[x]] = found.get(legend[x], 0) + int(n)
            bounds = np.load(self.dir / entry["idx"])
            # runs of consecutive documents of one stratum: one segment each
            cuts = np.flatnonzero(np.diff(doc_strata)) + 1
            for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(doc_strata)]):
                if hi > lo:
                    k = int(doc_strata[lo])
                    self.docs[keys[k] if k >= 0 else None] += int(hi - lo)
                    if k >= 0:
                        segments[k].append(tokens[bounds[lo]:bounds[hi]])
        streams = [Stream(s) for s in segments]
        for key, stream in zip(keys, streams):
            if training and not len(stream) and key != OTHER:
                seen = ", ".join(f"{x} ({n:,} docs)" for x, n in sorted(found.items(), key=lambda kv: -kv[1])[:12])
                raise ValueError(f"train.mixture names {key!r}, but no training document's {by} matches it "
                                 f"(train.mixture_by={by}; found: {seen})")
        return streams

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    def window(self, k: int) -> np.ndarray:
        """Window k's seq_len + 1 tokens: training windows first (k < n_train, stratum after
        stratum), then the held-out ones (in blend order with a mixture)."""
        if k < self.n_train:
            s = int(np.searchsorted(self.offsets, k, side="right")) - 1
            stream, local = self.parts[s], k - int(self.offsets[s])
        else:
            v = k - self.n_train
            s, v = self.val_order[v] if self.val_order is not None else (0, v)
            stream, first = self.held[s]
            local = first + v
        return stream.read(local * self.seq_len, self.seq_len + 1)

    def stratum(self, i: int) -> int:
        """The stratum (index into self.strata) training sample number i comes from."""
        return self.blend.at(i)[0] if self.blend else 0

    def train_window_id(self, i: int) -> int:
        """The window used as training sample number i of the run (epochs reshuffle)."""
        s, j = self.blend.at(i) if self.blend else (0, i)
        n = self.train_windows[self.strata[s]]
        epoch, offset = divmod(j, n)
        if self._orders.get(s, (None,))[0] != epoch:
            seed = (self.seed, epoch) if not self.blend else (self.seed, epoch, s)
            self._orders[s] = epoch, np.random.default_rng(seed).permutation(n)
        return int(self.offsets[s]) + int(self._orders[s][1][offset])

    def batch(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(np.stack([self.window(k) for k in ids]))
        return w[:, :-1], w[:, 1:]

    def train_batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training samples first .. first + size - 1 as (inputs, targets), each (size, seq_len)."""
        return self.batch([self.train_window_id(i) for i in range(first, first + size)])

    def val_batches(self, batch_size: int, max_batches: int, stratum: str | None = None):
        """The held-out windows in order (of one mixture stratum: `stratum`), at most max_batches batches."""
        if stratum is not None and not self.mixture:
            raise ValueError(f"held-out windows of stratum {stratum!r} asked for, but train.mixture is not set")
        if stratum is None:
            ids = range(self.n_train, self.n_train + min(self.n_val, batch_size * max_batches))
        else:
            s = self.strata.index(stratum)
            ids = [self.n_train + v for v, (t, _) in enumerate(self.val_order) if t == s][:batch_size * max_batches]
        ids = list(ids)
        for i in range(0, len(ids), batch_size):
            yield self.batch(ids[i:i + batch_size])

    def describe(self) -> dict:
        """{stratum: {weight, docs, train_windows, val_windows}} with a mixture, and the documents
        no stratum takes ("left_out"); {} without one."""
        if not self.mixture:
            return {}
        out = {s: {"weight": self.mixture[s] / sum(self.mixture.values()), "docs": self.docs[s],
                   "train_windows": self.train_windows[s], "val_windows": self.val_windows[s]} for s in self.strata}
        return out | {"left_out": {"docs": self.docs[None]}}

    def mixture_summary(self, samples: int) -> str:
        """One line: each stratum's share, documents, windows and epochs over `samples` training samples."""
        about = self.describe()
        left = about.pop("left_out")["docs"]
        parts = [f"{s} {d['weight']:.0%} ({d['docs']:,} docs, {d['train_windows']:,} windows, "
                 f"{samples * d['weight'] / d['train_windows']:.2g} epochs)" for s, d in about.items()]
        return f"mixture by {self.mixture_by}: " + "; ".join(parts) + (
            f"; {left:,} documents in no stratum are left out (an `other` key keeps them)" if left else "")
