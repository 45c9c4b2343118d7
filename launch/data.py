"""Training data for launch/train.py: full-length sequences, deterministic from (seed, index).

Every source returns *full* sequences with their targets already in place (``labels[t]`` is what
token ``t`` must predict), so the labels are right however the sequence is later sharded over
the context-parallel group. Sample ``index`` is a pure function of ``(seed, index)``: a run that
resumes at data position ``n`` sees exactly the samples an uninterrupted run would have seen,
whatever the number of ranks.

* :class:`AssociativeRecall` (``--task recall``): key-value pairs at the start of the sequence,
  random filler in the middle, queries at the end. The answer to a query is the value that
  followed its key thousands of tokens earlier, so it needs attention across the whole
  sequence; the loss counts only the answers.
* :class:`PackedRecall` (``--task packed-recall``): short recall documents packed into each
  sequence, every one binding the *same* keys to other values, and asking for keys it did not
  bind: a model that attends across documents is misled.
* :class:`PackedDocuments` (``--data FILE``): the documents of a corpus, one byte per token
  (vocabulary 256), packed into sequences with their boundaries.

The packed sources give every sequence its document boundaries, ``cu_seqlens = [0, end_0, ...,
seq_len]`` (flash-attn's convention), and the last token of every document has no target
(``IGNORE_INDEX``): its successor belongs to another document. The targets are the same with
or without document masking (``--no-doc-mask``), so the two runs learn the same thing.
Boundaries are per row: ringflash takes one set per call, so launch/train.py runs a batch as one
call per set of boundaries its rows share (micro-steps, ``train_step``). A corpus's rows rarely
share theirs; packed-recall draws its document lengths per block of 8 samples, so that they do.
"""

from __future__ import annotations

import json
import os
import re
from typing import NamedTuple

import torch

__all__ = ["AssociativeRecall", "PackedRecall", "PackedDocuments", "Batch", "IGNORE_INDEX", "TASKS",
           "read_documents", "make_dataset", "dataset_problem"]

IGNORE_INDEX = -100  # labels the loss skips (torch.nn.functional.cross_entropy's default)
TASKS = ("recall", "packed-recall")  # the synthetic tasks (--task); --data replaces them

# Byte alphabet of the recall tasks; disjoint sets, readable when a sample is printed as text.
KEYS = tuple(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
VALUES = tuple(b"0123456789")
QUERY = ord("?")
FILLER_LOW, FILLER_HIGH = 128, 256  # filler bytes: never a key, a value or the query mark
# packed-recall: keys a-j, one token per binding (key, value), the answer for a key left unbound
PACKED_KEYS = tuple(b"abcdefghij")
BINDING_LOW = 128  # binding tokens 128 + 10 * key + value: 128..227
PACKED_FILLER_LOW = 228  # packed-recall's filler: 228..255
ABSENT = ord("-")


class Batch(NamedTuple):
    """Sequences ``start .. start+count-1`` of a source."""

    tokens: torch.Tensor  # (count, seq_len) int64
    labels: torch.Tensor  # (count, seq_len) int64: the target of every token, or IGNORE_INDEX
    cu_seqlens: list[tuple[int, ...]] | None  # per row, [0, end_0, ..., seq_len]; None: no documents


def _generator(seed: int, index: int) -> torch.Generator:
    # Mix (seed, index) into one 63-bit seed; nearby indices get unrelated streams.
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) % (1 << 64)
    x ^= x >> 32
    return torch.Generator().manual_seed(x % (1 << 63))


def _stack(samples: list[tuple], documents: bool) -> Batch:
    tokens = torch.stack([s[0] for s in samples])
    labels = torch.stack([s[1] for s in samples])
    return Batch(tokens, labels, [s[2] for s in samples] if documents else None)


