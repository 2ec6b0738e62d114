"""Batching of in-memory splits: host shares, padded eval, epoch order, device prefetch."""

import itertools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tlflax import data
from tlflax.data import splits

N = 37  # not a multiple of any batch below


def make_split(n=N, *, process_index=0, process_count=1, seed=0):
    images = np.zeros((n, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256  # each image carries its id
    images[:, 0, 0, 1] = np.arange(n) // 256
    labels = np.arange(n) % 3
    return data.ArraySplit(
        images,
        labels,
        name="t",
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )


def ids(batch):
    image = batch["image"]
    return image[:, 0, 0, 0].astype(int) + 256 * image[:, 0, 0, 1].astype(int)


def collect(process_count, **kw):
    """Global batches re-assembled from every host's share, as a list of (ids, masks)."""
    hosts = [
        list(make_split(process_index=p, process_count=process_count).iterate(**kw))
        for p in range(process_count)
    ]
    assert len({len(h) for h in hosts}) == 1  # every host runs the same number of steps
    return [
        (np.concatenate([ids(b) for b in step]), np.concatenate([b["mask"] for b in step]))
        for step in zip(*hosts, strict=True)
    ]


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once_with_padding_masked(process_count):
    steps = collect(process_count, global_batch=8, epoch=0, shuffle=False, drop_remainder=False)
    assert len(steps) == 5  # ceil(37 / 8)
    seen = np.concatenate([i[m] for i, m in steps])
    assert sorted(seen.tolist()) == list(range(N))
    masks = np.concatenate([m for _, m in steps])
    assert masks.sum() == N and not masks[N:].any()
    last = make_split(process_index=process_count - 1, process_count=process_count)
    batch = list(last.iterate(global_batch=8, epoch=0, shuffle=False, drop_remainder=False))[-1]
    assert batch["image"].shape == (8 // process_count, 4, 4, 3)
    assert (batch["image"][~batch["mask"]] == 0).all()
    assert (batch["label"][~batch["mask"]] == 0).all()


@pytest.mark.parametrize("process_count", [1, 2])
def test_train_epoch_order_depends_on_seed_and_epoch_only(process_count):
    kw = dict(global_batch=8, shuffle=True, drop_remainder=True)
    first = collect(process_count, epoch=3, **kw)
    again = collect(process_count, epoch=3, **kw)
    other = collect(process_count, epoch=4, **kw)
    assert len(first) == N // 8
    order = np.concatenate([i for i, _ in first])
    assert len(set(order.tolist())) == len(order)  # no example twice in an epoch
    np.testing.assert_array_equal(order, np.concatenate([i for i, _ in again]))
    assert not np.array_equal(order, np.concatenate([i for i, _ in other]))
    assert all(m.all() for _, m in first)
    # The same global order whatever the number of hosts.
    single = np.concatenate([i for i, _ in collect(1, epoch=3, **kw)])
    np.testing.assert_array_equal(order, single)


def test_resume_mid_epoch_sees_the_same_batches():
    split = make_split()
    kw = dict(global_batch=4, epoch=1, shuffle=True, drop_remainder=True)
    whole = [ids(b) for b in split.iterate(**kw)]
    resumed = [ids(b) for b in itertools.islice(make_split().iterate(**kw), 5, None)]
    assert len(whole) == split.batches_per_epoch(4) == 9
    for a, b in zip(whole[5:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_batch_must_split_over_hosts():
    with pytest.raises(ValueError, match="multiple of 2"):
        next(
            make_split(process_count=2).iterate(
                global_batch=5, epoch=0, shuffle=False, drop_remainder=True
            )
        )


def test_stratified_split_is_seeded_and_keeps_every_class():
    labels = np.repeat(np.arange(4), [10, 10, 3, 2])
    train, val = splits.stratified_split(labels, fraction=0.2, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[val]).tolist() == [2, 2, 1, 1]
    assert set(labels[train].tolist()) == {0, 1, 2, 3}
    again, _ = splits.stratified_split(labels, fraction=0.2, seed=0)
    other, _ = splits.stratified_split(labels, fraction=0.2, seed=1)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)


def test_prefetch_to_device_lays_out_global_batches():
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    split = make_split()
    host = list(split.iterate(global_batch=8, epoch=0, shuffle=True, drop_remainder=True))
    on_device = list(
        data.prefetch_to_device(
            split.iterate(global_batch=8, epoch=0, shuffle=True, drop_remainder=True), 2, sharding
        )
    )
    assert len(on_device) == len(host)
    for h, d in zip(host, on_device, strict=True):
        assert d["image"].sharding == sharding and d["image"].shape == (8, 4, 4, 3)
        for key in h:
            np.testing.assert_array_equal(np.asarray(d[key]), h[key])


def test_prefetch_stops_early_and_reraises():
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()[:1]), ("data",)), PartitionSpec("data"))
    endless = ({"x": np.full((2,), i)} for i in itertools.count())
    first = list(itertools.islice(data.prefetch_to_device(endless, 2, sharding), 3))
    assert [int(b["x"][0]) for b in first] == [0, 1, 2]

    def broken():
        yield {"x": np.zeros(2)}
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(data.prefetch_to_device(broken(), 2, sharding))
