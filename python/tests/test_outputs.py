"""New output arrays: large ones (1 MiB and up) reuse the memory of outputs
Python has dropped, so every lookup must write every value (empty bags,
padding and dropped ids included) over whatever the memory held, and memory
still referenced (an array, a view of it, a torch tensor) is never reused."""

import numpy as np
import pytest
import torch
from conftest import bag_matrix

import embtable
import embtable.torch as et

ROWS, DIM = 3000, 128
N = 4096  # N * DIM floats: a 2 MiB output, recycled


def address(a):
    return a.__array_interface__["data"][0]


def poison(make):
    """Makes two outputs with `make()`, fills them with NaN and drops them:
    they are then the only spare buffers, so the next output of their size
    reuses one. Returns their addresses."""
    a, b = make(), make()
    a.fill(np.nan)
    b.fill(np.nan)
    addresses = {address(a), address(b)}
    del a, b
    return addresses


@pytest.fixture
def values(rng):
    return rng.standard_normal((ROWS, DIM)).astype(np.float32)


def csr_with_empty_bags(rng, bags=N):
    """Bags of 0 to 4 ids, a quarter of them empty (the first and last too)."""
    lengths = rng.integers(0, 5, bags)
    lengths[rng.random(bags) < 0.25] = 0
    lengths[[0, -1]] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return rng.integers(0, ROWS, offsets[-1]), offsets


