"""Grain pipelines and SASRec transforms: determinism, process slicing, resume, eval padding."""
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rsllm_jax.data import pipeline
from rsllm_jax.data.sasrec_batches import (
    SasrecEvalTransform, SasrecNegatives, SasrecWindows, left_pad, sample_window_negatives,
)

NUM_ITEMS = 50


def _records(n=37, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        items = rng.choice(NUM_ITEMS, size=int(rng.integers(4, 12)), replace=False).tolist()
        out.append({"user": f"u{k}", "history": items[:-1], "target": items[-1], "idx": k})
    return out


def _index(record):
    return {"idx": np.int32(record["idx"])}


def _sasrec(recs, **kw):
    """The SASRec training pipeline as the trainer builds it: windows per record, negatives per batch."""
    return pipeline.train_dataset(recs, SasrecWindows(NUM_ITEMS), batch_transform=SasrecNegatives(NUM_ITEMS), **kw)


def _take(ds, k):
    it = iter(ds)
    return [next(it) for _ in range(k)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_train_deterministic_and_seeded():
    recs = _records()
    make = lambda seed: _sasrec(recs, global_batch_size=8, seed=seed,  # noqa: E731
                                process_index=0, process_count=1)
    a, b, c = _take(make(1), 6), _take(make(1), 6), _take(make(2), 6)
    _assert_same(a, b)
    assert not all(np.array_equal(x["seq"], y["seq"]) for x, y in zip(a, c))
    for batch in a:
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
            k: ((8, 10), np.int32) for k in ("seq", "pos", "neg")}


def test_epochs_reshuffle_and_cover():
    recs = _records(n=32)
    ds = pipeline.train_dataset(recs, _index, global_batch_size=8, seed=0, num_epochs=2,
                                process_index=0, process_count=1)
    idx = np.concatenate([b["idx"] for b in ds])
    assert len(idx) == 64
    first, second = idx[:32], idx[32:]
    assert sorted(first) == sorted(second) == list(range(32))
    assert not np.array_equal(first, second)


def test_process_slices_are_disjoint_and_cover():
    recs = _records(n=40)
    per_process = []
    for p in range(4):
        ds = pipeline.train_dataset(recs, _index, global_batch_size=8, seed=0, num_epochs=1,
                                    process_index=p, process_count=4)
        batches = list(ds)
        assert len(batches) == 5 and all(b["idx"].shape == (2,) for b in batches)
        per_process.append(np.concatenate([b["idx"] for b in batches]))
    everything = np.concatenate(per_process)
    assert len(set(everything.tolist())) == 40 == len(everything)


def test_random_draws_do_not_depend_on_process_count():
    """Negatives depend on (seed, global batch) only, so 1 or 2 processes see the same examples."""
    recs = _records()
    one = _take(_sasrec(recs, global_batch_size=8, seed=5, process_index=0, process_count=1), 2)
    for p in range(2):
        half = _take(_sasrec(recs, global_batch_size=8, seed=5, process_index=p, process_count=2), 2)
        for full, part in zip(one, half):
            assert part["seq"].shape == (4, 10)
            for key in ("seq", "pos", "neg"):
                np.testing.assert_array_equal(full[key][p::2], part[key])


def test_resume_from_state():
    recs = _records()
    make = lambda: _sasrec(recs, global_batch_size=4, seed=3, process_index=1, process_count=2)  # noqa: E731
    uninterrupted = _take(make(), 12)
    it = iter(make())
    for _ in range(7):
        next(it)
    state = it.get_state()
    fresh = iter(make())
    fresh.set_state(state)
    _assert_same([next(fresh) for _ in range(5)], uninterrupted[7:])


def test_resume_through_orbax(tmp_path):
    recs = _records()
    make = lambda: iter(_sasrec(recs, global_batch_size=4, seed=3, process_index=0, process_count=1))  # noqa: E731
    reference = make()
    ref_batches = [next(reference) for _ in range(9)]
    it = make()
    for _ in range(4):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("iter",)) as mgr:
        mgr.save(4, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    restored = make()
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("iter",)) as mgr:
        mgr.restore(4, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointRestore(restored)))
    _assert_same([next(restored) for _ in range(5)], ref_batches[4:])


def test_eval_padding_and_order():
    recs = _records(n=21)
    for r in recs:
        r["candidates"] = list(range(20))
    seen = []
    for p in range(2):
        ds = pipeline.eval_dataset(recs, SasrecEvalTransform(NUM_ITEMS), global_batch_size=8,
                                   process_index=p, process_count=2)
        batches = list(ds)
        assert len(batches) == 3  # ceil(21 / 8) global batches on every process
        for b in batches:
            assert b["seq"].shape == (4, 10) and b["candidates"].shape == (4, 20)
            assert b["valid"].dtype == np.bool_ and b["target"].dtype == np.int32
        seen.append([(int(t), bool(v)) for b in batches for t, v in zip(b["target"], b["valid"])])
    valid = [x for x in seen[0] + seen[1] if x[1]]
    assert len(valid) == 21
    # Interleaving the processes restores the record order.
    interleaved = [x for pair in zip(seen[0], seen[1]) for x in pair][:21]
    assert [t for t, _ in interleaved] == [r["target"] for r in recs]
    # A random-style eval transform is fixed-seeded, hence repeatable.
    draw = lambda record, rng: {"x": rng.integers(1000, size=3)}  # noqa: E731
    ds = lambda: pipeline.eval_dataset(recs, draw, global_batch_size=8,  # noqa: E731
                                       process_index=0, process_count=1)
    _assert_same(list(ds()), list(ds()))
    assert len({tuple(x) for b in ds() for x in b["x"]}) > 1  # random per example, not one draw


