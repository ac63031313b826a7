"""Training data: records, tokenization with loss masks, packing, batching and held-out splits.

Two kinds of records:

- `PromptCompletion` (instruction data): rendered with the tokenizer's chat template as a user
  turn and an assistant turn; the loss mask is 1 on the assistant answer tokens up to and
  including the end-of-turn token and 0 on the prompt (completion-only loss);
- `TextDocument` (plain text): tokenized, terminated with the EOS token, loss on every token.

Sequences become fixed-length rows ``[N, T]`` of five int32 features (`FEATURES`):

- ``input_ids``: token ids (``pad_id`` in padding);
- ``loss_mask``: 1 where the token is a training *target*: the loss at position ``t`` compares
  the model's prediction from position ``t - 1`` with ``input_ids[t]`` when ``loss_mask[t] == 1``
  (so position 0, the first token of every packed segment and padding always hold 0);
- ``attention_mask``: 1 on real tokens, 0 on padding;
- ``segment_ids``: 1, 2, ... for the sequences packed into a row (0 on padding); a token attends
  only to earlier tokens of its own segment;
- ``positions``: RoPE positions, restarting at 0 in every segment.

Packing (`pack_sequences`) places sequences one after another into rows: plain-text documents
may be split across rows (a continued piece starts a new segment), instruction examples never are.
`pad_sequences` puts one sequence per row instead.

`BatchIterator` yields shuffled batches epoch after epoch; its position (``epoch``, ``index``) is
a small JSON-able dict (`BatchIterator.state`) that restores the exact same batch order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "FEATURES", "PromptCompletion", "TextDocument", "TokenizedSequence", "SequenceStats",
    "read_jsonl", "load_dataset", "split_heldout", "encode_instruction", "encode_text",
    "tokenize_records", "pad_sequences", "pack_sequences", "build_sequences",
    "BatchIterator", "eval_batches", "left_pad", "BUILTIN_DATASETS",
]

FEATURES = ("input_ids", "loss_mask", "attention_mask", "segment_ids", "positions")
BUILTIN_DATASETS = ("chatterbot", "lee")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class PromptCompletion:
    """One instruction example; ``source`` names where it came from (``"file.jsonl:12"``)."""

    prompt: str
    completion: str
    source: str = ""


@dataclasses.dataclass(frozen=True)
class TextDocument:
    """One plain-text document; ``source`` names where it came from."""

    text: str
    source: str = ""


Record = PromptCompletion | TextDocument


@dataclasses.dataclass(frozen=True)
class TokenizedSequence:
    """Token ids ``[L]`` int32 and the loss mask ``[L]`` int32 (1 = the token is a target)."""

    ids: np.ndarray
    loss_mask: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclasses.dataclass(frozen=True)
class SequenceStats:
    """What `build_sequences` did: counts of records, rows, tokens and truncations."""

    records: int
    rows: int
    seq_len: int
    tokens: int          # real (non-padding) tokens in the rows
    target_tokens: int   # tokens with loss_mask == 1
    truncated: int       # instruction examples cut to seq_len
    dropped: int         # examples with no target token left after truncation

    @property
    def fill(self) -> float:
        """Fraction of row slots holding real tokens."""
        return self.tokens / max(self.rows * self.seq_len, 1)

    def as_dict(self) -> dict[str, Any]:
        """The counts and ``fill`` as a JSON-able dict."""
        return {**dataclasses.asdict(self), "fill": round(self.fill, 4)}


# --------------------------------------------------------------------------------------------
# Loading


def _nonempty_str(row: Mapping[str, Any], key: str, where: str) -> str:
    v = row.get(key)
    if v is None:
        raise ValueError(f"{where}: missing field {key!r} (row keys: {sorted(row)})")
    if not isinstance(v, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    if not v.strip():
        raise ValueError(f"{where}: field {key!r} is empty")
    return v


def read_jsonl(path: str | os.PathLike) -> list[PromptCompletion] | list[TextDocument]:
    """Read a JSONL file of ``{"prompt": ..., "completion": ...}`` rows or of ``{"text": ...}`` rows.

    Blank lines are skipped; extra keys are ignored. All rows must be of one kind.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: naming the file and 1-based line number, for bytes that are not UTF-8, a line
        that is not a JSON object, a missing, non-string or empty field, rows of mixed kinds, or a
        file with no rows.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"data file not found: {p}")
    kind: str | None = None
    out: list[Any] = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
            if "text" in row:
                this = "text"
                rec: Record = TextDocument(_nonempty_str(row, "text", where), where)
            elif "prompt" in row or "completion" in row:
                this = "prompt/completion"
                rec = PromptCompletion(_nonempty_str(row, "prompt", where),
                                       _nonempty_str(row, "completion", where), where)
            else:
                raise ValueError(f"{where}: a row needs a 'text' field or 'prompt' and 'completion' "
                                 f"fields (row keys: {sorted(row)})")
            if kind is None:
                kind = this
            elif this != kind:
                raise ValueError(f"{where}: a {this!r} row in a file whose earlier rows are {kind!r} rows")
            out.append(rec)
    if not out:
        raise ValueError(f"{p}: no rows (the file is empty or blank)")
    return out