def test_lookup_overwrites_a_reused_output(rng, values):
    table = embtable.Table.from_numpy(values)
    ids = rng.integers(0, ROWS, (64, N // 64))
    reused = poison(lambda: table.lookup(ids))
    out = table.lookup(ids)
    assert address(out) in reused
    assert out.shape == (64, N // 64, DIM) and out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, values[ids])


@pytest.mark.parametrize("mode,weighted", [(m, w) for m in ["sum", "mean", "sqrtn"]
                                             for w in [False, True]] + [("max", False)])
def test_pooled_lookup_overwrites_a_reused_output(rng, values, mode, weighted):
    table = embtable.Table.from_numpy(values)
    ids, offsets = csr_with_empty_bags(rng)
    weights = rng.uniform(0.5, 2.0, len(ids)).astype(np.float32) if weighted else None
    empty = offsets[1:] == offsets[:-1]
    run = lambda: table.pooled_lookup(ids, offsets[:-1], mode=mode, per_sample_weights=weights)
    reused = poison(run)
    out = run()
    assert address(out) in reused
    assert (out[empty] == 0).all()
    if mode == "max":
        expected = np.stack([values[ids[s:e]].max(0) if e > s else np.zeros(DIM)
                             for s, e in zip(offsets[:-1], offsets[1:])])
        np.testing.assert_array_equal(out, expected)
    else:
        expected = bag_matrix(offsets, len(ids), weights, mode) @ values[ids].astype(np.float64)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_layer_outputs_write_padding_dropped_and_renormed_rows(rng, values):
    # Padding ids and ids dropped by out_of_range="zero" give zero rows;
    # max_norm rows are rescaled at lookup; all over a reused output.
    pad, big = 7, 11
    values[big] *= 100.0  # norm ~1100, rescaled to 1
    layer = embtable.Embedding(values, embtable.Sgd.torch(), padding_idx=pad,
                               out_of_range="zero", max_norm=1.0, max_norm_at="lookup")
    ids = rng.integers(0, ROWS, N)
    ids[::5] = pad
    ids[1::7] = ROWS + 3  # out of range: dropped
    ids[2::9] = big
    reused = poison(lambda: layer.forward(ids))
    out = layer.forward(ids)
    assert address(out) in reused
    dropped = (ids == pad) | (ids >= ROWS)
    assert (out[dropped] == 0).all()
    kept = ids[~dropped]
    norms = np.linalg.norm(values[kept], axis=1, keepdims=True)
    expected = np.where(norms > 1.0, values[kept] * (1.0 / (norms + 1e-7)), values[kept])
    np.testing.assert_allclose(out[~dropped], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out[ids == big], axis=1), 1.0, rtol=1e-5)

    # Pooled: bags of padding only and empty bags are zero rows.
    bag_ids, offsets = csr_with_empty_bags(rng)
    bag_ids[::3] = pad
    run = lambda: layer.forward_pooled(bag_ids, offsets[:-1], mode="mean")
    reused = poison(run)
    pooled = run()
    assert address(pooled) in reused
    table = layer.weight  # padding row zero, rows renormed by the lookups
    for b, (s, e) in enumerate(zip(offsets[:-1], offsets[1:])):
        kept = bag_ids[s:e][bag_ids[s:e] != pad]
        if len(kept) == 0:
            assert (pooled[b] == 0).all(), b
        else:
            np.testing.assert_allclose(pooled[b], table[kept].mean(0), rtol=1e-5, atol=1e-6)


def test_per_sample_weight_gradient_overwrites_a_reused_output(rng):
    # One float per id: 2^18 ids make a 1 MiB output.
    rows, dim, n = 1000, 4, 1 << 18
    values = rng.standard_normal((rows, dim)).astype(np.float32)
    layer = embtable.Embedding(values, embtable.Sgd.torch(), padding_idx=3)
    ids = rng.integers(0, rows, n)
    ids[::10] = 3
    offsets = np.arange(0, n, 8)
    weights = rng.uniform(0.5, 2.0, n).astype(np.float32)
    g = rng.standard_normal((len(offsets), dim)).astype(np.float32)
    run = lambda: layer.per_sample_weights_grad(ids, offsets, grad_out=g, mode="sum",
                                                per_sample_weights=weights)
    reused = poison(run)
    dw = run()
    assert address(dw) in reused
    expected = np.einsum("nd,nd->n", values[ids].astype(np.float64), np.repeat(g, 8, axis=0))
    expected[ids == 3] = 0.0
    np.testing.assert_allclose(dw, expected, rtol=1e-4, atol=1e-4)


def test_outputs_still_referenced_are_never_reused(rng, values):
    table = embtable.Table.from_numpy(values)
    batches = [rng.integers(0, ROWS, N) for _ in range(5)]
    held = table.lookup(batches[0])
    view = table.lookup(batches[1])[N // 2:]  # only a view holds this one
    tensor = torch.from_numpy(table.lookup(batches[2]))  # only a tensor holds this one
    expected = [values[batches[0]], values[batches[1]][N // 2:], values[batches[2]]]
    for _ in range(4):  # outputs made and dropped: their memory is reused
        table.lookup(batches[3])
    latest = table.lookup(batches[4])
    addresses = {address(held), address(view.base), tensor.data_ptr(), address(latest)}
    assert len(addresses) == 4
    np.testing.assert_array_equal(held, expected[0])
    np.testing.assert_array_equal(view, expected[1])
    np.testing.assert_array_equal(tensor.numpy(), expected[2])
    np.testing.assert_array_equal(latest, values[batches[4]])
    # Once dropped, the tensor's memory is free for the next output.
    old = tensor.data_ptr()
    del tensor
    assert address(table.lookup(batches[3])) == old


def test_module_outputs_held_across_steps_stay_unchanged(rng, values):
    bag = et.EmbeddingBag.from_pretrained(torch.from_numpy(values), freeze=False, mode="sum",
                                          optimizer=embtable.Adagrad.torch(lr=0.1))
    first = bag(torch.from_numpy(rng.integers(0, ROWS, (N, 4))))
    first_values = first.detach().clone()
    second = bag(torch.from_numpy(rng.integers(0, ROWS, (N, 4))))
    second.backward(torch.ones_like(second))  # updates the table
    third = bag(torch.from_numpy(rng.integers(0, ROWS, (N, 4))))
    assert len({first.data_ptr(), second.data_ptr(), third.data_ptr()}) == 3
    assert torch.equal(first.detach(), first_values)
