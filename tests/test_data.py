"""Tests of qlora_jax.data: JSONL validation, chat-template loss masks, packing, batching, splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_jax import data as qd


class CharTokenizer:
    """A template-free tokenizer: one id per byte + 3 (0 pad, 1 bos, 2 eos)."""

    pad_id, bos_id, eos_id, chat_template = 0, 1, 2, None

    def encode(self, text, add_bos=None):
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8")


@pytest.fixture(scope="module")
def smol_tok(smollm2_path):
    from qlora_jax.io import load_tokenizer

    return load_tokenizer(smollm2_path)


# --------------------------------------------------------------------------------------------
# JSONL


def _write(tmp_path, name, lines: list[bytes | str]):
    p = tmp_path / name
    p.write_bytes(b"".join((x.encode("utf-8") if isinstance(x, str) else x) + b"\n" for x in lines))
    return p


def test_read_jsonl_both_kinds(tmp_path):
    p = _write(tmp_path, "pc.jsonl", [json.dumps({"prompt": "hi", "completion": "there", "id": 3}), "",
                                      json.dumps({"prompt": "a?", "completion": "b"})])
    recs = qd.read_jsonl(p)
    assert [(r.prompt, r.completion) for r in recs] == [("hi", "there"), ("a?", "b")]
    assert recs[1].source == f"{p}:3"  # blank line 2 skipped, line numbers kept
    t = qd.read_jsonl(_write(tmp_path, "t.jsonl", [json.dumps({"text": "doc one"}), json.dumps({"text": "doc two"})]))
    assert [r.text for r in t] == ["doc one", "doc two"]


@pytest.mark.parametrize("bad, what", [
    (b'{"prompt": "ok", "completion": "\xff\xfe"}', "not valid UTF-8"),
    ('{"prompt": "ok", "completion": ', "invalid JSON"),
    ('["prompt", "completion"]', "JSON object"),
    ('{"prompt": "only a prompt"}', "missing field 'completion'"),
    ('{"prompt": "", "completion": "x"}', "field 'prompt' is empty"),
    ('{"prompt": "  ", "completion": "x"}', "field 'prompt' is empty"),
    ('{"prompt": 3, "completion": "x"}', "must be a string"),
    ('{"question": "q", "answer": "a"}', "needs a 'text' field"),
    ('{"text": "a document"}', "mixed"),
])
def test_read_jsonl_bad_rows_name_file_and_line(tmp_path, bad, what):
    good = json.dumps({"prompt": "fine", "completion": "row"})
    p = _write(tmp_path, "bad.jsonl", [good, good, bad])
    with pytest.raises(ValueError) as e:
        qd.read_jsonl(p)
    msg = str(e.value)
    assert f"{p}:3" in msg
    assert what.split()[0] in msg if what != "mixed" else "earlier rows" in msg


def test_read_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        qd.read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no rows"):
        qd.read_jsonl(_write(tmp_path, "empty.jsonl", ["", "  "]))


def test_load_dataset_unknown_name():
    with pytest.raises(ValueError, match="unknown data set"):
        qd.load_dataset("not_a_dataset")


def test_builtin_splits_are_deterministic():
    tr, te = qd.load_dataset("lee")
    assert (len(tr), len(te)) == (250, 50)
    assert te[0].source == "lee_background[250]"
    tr1, te1 = qd.load_dataset("chatterbot")
    tr2, te2 = qd.load_dataset("chatterbot")
    assert tr1 == tr2 and te1 == te2
    n = len(tr1) + len(te1)
    assert len(te1) == round(0.1 * n)
    assert not {(r.prompt, r.completion) for r in tr1} & {(r.prompt, r.completion) for r in te1}


@given(n=st.integers(2, 60), frac=st.floats(0.01, 0.99), seed=st.one_of(st.none(), st.integers(0, 5)))
@settings(max_examples=40, deadline=None)
def test_split_heldout_partition(n, frac, seed):
    items = list(range(n))
    k = max(1, round(n * frac))
    if k >= n:
        with pytest.raises(ValueError, match="cannot hold out"):
            qd.split_heldout(items, frac, seed=seed)
        return
    tr, te = qd.split_heldout(items, frac, seed=seed)
    assert len(te) == k
    assert sorted(tr + te) == items and not set(tr) & set(te)
    assert tr == sorted(tr) and te == sorted(te)      # original order kept
    if seed is None:
        assert te == items[n - k:]
    assert qd.split_heldout(items, frac, seed=seed) == (tr, te)


# --------------------------------------------------------------------------------------------
# Tokenization and the completion-only mask


def test_chat_mask_covers_exactly_the_answer(smol_tok):
    prompt, completion = "What is the capital of France?", "Paris is the capital of France."
    ids, mask = qd.encode_instruction(smol_tok, prompt, completion)
    ids, mask = np.array(ids), np.array(mask, bool)
    assert len(ids) == len(mask)
    # The masked tokens are the answer and its end-of-turn token, nothing else.
    assert smol_tok.decode(ids[mask]) == completion + "<|im_end|>"
    first = int(np.argmax(mask))
    assert mask[first:first + mask.sum()].all()          # one contiguous span
    head = smol_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    assert smol_tok.decode(ids[:first]) == head
    full = smol_tok.apply_chat_template([{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": completion}], add_generation_prompt=False)
    assert smol_tok.decode(ids) == full


def test_chat_mask_with_system_prompt(smol_tok):
    ids, mask = qd.encode_instruction(smol_tok, "hi", "hello!", system="Be brief.")
    text = smol_tok.decode(ids)
    assert "Be brief." in text and "You are a helpful AI assistant" not in text
    assert smol_tok.decode(np.array(ids)[np.array(mask, bool)]) == "hello!<|im_end|>"


def test_no_template_fallback():
    tok = CharTokenizer()
    ids, mask = qd.encode_instruction(tok, "ab", "cd")
    assert ids == [ord("a") + 3, ord("b") + 3, ord("\n") + 3, ord("c") + 3, ord("d") + 3, 2]
    assert mask == [0, 0, 0, 1, 1, 1]
    assert qd.encode_text(tok, "xy") == [ord("x") + 3, ord("y") + 3, 2]


# --------------------------------------------------------------------------------------------
# Packing


def _seqs(lengths, rng, full_mask=False):
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(3, 1000, n).astype(np.int32)
        mask = np.ones(n, np.int32) if full_mask else (rng.random(n) < 0.5).astype(np.int32)
        out.append(qd.TokenizedSequence(ids, mask, f"s{i}"))
    return out


def _segments(rows):
    """[(row, start, stop)] of every segment, in row-major order."""
    out = []
    for i, seg in enumerate(rows["segment_ids"]):
        for s in range(1, int(seg.max()) + 1):
            where = np.flatnonzero(seg == s)
            assert where.size and np.all(np.diff(where) == 1)  # contiguous
            out.append((i, int(where[0]), int(where[-1]) + 1))
    return out


@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=25), seq_len=st.integers(2, 32),
       seed=st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_pack_split_reproduces_the_stream(lengths, seq_len, seed):
    seqs = _seqs(lengths, np.random.default_rng(seed))
    rows = qd.pack_sequences(seqs, seq_len, pad_id=0, split=True)
    real = rows["attention_mask"].astype(bool)
    # All tokens, in order, with nothing lost or added; every row but the last is full.
    np.testing.assert_array_equal(rows["input_ids"][real], np.concatenate([s.ids for s in seqs]))
    assert real[:-1].all()
    assert rows["input_ids"].shape[0] == -(-sum(lengths) // seq_len)
    np.testing.assert_array_equal(real, rows["segment_ids"] > 0)
    want_mask = np.concatenate([s.loss_mask for s in seqs])
    got_mask = rows["loss_mask"][real]
    starts = np.zeros(real.sum(), bool)
    offset = np.cumsum([0] + [int(r.sum()) for r in real])
    for i, a, b in _segments(rows):
        assert np.array_equal(rows["positions"][i, a:b], np.arange(b - a))
        starts[offset[i] + a] = True
    np.testing.assert_array_equal(got_mask[~starts], want_mask[~starts])
    assert not got_mask[starts].any()                  # a segment's first token is never a target
    assert not rows["loss_mask"][~real].any()


@given(lengths=st.lists(st.integers(1, 16), min_size=1, max_size=25), seq_len=st.integers(16, 40),
       seed=st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_pack_whole_keeps_each_sequence_in_one_segment(lengths, seq_len, seed):
    seqs = _seqs(lengths, np.random.default_rng(seed))
    rows = qd.pack_sequences(seqs, seq_len, pad_id=7, split=False)
    segs = _segments(rows)
    assert len(segs) == len(seqs)
    for s, (i, a, b) in zip(seqs, segs):
        np.testing.assert_array_equal(rows["input_ids"][i, a:b], s.ids)
        np.testing.assert_array_equal(rows["loss_mask"][i, a + 1:b], s.loss_mask[1:])
        assert rows["loss_mask"][i, a] == 0
    assert (rows["input_ids"][rows["attention_mask"] == 0] == 7).all()
    # Next-fit: a new row starts only when the next sequence does not fit the current one.
    fill = [int(r.sum()) for r in rows["attention_mask"]]
    first_of_row = [next(k for k, (i, _, _) in enumerate(segs) if i == r) for r in range(len(fill))]
    for r in range(1, len(fill)):
        assert fill[r - 1] + lengths[first_of_row[r]] > seq_len


def test_pad_sequences_layout():
    seqs = _seqs([3, 5], np.random.default_rng(0), full_mask=True)
    rows = qd.pad_sequences(seqs, 6, pad_id=9)
    np.testing.assert_array_equal(rows["attention_mask"], [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(rows["input_ids"][0], [*seqs[0].ids, 9, 9, 9])
    np.testing.assert_array_equal(rows["loss_mask"], [[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(rows["positions"][1], [0, 1, 2, 3, 4, 0])
    with pytest.raises(ValueError, match="does not fit"):
        qd.pad_sequences(seqs, 4, pad_id=0)


def test_build_sequences_truncation_and_limits():
    tok = CharTokenizer()
    recs = [qd.PromptCompletion("p" * 5, "c" * 10, "f.jsonl:1"), qd.PromptCompletion("q" * 30, "d", "f.jsonl:2"),
            qd.PromptCompletion("r", "e", "f.jsonl:3")]
    rows, stats = qd.build_sequences(recs, tok, 12, max_positions=100)
    # Example 1 (17 tokens) is cut to 12, example 2 has its whole answer cut (dropped).
    assert (stats.truncated, stats.dropped, stats.records) == (2, 1, 3)
    assert stats.target_tokens == int(rows["loss_mask"].sum()) == 6 + 2
    with pytest.raises(ValueError, match=r"f\.jsonl:1: example is 17 tokens long, more than seq_len=12"):
        qd.build_sequences(recs, tok, 12, max_positions=100, truncate=False)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        qd.build_sequences(recs[1:2], tok, 12, max_positions=16, truncate=False)
    with pytest.raises(ValueError, match="longer than the model's max_position_embeddings=8"):
        qd.build_sequences(recs, tok, 12, max_positions=8)
    with pytest.raises(ValueError, match="no example"):
        qd.build_sequences(recs[1:2], tok, 12)
    with pytest.raises(ValueError, match="all be PromptCompletion or all TextDocument"):
        qd.build_sequences([recs[0], qd.TextDocument("x")], tok, 12)


def test_build_text_packs_documents_with_eos(smol_tok):
    docs = [qd.TextDocument("The cat sat on the mat."), qd.TextDocument("Dogs bark at night.")]
    rows, stats = qd.build_sequences(docs, smol_tok, 8)
    real = rows["input_ids"][rows["attention_mask"] == 1]
    want = smol_tok.encode(docs[0].text) + [smol_tok.eos_id] + smol_tok.encode(docs[1].text) + [smol_tok.eos_id]
    np.testing.assert_array_equal(real, want)
    assert stats.tokens == len(want)


# --------------------------------------------------------------------------------------------
# Batches


def _rows(n, t=4):
    return {"input_ids": np.arange(n * t, dtype=np.int32).reshape(n, t), "loss_mask": np.ones((n, t), np.int32)}


def test_iterator_epochs_are_permutations_and_seeded():
    rows = _rows(10)
    it = qd.BatchIterator(rows, 3, seed=5)
    for epoch in range(3):
        seen = np.concatenate([next(it)["input_ids"][:, 0] // 4 for _ in range(it.batches_per_epoch)])
        assert len(seen) == 9 and len(set(seen.tolist())) == 9
    assert it.epoch == 2
    a = [next(qd.BatchIterator(rows, 3, seed=5))["input_ids"] for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    first = [qd.BatchIterator(rows, 3, seed=s)._order(0).tolist() for s in range(4)]
    assert len({tuple(f) for f in first}) > 1
    ordered = qd.BatchIterator(rows, 5, shuffle=False)
    np.testing.assert_array_equal(next(ordered)["input_ids"], rows["input_ids"][:5])


def test_iterator_state_restores_exactly():
    rows = _rows(11)
    it = qd.BatchIterator(rows, 4, seed=1)
    for _ in range(5):
        next(it)
    saved = json.loads(json.dumps(it.state()))  # survives JSON
    want = [next(it)["input_ids"] for _ in range(7)]
    it2 = qd.BatchIterator(rows, 4, seed=1)
    it2.restore(saved)
    got = [next(it2)["input_ids"] for _ in range(7)]
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
    with pytest.raises(ValueError, match="seed"):
        qd.BatchIterator(rows, 4, seed=2).restore(saved)
    with pytest.raises(ValueError, match="num_rows"):
        qd.BatchIterator(_rows(12), 4, seed=1).restore(saved)
    with pytest.raises(ValueError, match="larger than the 11 rows"):
        qd.BatchIterator(rows, 12)


def test_eval_batches_cover_all_rows_once():
    rows = _rows(7)
    batches = list(qd.eval_batches(rows, 3, pad_id=0))
    assert [b["input_ids"].shape for b in batches] == [(3, 4)] * 3
    got = np.concatenate([b["input_ids"] for b in batches])[:7]
    np.testing.assert_array_equal(got, rows["input_ids"])
    assert batches[-1]["loss_mask"][1:].sum() == 0