def split_heldout(items: Sequence[T], heldout: int | float, *, seed: int | None = 0) -> tuple[list[T], list[T]]:
    """Split ``items`` into ``(train, heldout)``; both keep the original order.

    Args:
      items: the records.
      heldout: a count (int >= 1) or a fraction in (0, 1) (at least one item is held out).
      seed: with None the *last* items are held out; otherwise a seeded permutation picks them,
        so the split is deterministic for a given seed.
    """
    n = len(items)
    if isinstance(heldout, float):
        if not 0.0 < heldout < 1.0:
            raise ValueError(f"heldout fraction must be in (0, 1), got {heldout}")
        k = max(1, int(round(n * heldout)))
    else:
        k = int(heldout)
    if not 1 <= k < n:
        raise ValueError(f"cannot hold out {k} of {n} items (need 1 <= heldout < {n})")
    if seed is None:
        held = set(range(n - k, n))
    else:
        held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    train = [x for i, x in enumerate(items) if i not in held]
    test = [x for i, x in enumerate(items) if i in held]
    return train, test


def load_dataset(spec: str | os.PathLike, *, heldout: int | float = 0.1,
                 split_seed: int = 0) -> tuple[list[Record], list[Record]]:
    """``(train, heldout)`` records of a built-in data set or a JSONL file.

    Args:
      spec: ``"chatterbot"`` (deduplicated English QA pairs of chatterbot-corpus, a seeded
        90/10 split), ``"lee"`` (the 300 Lee background news articles, the last 50 held out),
        or the path of a JSONL file (see `read_jsonl`; held out as ``heldout`` with ``split_seed``).
      heldout: count or fraction held out for JSONL files and chatterbot.
      split_seed: seed of the split permutation.
    """
    from qlora_jax import assets

    s = os.fspath(spec)
    if s == "chatterbot":
        recs: list[Any] = [PromptCompletion(q, a, f"chatterbot[{i}]")
                           for i, (q, a) in enumerate(assets.chatterbot_pairs())]
        return split_heldout(recs, heldout, seed=split_seed)
    if s == "lee":
        recs = [TextDocument(d, f"lee_background[{i}]") for i, d in enumerate(assets.lee_documents())]
        return split_heldout(recs, 50, seed=None)
    if not os.path.exists(s) and not s.endswith(".jsonl") and os.sep not in s:
        raise ValueError(f"unknown data set {s!r}: use one of {BUILTIN_DATASETS} or a .jsonl file path")
    return split_heldout(read_jsonl(s), heldout, seed=split_seed)


# --------------------------------------------------------------------------------------------
# Tokenization


def _pad_id(tokenizer: Any) -> int:
    for v in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None)):
        if v is not None:
            return int(v)
    return 0