def test_bad_batch_size():
    with pytest.raises(ValueError, match="multiple of process_count"):
        pipeline.train_dataset(_records(), _index, global_batch_size=6, seed=0,
                               process_index=0, process_count=4)


def test_default_process_from_jax():
    ds = pipeline.train_dataset(_records(), _index, global_batch_size=4, seed=0, num_epochs=1)
    assert next(iter(ds))["idx"].shape == (4,)  # single-process test run: local = global


def test_worker_processes_match_in_process():
    recs = _records()
    kw = dict(global_batch_size=4, seed=2, process_index=0, process_count=1)
    _assert_same(_take(_sasrec(recs, worker_count=1, **kw), 3), _take(_sasrec(recs, **kw), 3))


# ---- SASRec transforms ---------------------------------------------------------------------

def _one(rec, num_items, max_len):
    window = SasrecWindows(num_items, max_len).map(rec)
    batch = {k: v[None] for k, v in window.items()}
    return {k: v[0] for k, v in SasrecNegatives(num_items).random_map(batch, np.random.default_rng(0)).items()}


def test_sasrec_train_layout():
    rec = {"user": "u", "history": [5, 6, 7], "target": 8}
    out = _one(rec, num_items=20, max_len=5)
    P = 20
    np.testing.assert_array_equal(out["seq"], [P, P, 5, 6, 7])
    np.testing.assert_array_equal(out["pos"], [P, P, 6, 7, 8])
    assert out["neg"][:2].tolist() == [P, P]
    negs = out["neg"][2:].tolist()
    assert len(set(negs)) == 3 and not set(negs) & {5, 6, 7, 8} and all(0 <= n < P for n in negs)
    assert all(v.dtype == np.int32 for v in out.values())


def test_sasrec_truncates_long_history():
    rec = {"user": "u", "history": list(range(12)), "target": 12}
    out = _one(rec, num_items=30, max_len=10)
    np.testing.assert_array_equal(out["seq"], range(2, 12))
    np.testing.assert_array_equal(out["pos"], range(3, 13))
    assert not set(out["neg"].tolist()) & set(range(2, 13))  # never an item of the window


def test_window_negatives_properties_and_uniformity():
    """Vectorised sampler: per row, negatives avoid the window, are distinct, sit on the real positions,
    and are uniform over the allowed items."""
    num_items, length, rows = 40, 6, 4000
    rng = np.random.default_rng(1)
    seq = np.full((rows, length), num_items, np.int32)
    pos = seq.copy()
    for r in range(rows):
        n = int(rng.integers(1, length + 1))
        items = rng.choice(num_items, size=n + 1, replace=False)
        seq[r, length - n:], pos[r, length - n:] = items[:-1], items[1:]
    neg = sample_window_negatives(np.random.default_rng(2), seq, pos, num_items)
    for r in range(rows):
        real = pos[r] != num_items
        assert (neg[r][~real] == num_items).all()
        drawn = neg[r][real]
        assert len(set(drawn.tolist())) == len(drawn) and (drawn < num_items).all()
        assert not set(drawn.tolist()) & set(seq[r].tolist() + pos[r].tolist())
    # Row 0's window fixed, redrawn many times: every allowed item about equally often.
    fixed_seq, fixed_pos = np.repeat(seq[:1], rows, 0), np.repeat(pos[:1], rows, 0)
    counts = np.bincount(sample_window_negatives(np.random.default_rng(3), fixed_seq, fixed_pos, num_items).ravel(),
                         minlength=num_items + 1)[:num_items]
    allowed = np.setdiff1d(np.arange(num_items), np.concatenate([seq[0], pos[0]]))
    assert counts[np.setdiff1d(np.arange(num_items), allowed)].sum() == 0
    expected = counts.sum() / len(allowed)
    chi2 = ((counts[allowed] - expected) ** 2 / expected).sum()
    assert chi2 < len(allowed) + 6 * np.sqrt(2 * len(allowed))  # ~6 sigma above the chi2 mean


def test_window_negatives_tiny_catalogue():
    # 5 items in the window, 4 negatives needed from the 4 left: rejection rarely succeeds -> exact fallback.
    seq = np.array([[9, 0, 1, 2, 3]], np.int32)
    pos = np.array([[9, 1, 2, 3, 4]], np.int32)
    neg = sample_window_negatives(np.random.default_rng(0), seq, pos, num_items=9)
    assert neg[0, 0] == 9 and sorted(neg[0, 1:].tolist()) == [5, 6, 7, 8]
    with pytest.raises(ValueError, match="cannot draw 4 negatives"):
        sample_window_negatives(np.random.default_rng(0), np.where(seq == 9, 8, seq), np.where(pos == 9, 8, pos),
                                num_items=8)  # 3 items left outside the window


def test_sasrec_eval_transform():
    rec = {"user": "u", "history": [1, 2, 3], "target": 4, "candidates": list(range(4, 24))}
    out = SasrecEvalTransform(num_items=30).map(rec)
    assert out["seq"].tolist() == [30] * 7 + [1, 2, 3] and int(out["target"]) == 4
    assert out["candidates"].shape == (20,)
    with pytest.raises(ValueError, match="expected 20"):
        SasrecEvalTransform(num_items=30).map({**rec, "candidates": [4, 5]})
    assert left_pad([1, 2], 4, 9).tolist() == [9, 9, 1, 2]


def test_sample_negatives_helper():
    rng = np.random.default_rng(0)
    negs = pipeline.sample_negatives(rng, [0, 1], 2, 10, 7)
    assert sorted(negs) == list(range(3, 10))
    with pytest.raises(ValueError):
        pipeline.sample_negatives(rng, [0, 1], 2, 10, 8)