class AssociativeRecall:
    """Synthetic long-context recall; every sample has the same number of answer tokens.

    A sample of ``seq_len`` tokens reads (as bytes)::

        k1 v1 k2 v2 ... kn vn  <filler ...>  ? kq1 vq1 ? kq2 vq2 ...

    Keys are distinct letters, values digits, filler bytes >= 128. Labels are -100 except at
    each queried key, whose label is its value (the next token). A model that cannot see
    the pairs at the start reaches at best ln(10) ~ 2.30 nats per answer; one that recalls
    them reaches 0.
    """

    documents = False  # one sequence, no boundaries

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

    def batch(self, start: int, count: int) -> Batch:
        """Samples ``start .. start+count-1``: tokens and labels ``(count, seq_len)``, no boundaries."""
        return _stack([self.sample(start + i) for i in range(count)], documents=False)


class PackedRecall:
    """Recall documents packed into each sequence, where attending across documents misleads.

    The keys are the first ``n_pairs + 1`` letters (``a b c`` for 2 pairs), the same in every
    document. Each document binds ``n_pairs`` of them to fresh values, then, after some filler,
    asks ``n_pairs`` of the ``n_pairs + 1`` keys::

        [a=3] [c=7]  <filler ...>  ? c 7 ? b -  |  [b=1] [a=8]  <filler>  ? a 8 ? c -  | ...

    A binding ``[k=v]`` is one token (byte ``128 + 10 * k + v``), so one attention head can look
    a key up. The answer is the value the document bound to the key, or ``-`` when it bound none
    (the key it left out). Labels are -100 except at each queried key (label: its answer, the
    next token). No token marks where a document starts, and documents have random lengths.

    With document masking a query sees only its own document, where the answer is the value of
    the one binding of the key in view, or ``-`` when there is none: the loss goes to 0. Without
    it, the earlier documents' bindings of the same keys to other values are in view too: an
    unbound key looks bound, a bound one has several values. (Were every queried key bound,
    "take the latest binding" would always be right, and attending across documents would cost
    nothing.) Only the layout of the tokens tells where a document starts (its bindings come
    right after the previous document's queries): the small model of tests/test_train_docs.py
    does not find that out and stays near the loss of guessing (about 2.2 nats: ``-`` a third
    of the time, one of ten digits otherwise) while the masked one reaches 0; the default model
    (--dim 128) slowly learns to use it (0.4 after 300 steps, masked 0.0001).

    Rows share boundaries in blocks: samples ``8 m .. 8 m + 7`` have the same document lengths
    (drawn from ``(seed, m)``; their contents from ``(seed, index)``), so with document masking
    a batch of 16 aligned samples runs as two calls (launch/train.py, ``train_step``).
    """

    documents = True
    SHARED_ROWS = 8  # consecutive samples with the same document lengths

    def __init__(self, seq_len: int, *, n_pairs: int = 0, seed: int = 0):
        self.seq_len, self.seed = seq_len, seed
        self.n_pairs = n_pairs or PACKED_PAIRS
        problem = packed_recall_problem(seq_len, self.n_pairs)
        if problem:
            raise ValueError(problem)
        self.doc_core = 4 * self.n_pairs  # bindings (1 token each) and queries (3 each)
        # About as much filler as bindings and queries: documents of twice the core on average.
        self.n_docs = max(2, seq_len // (2 * self.doc_core))

    def boundaries(self, index: int) -> tuple[int, ...]:
        """``cu_seqlens`` of sample ``index`` (the same for its block of SHARED_ROWS samples)."""
        g = _generator(self.seed, -1 - index // self.SHARED_ROWS)  # negative: never a sample's stream
        spare = self.seq_len - self.n_docs * self.doc_core  # filler, split at random among the documents
        cuts = torch.sort(torch.randint(spare + 1, (self.n_docs - 1,), generator=g)).values.tolist()
        ends, end = [], 0
        for a, b in zip([0, *cuts], [*cuts, spare]):
            end += self.doc_core + b - a
            ends.append(end)
        return (0, *ends)

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """Sample ``index``: tokens and labels, int64 ``(seq_len,)``, and its ``cu_seqlens``."""
        g = _generator(self.seed, index)
        n, S = self.n_pairs, self.seq_len
        cu = self.boundaries(index)
        tokens = torch.randint(PACKED_FILLER_LOW, 256, (S,), generator=g)
        labels = torch.full((S,), IGNORE_INDEX, dtype=torch.int64)
        for start, end in zip(cu[:-1], cu[1:]):
            bound = torch.randperm(n + 1, generator=g)[:n]  # the keys this document binds
            values = torch.randint(len(VALUES), (n,), generator=g)
            asked = torch.randperm(n + 1, generator=g)[:n]  # bound, or the one left out
            value_of = dict(zip(bound.tolist(), values.tolist()))
            answers = torch.tensor([VALUES[value_of[k]] if k in value_of else ABSENT for k in asked.tolist()])
            tokens[start : start + n] = BINDING_LOW + 10 * bound + values
            q = end - 3 * n  # the queries end the document, after its filler
            tokens[q:end:3] = QUERY
            tokens[q + 1 : end : 3] = torch.tensor(PACKED_KEYS)[asked]
            tokens[q + 2 : end : 3] = answers
            labels[q + 1 : end : 3] = answers  # at the queried key, predict its answer
        return tokens, labels, cu

    def batch(self, start: int, count: int) -> Batch:
        """Samples ``start .. start+count-1``: tokens, labels ``(count, seq_len)``, boundaries per row."""
        return _stack([self.sample(start + i) for i in range(count)], documents=True)


# A line that is empty or holds only spaces and tabs, after a line: the separator of documents.
_BLANK_LINES = re.compile(rb"\r?\n(?:[ \t]*\r?\n)+")


def read_documents(path: str) -> list[bytes]:
    """The documents of a corpus file, as bytes (UTF-8 for JSON lines), none of them empty.

    * ``*.jsonl``: one JSON object per line with a string field ``text``; blank lines skipped.
    * any other file: documents separated by blank lines (empty, or spaces and tabs only);
      the newlines around a document are not part of it. A file with no blank line is one
      document.

    Raises ``ValueError`` naming the line of a bad JSON line, or for a file with no document.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".jsonl"):
        docs = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"--data {path}, line {number}: not a JSON object with a \"text\" "
                                 f"field ({type(e).__name__}: {e})") from None
            if not isinstance(text, str):
                raise ValueError(f"--data {path}, line {number}: \"text\" must be a string; got "
                                 f"{type(text).__name__}")
            if text:
                docs.append(text.encode("utf-8"))
    else:
        docs = [d.strip(b"\r\n") for d in _BLANK_LINES.split(raw)]
        docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"--data {path} holds no document (an empty file, blank lines only, or JSON "
                         "lines with empty texts)")
    return docs


class PackedDocuments:
    """The documents of a corpus packed into sequences of ``seq_len`` bytes, with their boundaries.

    Documents longer than ``seq_len`` are cut into pieces of ``seq_len`` (the last one shorter);
    a piece is the unit of packing. Sequence ``index`` draws pieces uniformly at random, with
    replacement, from a generator seeded by ``(seed, index)``, and lays them end to end until
    the sequence is full; the last one is cut to fit. Every piece is one document of the
    sequence (``cu_seqlens``). A file that is one document (no blank line) thus gives its
    pieces of ``seq_len`` bytes.

    The target of a token is the next byte of its document in the file (for the last token of
    a piece or of a cut piece, the byte that follows it there); the last byte of a document has
    none (``IGNORE_INDEX``). Every row has boundaries of its own: with document masking a batch
    runs a row per call (launch/train.py, ``train_step``).
    """

    documents = True
    _DRAWS = 32  # pieces drawn at a time (any fixed number: the samples depend on it)

    def __init__(self, path: str, seq_len: int, *, seed: int = 0):
        self.path, self.seq_len, self.seed = path, seq_len, seed
        problem = text_problem(path)
        if problem:
            raise ValueError(problem)
        docs = read_documents(path)
        self.n_documents = len(docs)
        self.data = torch.frombuffer(bytearray(b"".join(docs)), dtype=torch.uint8)
        starts, lengths, ends = [], [], []
        offset = 0
        for doc in docs:
            for s in range(0, len(doc), seq_len):
                starts.append(offset + s)
                lengths.append(min(seq_len, len(doc) - s))
                ends.append(offset + len(doc))  # where the piece's document ends
            offset += len(doc)
        self.piece_start, self.piece_len, self.piece_doc_end = starts, lengths, ends

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """Sequence ``index``: tokens and labels, int64 ``(seq_len,)``, and its ``cu_seqlens``."""
        g = _generator(self.seed, index)
        S = self.seq_len
        tokens = torch.empty(S, dtype=torch.int64)
        labels = torch.full((S,), IGNORE_INDEX, dtype=torch.int64)
        cu = [0]
        while cu[-1] < S:
            for p in torch.randint(len(self.piece_start), (self._DRAWS,), generator=g).tolist():
                at, start = cu[-1], self.piece_start[p]
                take = min(self.piece_len[p], S - at)
                tokens[at : at + take] = self.data[start : start + take]
                targets = min(take, self.piece_doc_end[p] - start - 1)  # tokens with a next byte
                labels[at : at + targets] = self.data[start + 1 : start + 1 + targets]
                cu.append(at + take)
                if cu[-1] == S:
                    break
        return tokens, labels, tuple(cu)

    def batch(self, start: int, count: int) -> Batch:
        """Sequences ``start .. start+count-1``: tokens, labels ``(count, seq_len)``, boundaries per row."""
        return _stack([self.sample(start + i) for i in range(count)], documents=True)


PACKED_PAIRS = 2  # packed-recall's default pairs per document


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


def packed_recall_problem(seq_len: int, n_pairs: int) -> str | None:
    """A message saying what to change, or None if packed-recall can make these samples."""
    if not 1 <= n_pairs <= len(PACKED_KEYS) - 1:
        return (f"--task packed-recall takes 1 to {len(PACKED_KEYS) - 1} key-value pairs per document "
                f"(--recall-pairs; its keys are n + 1 of the letters a-j); got {n_pairs}")
    need = 2 * 4 * n_pairs
    if seq_len < need:
        return (
            f"--seq-len {seq_len} is too short for --task packed-recall with {n_pairs} pairs per "
            f"document: two documents of {n_pairs} pairs and {n_pairs} queries need {need} tokens; "
            f"lower --recall-pairs or raise --seq-len"
        )
    return None


def text_problem(path: str) -> str | None:
    """A message saying what to change, or None if ``path`` is a file with something in it."""
    if not os.path.isfile(path):
        return f"--data {path}: no such file"
    if os.path.getsize(path) == 0:
        return f"--data {path} is empty: it needs at least one document"
    return None


def dataset_problem(*, data: str | None, seq_len: int, recall_pairs: int = 0, task: str = "recall") -> str | None:
    """What is wrong with these data settings (a message), or None; reads no file contents."""
    if data:
        return text_problem(data)
    if task == "packed-recall":
        return packed_recall_problem(seq_len, recall_pairs or PACKED_PAIRS)
    n = recall_pairs or default_pairs(seq_len)
    return recall_problem(seq_len, n, n)


def make_dataset(*, data: str | None, seq_len: int, seed: int, recall_pairs: int = 0, task: str = "recall"):
    """The corpus at ``data`` packed into sequences, or the synthetic ``task`` when ``data`` is empty.

    Raises ``ValueError`` for settings :func:`dataset_problem` refuses, or a corpus with no
    document or a bad JSON line (:func:`read_documents`).
    """
    if data:
        return PackedDocuments(data, seq_len, seed=seed)
    if task == "packed-recall":
        return PackedRecall(seq_len, n_pairs=recall_pairs, seed=seed)
    return AssociativeRecall(seq_len, n_pairs=recall_pairs, seed=seed)