def encode_instruction(tokenizer: Any, prompt: str, completion: str, *,
                       system: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids and loss mask of one prompt/completion pair, as ``(ids, mask)`` lists.

    With a chat template: the prompt is the conversation rendered up to the assistant header
    (``add_generation_prompt=True``), the completion is the rest of the full conversation's
    rendering; they are tokenized separately (no BOS added: templates write their own) so the
    boundary is exact. The mask is 1 on completion tokens up to and including the first
    ``eos_id`` (the end-of-turn token), 0 on the prompt and on anything the template writes after
    that token. Without a chat template: ``prompt + "\\n"``, then the completion followed by EOS.
    """
    eos = getattr(tokenizer, "eos_id", None)
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": completion}],
                                             add_generation_prompt=False)
        if not full.startswith(head):
            raise ValueError("the chat template does not render the prompt as a prefix of the full "
                             "conversation, so the completion tokens cannot be located")
        p_ids = list(tokenizer.encode(head, add_bos=False))
        c_ids = list(tokenizer.encode(full[len(head):], add_bos=False))
        if eos is not None and eos in c_ids:
            end = c_ids.index(eos) + 1
            c_mask = [1] * end + [0] * (len(c_ids) - end)
        else:
            c_mask = [1] * len(c_ids)
    else:
        p_ids = list(tokenizer.encode(prompt + "\n"))
        c_ids = list(tokenizer.encode(completion, add_bos=False)) + ([int(eos)] if eos is not None else [])
        c_mask = [1] * len(c_ids)
    return p_ids + c_ids, [0] * len(p_ids) + c_mask


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a document followed by the EOS token (BOS as the tokenizer's default)."""
    ids = list(tokenizer.encode(text))
    eos = getattr(tokenizer, "eos_id", None)
    return ids + ([int(eos)] if eos is not None else [])


def tokenize_records(records: Sequence[Record], tokenizer: Any, *,
                     system: str | None = None) -> list[TokenizedSequence]:
    """Tokenize records (all of one kind) into `TokenizedSequence`s; text gets loss on every token."""
    _check_one_kind(records)
    out = []
    for r in records:
        if isinstance(r, PromptCompletion):
            ids, mask = encode_instruction(tokenizer, r.prompt, r.completion, system=system)
        else:
            ids = encode_text(tokenizer, r.text)
            mask = [1] * len(ids)
        out.append(TokenizedSequence(np.asarray(ids, np.int32), np.asarray(mask, np.int32), r.source))
    return out


def _check_one_kind(records: Sequence[Any]) -> None:
    if not records:
        raise ValueError("no records")
    kinds = {type(r) for r in records}
    if len(kinds) != 1 or not kinds <= {PromptCompletion, TextDocument}:
        got = sorted(k.__name__ for k in kinds)
        raise ValueError(f"records must all be PromptCompletion or all TextDocument, got {got}")


# --------------------------------------------------------------------------------------------
# Rows


def _empty_rows(n: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    rows = {k: np.zeros((n, seq_len), np.int32) for k in FEATURES}
    rows["input_ids"][:] = pad_id
    return rows


def pad_sequences(seqs: Sequence[TokenizedSequence], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One sequence per row, right-padded to ``seq_len``: `FEATURES` arrays ``[N, seq_len]`` int32.

    Every sequence must already fit (``len <= seq_len``).
    """
    rows = _empty_rows(len(seqs), seq_len, pad_id)
    for i, s in enumerate(seqs):
        n = len(s)
        if n > seq_len:
            raise ValueError(f"{s.source}: sequence of {n} tokens does not fit seq_len={seq_len}")
        rows["input_ids"][i, :n] = s.ids
        rows["loss_mask"][i, :n] = s.loss_mask
        rows["attention_mask"][i, :n] = 1
        rows["segment_ids"][i, :n] = 1
        rows["positions"][i, :n] = np.arange(n)
    rows["loss_mask"][:, 0] = 0  # nothing predicts the first token of a row
    return rows


def pack_sequences(seqs: Sequence[TokenizedSequence], seq_len: int, pad_id: int, *,
                   split: bool) -> dict[str, np.ndarray]:
    """Pack sequences in order into rows of ``seq_len``: `FEATURES` arrays ``[N, seq_len]`` int32.

    Each sequence (or piece of one) gets its own segment id within its row and positions from 0.
    With ``split=True`` a sequence that does not fit the rest of a row fills it and continues in
    the next row as a new segment (for plain text); with ``split=False`` it starts a new row
    instead (for instruction examples, which must then each fit ``seq_len``). The first token
    of every segment is not a target (``loss_mask = 0``): it has no context within its segment.
    """
    pieces: list[list[tuple[TokenizedSequence, int, int]]] = [[]]  # rows of (seq, start, stop)
    fill = 0
    for s in seqs:
        n, start = len(s), 0
        if n == 0:
            continue
        if not split:
            if n > seq_len:
                raise ValueError(f"{s.source}: sequence of {n} tokens does not fit seq_len={seq_len}")
            if fill + n > seq_len:
                pieces.append([])
                fill = 0
            pieces[-1].append((s, 0, n))
            fill += n
            continue
        while start < n:
            if fill == seq_len:
                pieces.append([])
                fill = 0
            take = min(seq_len - fill, n - start)
            pieces[-1].append((s, start, start + take))
            fill += take
            start += take
    if not pieces[-1]:
        pieces.pop()
    rows = _empty_rows(len(pieces), seq_len, pad_id)
    for i, row in enumerate(pieces):
        col = 0
        for seg, (s, a, b) in enumerate(row, start=1):
            n = b - a
            rows["input_ids"][i, col:col + n] = s.ids[a:b]
            rows["loss_mask"][i, col:col + n] = s.loss_mask[a:b]
            rows["loss_mask"][i, col] = 0
            rows["attention_mask"][i, col:col + n] = 1
            rows["segment_ids"][i, col:col + n] = seg
            rows["positions"][i, col:col + n] = np.arange(n)
            col += n
    return rows


def build_sequences(records: Sequence[Record], tokenizer: Any, seq_len: int, *,
                    max_positions: int | None = None, truncate: bool = True, pack: bool = True,
                    system: str | None = None) -> tuple[dict[str, np.ndarray], SequenceStats]:
    """Records -> fixed-length rows (`FEATURES` arrays ``[N, seq_len]`` int32) and statistics.

    Plain text is always packed with documents split across rows. Instruction examples are
    packed whole (``pack=True``) or one per row (``pack=False``); an example longer than
    ``seq_len`` is cut to ``seq_len`` when ``truncate`` (and dropped if no target token is
    left), otherwise it is an error.

    Raises:
      ValueError: ``seq_len`` larger than ``max_positions`` (the model's
        ``max_position_embeddings``); with ``truncate=False``, an example longer than
        ``seq_len``, named by its source (file and line); no usable example.
    """
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(f"seq_len={seq_len} is longer than the model's max_position_embeddings={max_positions}")
    _check_one_kind(records)
    pad_id = _pad_id(tokenizer)
    seqs = tokenize_records(records, tokenizer, system=system)
    truncated = dropped = 0
    if isinstance(records[0], TextDocument):
        rows = pack_sequences(seqs, seq_len, pad_id, split=True)
    else:
        kept = []
        for s in seqs:
            if len(s) > seq_len:
                if not truncate:
                    limit = (f" and the model's max_position_embeddings={max_positions}"
                             if max_positions is not None and len(s) > max_positions else "")
                    raise ValueError(f"{s.source}: example is {len(s)} tokens long, more than "
                                     f"seq_len={seq_len}{limit}; raise the sequence length or allow truncation")
                s = TokenizedSequence(s.ids[:seq_len], s.loss_mask[:seq_len], s.source)
                truncated += 1
            if s.loss_mask[1:].sum() == 0:
                dropped += 1
                continue
            kept.append(s)
        if not kept:
            raise ValueError(f"no example has a completion token within seq_len={seq_len}")
        rows = (pack_sequences(kept, seq_len, pad_id, split=False) if pack
                else pad_sequences(kept, seq_len, pad_id))
    stats = SequenceStats(records=len(records), rows=int(rows["input_ids"].shape[0]), seq_len=int(seq_len),
                          tokens=int(rows["attention_mask"].sum()), target_tokens=int(rows["loss_mask"].sum()),
                          truncated=truncated, dropped=dropped)
    return rows, stats


# --------------------------------------------------------------------------------------------
# Batches


def _check_rows(arrays: Mapping[str, np.ndarray]) -> int:
    if not arrays:
        raise ValueError("no feature arrays")
    shapes = {k: np.shape(v) for k, v in arrays.items()}
    n = {s[0] if len(s) else None for s in shapes.values()}
    if len(n) != 1 or None in n:
        raise ValueError(f"feature arrays must share their leading (row) dimension, got {shapes}")
    return int(next(iter(n)))


class BatchIterator:
    """Endless, seeded, epoch-shuffled batches of rows.

    Epoch ``e`` visits the rows in the order ``default_rng([seed, e]).permutation(N)`` (or in
    order with ``shuffle=False``), ``N // batch_size`` full batches of it (the remainder waits for
    a later epoch's shuffle). The position is ``(epoch, index)``; `state` returns it with the
    seed and sizes as a JSON-able dict and `restore` resumes exactly there.

    Args:
      arrays: feature name -> ``[N, ...]`` array.
      batch_size: rows per batch (<= N).
      seed: shuffling seed.
      shuffle: reshuffle each epoch.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True):
        n = _check_rows(arrays)
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} is larger than the {n} rows of the data set")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_rows = n
        self.batches_per_epoch = n // self.batch_size
        self.epoch = 0
        self.index = 0
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
                          if self.shuffle else np.arange(self.num_rows))
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.batches_per_epoch:
            self.epoch += 1
            self.index = 0
        rows = self._order(self.epoch)[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return {k: v[rows] for k, v in self.arrays.items()}

    def state(self) -> dict[str, int | bool]:
        """The position as a JSON-able dict (with the settings that make it meaningful)."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "shuffle": self.shuffle,
                "batch_size": self.batch_size, "num_rows": self.num_rows}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Resume at a position saved by `state`; the data set and settings must be the same."""
        for key in ("seed", "shuffle", "batch_size", "num_rows"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot restore the data position: saved {key}={state[key]!r}, "
                                 f"but this iterator has {key}={getattr(self, key)!r} (different data or settings)")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
            raise ValueError(f"invalid data position epoch={epoch}, index={index}")
        self.epoch, self.index = epoch, index


def eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int, pad_id: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """All rows once, in order, in batches of exactly ``batch_size`` (the last one is filled with
    rows that have no real tokens and no targets, so a jitted step sees one shape)."""
    n = _check_rows(arrays)
    for start in range(0, n, batch_size):
        batch = {k: np.asarray(v[start:start + batch_size]) for k, v in arrays.items()}
        short = batch_size - batch["input_ids"].shape[0] if "input_ids" in batch else 0
        if short > 0:
            for k, v in batch.items():
                fill = np.full((short, *v.shape[1:]), pad_id if k == "input_ids" else 0, v.dtype)
                batch[k] = np.concatenate([v, fill])
        yield batch


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, *, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Prompts for batched generation: ``(ids [B, W] int32, mask [B, W] bool)``, each row
    right-aligned (padding on the left), ``W`` the longest length rounded up to ``multiple``
    (a few bucket widths keep the number of compiled shapes small)."""
    if not seqs or any(len(x) == 0 for x in seqs):
        raise ValueError("left_pad needs at least one prompt and no empty prompt")
    width = -(-max(len(x) for x in seqs) // multiple) * multiple
    ids = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for i, x in enumerate(seqs):
        ids[i, width - len(x):] = x
        mask[i, width - len(x):] = True
    return ids, mask
