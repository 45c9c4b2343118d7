"""Training data for launch/train.py: full-length sequences, deterministic from (seed, index).

Every source returns *full* sequences with next-token labels already shifted, so the labels
are right however the sequence is later sharded over the context-parallel group. Sample
``index`` is a pure function of ``(seed, index)``: a run that resumes at data position ``n``
sees exactly the samples an uninterrupted run would have seen, whatever the number of ranks.

* :class:`AssociativeRecall`: key-value pairs at the start of the sequence, random filler in
  the middle, queries at the end. The answer to a query is the value that followed its key
  thousands of tokens earlier, so it needs attention across the whole sequence; the loss
  counts only the answers.
* :class:`ByteText`: windows of a user's file, one byte per token (vocabulary 256).
"""

from __future__ import annotations

import os

import torch

__all__ = ["AssociativeRecall", "ByteText", "IGNORE_INDEX", "make_dataset", "dataset_problem"]

IGNORE_INDEX = -100  # labels the loss skips (torch.nn.functional.cross_entropy's default)

# Byte alphabet of the recall task; disjoint sets, readable when a sample is printed as text.
KEYS = tuple(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
VALUES = tuple(b"0123456789")
QUERY = ord("?")
FILLER_LOW, FILLER_HIGH = 128, 256  # filler bytes: never a key, a value or the query mark


def _generator(seed: int, index: int) -> torch.Generator:
    # Mix (seed, index) into one 63-bit seed; nearby indices get unrelated streams.
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) % (1 << 64)
    x ^= x >> 32
    return torch.Generator().manual_seed(x % (1 << 63))


class AssociativeRecall:
    """Synthetic long-context recall; every sample has the same number of answer tokens.

    A sample of ``seq_len`` tokens reads (as bytes)::

        k1 v1 k2 v2 ... kn vn  <filler ...>  ? kq1 vq1 ? kq2 vq2 ...

    Keys are distinct letters, values digits, filler bytes >= 128. Labels are -100 except at
    each queried key, whose label is its value (the next token). A model that cannot see
    the pairs at the start reaches at best ln(10) ~ 2.30 nats per answer; one that recalls
    them reaches 0.
    """

    def __init__(self, seq_len: int, *, n_pairs: int = 0, n_queries: int = 0, seed: int = 0):
        self.seq_len = seq_len
        self.n_pairs = n_pairs or default_pairs(seq_len)
        self.n_queries = n_queries or self.n_pairs
        self.seed = seed
        problem = recall_problem(seq_len, self.n_pairs, self.n_queries)
        if problem:
            raise ValueError(problem)

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``index``: tokens and labels, both int64 ``(seq_len,)``."""
        g = _generator(self.seed, index)
        n, q, S = self.n_pairs, self.n_queries, self.seq_len
        keys = torch.tensor(KEYS)[torch.randperm(len(KEYS), generator=g)[:n]]
        values = torch.tensor(VALUES)[torch.randint(len(VALUES), (n,), generator=g)]
        asked = torch.randperm(n, generator=g)[:q]

        tokens = torch.randint(FILLER_LOW, FILLER_HIGH, (S,), generator=g)
        tokens[0 : 2 * n : 2] = keys
        tokens[1 : 2 * n : 2] = values
        tail = S - 3 * q
        tokens[tail::3] = QUERY
        tokens[tail + 1 :: 3] = keys[asked]
        tokens[tail + 2 :: 3] = values[asked]

        labels = torch.full((S,), IGNORE_INDEX, dtype=torch.int64)
        labels[tail + 1 :: 3] = values[asked]  # at the queried key, predict its value
        return tokens, labels

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``start .. start+count-1``: tokens and labels ``(count, seq_len)``."""
        pairs = [self.sample(start + i) for i in range(count)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class ByteText:
    """Random windows of a file, one byte per token; window ``index`` depends on (seed, index)."""

    def __init__(self, path: str, seq_len: int, *, seed: int = 0):
        self.path, self.seq_len, self.seed = path, seq_len, seed
        problem = text_problem(path, seq_len)
        if problem:
            raise ValueError(problem)
        with open(path, "rb") as f:
            self.data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = _generator(self.seed, index)
        start = int(torch.randint(len(self.data) - self.seq_len, (1,), generator=g))
        window = self.data[start : start + self.seq_len + 1].to(torch.int64)
        return window[:-1].clone(), window[1:].clone()  # next-byte labels on the full window

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.sample(start + i) for i in range(count)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def default_pairs(seq_len: int) -> int:
    return min(len(KEYS), max(1, seq_len // 32))


def recall_problem(seq_len: int, n_pairs: int, n_queries: int) -> str | None:
    """A message saying what to change, or None if these settings make valid recall samples."""
    if not 1 <= n_pairs <= len(KEYS):
        return f"the recall task takes 1 to {len(KEYS)} key-value pairs (--recall-pairs); got {n_pairs}"
    if not 1 <= n_queries <= n_pairs:
        return f"the recall task takes 1 to {n_pairs} queries (the number of pairs); got {n_queries}"
    need = 2 * n_pairs + 3 * n_queries
    if seq_len < need:
        return (
            f"--seq-len {seq_len} is too short for {n_pairs} recall pairs and {n_queries} queries "
            f"(needs at least {need} tokens); lower --recall-pairs or raise --seq-len"
        )
    return None


def text_problem(path: str, seq_len: int) -> str | None:
    """A message saying what to change, or None if ``path`` can feed windows of ``seq_len`` tokens."""
    if not os.path.isfile(path):
        return f"--data {path}: no such file"
    size = os.path.getsize(path)
    if size < seq_len + 1:
        return (
            f"--data {path} has {size} bytes; a training window needs --seq-len + 1 = "
            f"{seq_len + 1}: use a longer file or a shorter --seq-len"
        )
    return None


def dataset_problem(*, data: str | None, seq_len: int, recall_pairs: int = 0) -> str | None:
    """What is wrong with these data settings (a message), or None; reads no file contents."""
    if data:
        return text_problem(data, seq_len)
    n = recall_pairs or default_pairs(seq_len)
    return recall_problem(seq_len, n, n)


def make_dataset(*, data: str | None, seq_len: int, seed: int, recall_pairs: int = 0):
    """The file at ``data`` as bytes, or the recall task when ``data`` is None or empty."""
    if data:
        return ByteText(data, seq_len, seed=seed)
    return AssociativeRecall(seq_len, n_pairs=recall_pairs, seed=seed)
