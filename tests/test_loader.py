"""SplitLoader's batch contract and epoch order, and the missing-modality masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrepro.data.loader import Batch, SplitLoader
from mmrepro.data.missing import incomplete_patterns, present_mask
from mmrepro.data.schema import DatasetSchema, ModalitySpec, TaskSpec
from mmrepro.data.store import FeatureStore, write_store

SCHEMA = DatasetSchema(
    name="tiny",
    modalities=(ModalitySpec("a", length=6, dim=5), ModalitySpec("b", length=4, dim=3)),
    tasks=(TaskSpec("score", "regression", value_range=(-3.0, 3.0)), TaskSpec("cls", "classification", num_classes=3)),
    splits=("train",),
)


def make_arrays(n: int, seed: int = 0, float_dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x/a": rng.standard_normal((n, 6, 5)).astype(float_dtype),
        "len/a": rng.integers(1, 7, size=n).astype(np.int64),
        "x/b": rng.standard_normal((n, 4, 3)).astype(float_dtype),
        "len/b": rng.integers(0, 5, size=n).astype(np.int32),
        "y/score": rng.uniform(-3, 3, size=n).astype(float_dtype),
        "y/cls": rng.integers(0, 3, size=n).astype(np.int64),
        "ids": np.array([f"s{i}" for i in range(n)]),
    }


def loader(arrays, task="score", **kw) -> SplitLoader:
    kw = {"batch_size": 4, "shuffle": False, "seed": 0, **kw}
    return SplitLoader(arrays, SCHEMA, task, **kw)


def epoch_rows(ld: SplitLoader) -> list[list[int]]:
    return [b.index.tolist() for b in ld]


# ---------------------------------------------------------------------------------------------
# Batch contract


@pytest.mark.parametrize("float_dtype", [np.float32, np.float64])
def test_batch_contract_regression(float_dtype):
    arrays = make_arrays(10, float_dtype=float_dtype)
    batches = list(loader(arrays))
    b = batches[0]
    assert isinstance(b, Batch) and len(b) == 4
    assert set(b.x) == {"a", "b"} and set(b.lengths) == {"a", "b"}
    assert b.x["a"].shape == (4, 6, 5) and b.x["b"].shape == (4, 4, 3)
    assert b.x["a"].dtype == b.x["b"].dtype == torch.float32
    assert b.lengths["a"].shape == b.lengths["b"].shape == (4,)
    assert b.lengths["a"].dtype == b.lengths["b"].dtype == torch.int64
    assert b.present.shape == (4, 2) and b.present.dtype == torch.bool
    assert bool(b.present.all())  # no present array, no mask given: all present
    assert b.y.shape == (4,) and b.y.dtype == torch.float32
    assert b.index.dtype == torch.int64 and b.index.tolist() == [0, 1, 2, 3]
    rows = np.arange(4, 8)
    b1 = batches[1]
    np.testing.assert_allclose(b1.x["a"].numpy(), arrays["x/a"][rows].astype(np.float32))
    np.testing.assert_array_equal(b1.x["b"].numpy(), arrays["x/b"][rows].astype(np.float32))
    np.testing.assert_array_equal(b1.lengths["b"].numpy(), arrays["len/b"][rows])
    np.testing.assert_array_equal(b1.y.numpy(), arrays["y/score"][rows].astype(np.float32))


def test_batch_contract_classification():
    arrays = make_arrays(6)
    b = next(iter(loader(arrays, task="cls", batch_size=6)))
    assert b.y.dtype == torch.long and b.y.shape == (6,)
    np.testing.assert_array_equal(b.y.numpy(), arrays["y/cls"])


def test_batch_from_memory_mapped_store(tmp_path):
    arrays = make_arrays(9, seed=3)
    write_store(tmp_path / "s", SCHEMA, [("train", arrays, {})], {"source": "t"})
    split = FeatureStore(tmp_path / "s").open_split("train")
    assert isinstance(split["x/a"], np.memmap)
    ld = loader(split, batch_size=4, shuffle=True, seed=1)
    seen = []
    for b in ld:
        rows = b.index.numpy()
        assert b.x["a"].dtype == torch.float32
        np.testing.assert_array_equal(b.x["a"].numpy(), arrays["x/a"][rows])
        np.testing.assert_array_equal(b.y.numpy(), arrays["y/score"][rows])
        seen += rows.tolist()
    assert sorted(seen) == list(range(9))


def test_present_from_arrays_and_explicit_mask():
    arrays = make_arrays(5)
    stored = np.array([[1, 1], [0, 1], [1, 0], [1, 1], [0, 1]], dtype=bool)
    arrays["present"] = stored
    b = next(iter(loader(arrays, batch_size=5)))
    np.testing.assert_array_equal(b.present.numpy(), stored)
    given = ~stored | np.array([[1, 0]] * 5, dtype=bool)
    b = next(iter(loader(arrays, batch_size=5, present=given)))
    np.testing.assert_array_equal(b.present.numpy(), given)


def test_transform_is_applied_to_every_batch():
    calls = []

    def tf(batch: Batch) -> Batch:
        calls.append(batch.index.tolist())
        batch.y = batch.y + 100.0
        return batch

    arrays = make_arrays(6)
    ys = [b.y for b in loader(arrays, transform=tf)]
    assert calls == [[0, 1, 2, 3], [4, 5]]
    np.testing.assert_allclose(torch.cat(ys).numpy(), arrays["y/score"] + 100.0, rtol=1e-6)


def test_batch_to_keeps_values():
    b = next(iter(loader(make_arrays(4))))
    c = b.to("cpu")
    assert torch.equal(c.x["a"], b.x["a"]) and torch.equal(c.present, b.present)
    assert torch.equal(c.y, b.y) and torch.equal(c.index, b.index)


# ---------------------------------------------------------------------------------------------
# Epoch order


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_row_exactly_once_per_epoch_with_partial_last_batch(shuffle):
    ld = loader(make_arrays(10), batch_size=4, shuffle=shuffle, seed=7)
    assert len(ld) == 3
    for _ in range(3):
        rows = epoch_rows(ld)
        assert [len(r) for r in rows] == [4, 4, 2]
        flat = [i for r in rows for i in r]
        assert sorted(flat) == list(range(10))


def test_exact_multiple_has_no_empty_batch():
    ld = loader(make_arrays(8), batch_size=4)
    assert len(ld) == 2 and [len(r) for r in epoch_rows(ld)] == [4, 4]


def test_no_shuffle_is_sorted_and_the_same_every_epoch():
    ld = loader(make_arrays(10), batch_size=3, shuffle=False)
    first = epoch_rows(ld)
    assert first == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert epoch_rows(ld) == first


def test_shuffle_order_depends_on_seed_and_epoch_only():
    n = 40
    a = loader(make_arrays(n, seed=0), batch_size=8, shuffle=True, seed=3)
    b = loader(make_arrays(n, seed=99), batch_size=8, shuffle=True, seed=3)  # other data, same seed
    a1, a2 = epoch_rows(a), epoch_rows(a)
    b1, b2 = epoch_rows(b), epoch_rows(b)
    assert a1 == b1 and a2 == b2                      # same (seed, epoch): same order
    assert a1 != a2                                    # next epoch: another order
    flat = [i for r in a1 for i in r]
    assert flat != list(range(n))                      # actually shuffled
    c = loader(make_arrays(n), batch_size=8, shuffle=True, seed=4)
    assert epoch_rows(c) != a1                         # other seed: other order
    # a fresh loader set to epoch 1 reproduces the second epoch (resumable)
    d = loader(make_arrays(n), batch_size=8, shuffle=True, seed=3)
    d.epoch = 1
    assert epoch_rows(d) == a2
    # the order is the documented generator's permutation, cut into batches
    perm = np.random.default_rng([3, 0]).permutation(n)
    assert [sorted(perm[i:i + 8].tolist()) for i in range(0, n, 8)] == a1


# ---------------------------------------------------------------------------------------------
# Missing-modality masks


def test_present_mask_hits_rate_within_sampling_error():
    n, rate = 20000, 0.3
    mask = present_mask(n, 3, rate, seed=0, split="train")
    assert mask.shape == (n, 3) and mask.dtype == bool
    incomplete = ~mask.all(axis=1)
    se = np.sqrt(rate * (1 - rate) / n)
    assert abs(incomplete.mean() - rate) < 4 * se
    # incomplete rows keep >= 1 and drop >= 1 modality
    kept = mask[incomplete].sum(axis=1)
    assert kept.min() >= 1 and kept.max() <= 2
    # the six patterns of protocol "any" all occur, each near 1/6 of incomplete rows
    pats, counts = np.unique(mask[incomplete], axis=0, return_counts=True)
    assert len(pats) == 6
    frac = counts / counts.sum()
    assert np.all(np.abs(frac - 1 / 6) < 4 * np.sqrt((1 / 6) * (5 / 6) / counts.sum()))


def test_protocol_single_drops_exactly_one():
    mask = present_mask(5000, 3, 0.5, seed=1, split="valid", protocol="single")
    incomplete = ~mask.all(axis=1)
    assert 0.45 < incomplete.mean() < 0.55
    assert set(mask[incomplete].sum(axis=1).tolist()) == {2}
    assert len(np.unique(mask[incomplete], axis=0)) == 3


def test_incomplete_patterns():
    any2 = incomplete_patterns(2, "any")
    assert sorted(map(tuple, any2.tolist())) == [(False, True), (True, False)]
    assert len(incomplete_patterns(3, "any")) == 6 and len(incomplete_patterns(4, "any")) == 14
    assert len(incomplete_patterns(4, "single")) == 4
    with pytest.raises(ValueError, match="unknown missing protocol 'most'"):
        incomplete_patterns(3, "most")


def test_present_mask_is_deterministic_and_keyed_by_seed_and_split():
    a = present_mask(500, 3, 0.4, seed=2, split="train")
    np.testing.assert_array_equal(a, present_mask(500, 3, 0.4, seed=2, split="train"))
    assert not np.array_equal(a, present_mask(500, 3, 0.4, seed=2, split="test"))
    assert not np.array_equal(a, present_mask(500, 3, 0.4, seed=3, split="train"))
    # the protocol is part of the key as well
    assert not np.array_equal(a, present_mask(500, 3, 0.4, seed=2, split="train", protocol="single"))


def test_rate_zero_is_complete():
    assert present_mask(300, 2, 0.0, seed=0, split="train").all()


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_rate_outside_unit_interval_raises(rate):
    with pytest.raises(ValueError, match=r"missing rate must lie in \[0, 1\)"):
        present_mask(10, 3, rate, seed=0, split="train")


def test_rate_zero_with_one_modality_is_complete():
    assert present_mask(5, 1, 0.0, seed=0, split="train").all()


def test_present_columns_follow_the_selected_modalities():
    arrays = make_arrays(4)
    arrays["present"] = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    b = next(iter(loader(arrays, modalities=["b"])))
    assert list(b.x) == ["b"]
    assert b.present.shape == (4, 1)
    np.testing.assert_array_equal(b.present[:, 0].numpy(), arrays["present"][:, 1])
