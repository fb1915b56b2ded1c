"""The NumPy level: lookups, pooled lookups and gradients equal the one-hot
matrix products; optimizers, presets and the Embedding layer."""

import pickle

import numpy as np
import pytest
from conftest import bag_matrix, onehot

import embtable

INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


def table_and_values(rng, rows=50, dim=21):
    values = rng.standard_normal((rows, dim)).astype(np.float32)
    return embtable.Table.from_numpy(values), values


def test_table_round_trip_and_initialisers(rng):
    table, values = table_and_values(rng)
    assert table.shape == (50, 21) and len(table) == 50 and table.dim == 21
    np.testing.assert_array_equal(table.to_numpy(), values)
    np.testing.assert_array_equal(np.asarray(table), values)
    np.testing.assert_array_equal(table.row(7), values[7])
    # float64 input is converted; the table is a copy.
    t64 = embtable.Table.from_numpy(values.astype(np.float64))
    assert t64 == table
    values[0, 0] = 99.0
    assert table.to_numpy()[0, 0] != 99.0

    keras_default = embtable.Table(1000, 8, seed=3).to_numpy()
    assert keras_default.min() >= -0.05 and keras_default.max() < 0.05
    np.testing.assert_array_equal(keras_default, embtable.Table(1000, 8, seed=3).to_numpy())
    assert not np.array_equal(keras_default, embtable.Table(1000, 8, seed=4).to_numpy())
    u = embtable.Table.uniform(500, 4, 1.0, 2.0, seed=1).to_numpy()
    assert u.min() >= 1.0 and u.max() < 2.0
    n = embtable.Table.normal(2000, 16, 3.0, 0.5, seed=1).to_numpy()
    assert abs(n.mean() - 3.0) < 0.01 and abs(n.std() - 0.5) < 0.01
    tn = embtable.Table.truncated_normal(2000, 16, 0.0, 1.0, seed=1).to_numpy()
    assert np.abs(tn).max() <= 2.0
    assert (embtable.Table.zeros(3, 2).to_numpy() == 0).all()
    assert (embtable.Table.full(3, 2, 1.5).to_numpy() == 1.5).all()
    assert pickle.loads(pickle.dumps(table)) == table


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_lookup_is_onehot_times_table_for_every_dtype_and_shape(rng, dtype):
    table, values = table_and_values(rng)
    for shape in [(), (0,), (7,), (3, 5), (2, 3, 4)]:
        ids = rng.integers(0, 50, size=shape).astype(dtype)
        out = table.lookup(ids)
        assert out.shape == shape + (21,) and out.dtype == np.float32
        dense = (onehot(ids, 50) @ values.astype(np.float64)).reshape(shape + (21,))
        np.testing.assert_array_equal(out, dense.astype(np.float32))


def test_lookup_accepts_lists_views_and_out(rng):
    table, values = table_and_values(rng)
    np.testing.assert_array_equal(table.lookup([3, 1, 3]), values[[3, 1, 3]])
    np.testing.assert_array_equal(table.lookup([]), np.zeros((0, 21), np.float32))
    ids = rng.integers(0, 50, size=(6, 8))
    view = ids[::2, 1::3]  # not contiguous
    np.testing.assert_array_equal(table.lookup(view), values[view])
    big_endian = ids.astype(">i8")
    np.testing.assert_array_equal(table.lookup(big_endian), values[ids])
    out = np.empty((6, 8, 21), np.float32)
    assert table.lookup(ids, out=out) is out
    np.testing.assert_array_equal(out, values[ids])


def csr_inputs(rng, n_bags=9, rows=50):
    lengths = rng.integers(0, 6, size=n_bags)
    lengths[2] = 0  # an empty bag
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(0, rows, size=int(offsets[-1]))
    weights = rng.uniform(0.1, 2.0, size=ids.size).astype(np.float32)
    return ids, offsets, weights


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
def test_pooled_lookup_is_bag_matrix_times_onehot_times_table(rng, mode, weighted):
    table, values = table_and_values(rng)
    ids, offsets, weights = csr_inputs(rng)
    w = weights if weighted else None
    dense = bag_matrix(offsets, ids.size, w, mode) @ onehot(ids, 50) @ values.astype(np.float64)
    # PyTorch's offsets: one start per bag ...
    out = table.pooled_lookup(ids, offsets[:-1], mode=mode, per_sample_weights=w)
    np.testing.assert_allclose(out, dense, rtol=2e-6, atol=2e-6)
    # ... or with the total appended.
    out2 = table.pooled_lookup(ids, offsets, mode=mode, per_sample_weights=w,
                               include_last_offset=True)
    np.testing.assert_array_equal(out, out2)
    assert (out[2] == 0).all()


def test_pooled_lookup_fixed_bags_and_max(rng):
    table, values = table_and_values(rng)
    ids = rng.integers(0, 50, size=(7, 4)).astype(np.int32)
    out = table.pooled_lookup(ids, mode="mean")
    np.testing.assert_allclose(out, values[ids].mean(axis=1), rtol=1e-6, atol=1e-6)
    out = table.pooled_lookup(ids, mode="max")
    np.testing.assert_array_equal(out, values[ids].max(axis=1))
    flat = table.pooled_lookup(ids.reshape(-1), np.arange(0, 28, 4), mode="max")
    np.testing.assert_array_equal(out, flat)


def test_lookup_gradient_is_onehot_transpose_times_grad(rng):
    table, _ = table_and_values(rng)
    ids = rng.integers(0, 50, size=(4, 6))
    g = rng.standard_normal((4, 6, 21)).astype(np.float32)
    grad = table.lookup_grad(ids, g)
    dense = onehot(ids, 50).T @ g.reshape(-1, 21).astype(np.float64)
    np.testing.assert_allclose(grad.to_dense(50), dense, rtol=1e-6, atol=1e-6)
    assert len(grad) == len(np.unique(ids))
    first_seen = list(dict.fromkeys(ids.reshape(-1).tolist()))
    assert grad.rows.tolist() == first_seen
    np.testing.assert_allclose(grad.values, dense[first_seen], rtol=1e-6, atol=1e-6)
    # A flat (n, dim) gradient is the same gradient.
    flat = embtable.SparseGrad(21)
    flat.accumulate_lookup(ids.reshape(-1), g.reshape(-1, 21))
    np.testing.assert_array_equal(flat.to_dense(50), grad.to_dense(50))


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn"])
def test_pooled_gradient_is_transpose_of_the_forward(rng, mode):
    table, values = table_and_values(rng)
    ids, offsets, weights = csr_inputs(rng)
    g = rng.standard_normal((len(offsets) - 1, 21)).astype(np.float32)
    grad = table.pooled_lookup_grad(ids, offsets[:-1], grad_out=g, mode=mode,
                                    per_sample_weights=weights)
    b = bag_matrix(offsets, ids.size, weights, mode)
    dense = onehot(ids, 50).T @ b.T @ g.astype(np.float64)
    np.testing.assert_allclose(grad.to_dense(50), dense, rtol=2e-6, atol=2e-6)


def test_max_gradient_goes_to_the_argmax(rng):
    table, values = table_and_values(rng)
    ids = rng.integers(0, 50, size=(5, 3))
    g = rng.standard_normal((5, 21)).astype(np.float32)
    grad = table.pooled_lookup_grad(ids, grad_out=g, mode="max").to_dense(50)
    expected = np.zeros((50, 21))
    for b in range(5):
        winner = values[ids[b]].argmax(axis=0)  # first maximum per lane
        for lane in range(21):
            expected[ids[b, winner[lane]], lane] += g[b, lane]
    np.testing.assert_allclose(grad, expected, rtol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn"])
def test_per_sample_weight_gradient_matches_autograd(rng, mode):
    import torch
    table, values = table_and_values(rng)
    ids, offsets, weights = csr_inputs(rng)
    g = rng.standard_normal((len(offsets) - 1, 21)).astype(np.float32)
    layer = embtable.Embedding(table, embtable.Sgd.torch())
    dw = layer.per_sample_weights_grad(ids, offsets[:-1], grad_out=g, mode=mode,
                                       per_sample_weights=weights)
    w = torch.tensor(weights, dtype=torch.float64, requires_grad=True)
    e = torch.tensor(values, dtype=torch.float64)[torch.tensor(ids)]
    rows = []
    for start, end in zip(offsets[:-1], offsets[1:]):
        wb = w[start:end]
        d = {"sum": torch.tensor(1.0, dtype=torch.float64), "mean": wb.sum(),
             "sqrtn": (wb * wb).sum().sqrt()}[mode]
        pooled = (wb[:, None] * e[start:end]).sum(0)
        rows.append(pooled / d if end > start else pooled)
    (torch.stack(rows) * torch.tensor(g, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(dw, w.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_optimizer_presets_and_overrides():
    a = embtable.Adagrad.torch(lr=0.05)
    assert isinstance(a, embtable.Adagrad) and isinstance(a, embtable.Optimizer)
    assert a.kind == "adagrad"
    assert a.config == {"lr": 0.05, "initial_accumulator_value": 0.0, "epsilon": 1e-10,
                        "eps_placement": "outside_sqrt", "lr_decay": 0.0, "weight_decay": 0.0,
                        "semantics": "dense_exact"}
    assert a.lr == 0.05
    k = embtable.Adagrad.keras()
    assert (k.lr, k.initial_accumulator_value, k.eps_placement) == (
        pytest.approx(1e-3), pytest.approx(0.1), "inside_sqrt")
    assert embtable.Adagrad().config == k.config  # the class alone: Keras' defaults
    s = embtable.Sgd.torch(lr=0.1, momentum=0.9, nesterov=True)
    assert (s.style, s.nesterov, s.momentum) == ("torch", True, pytest.approx(0.9))
    r = embtable.RmsProp.keras(centered=True, semantics="dense_exact")
    assert (r.rho, r.centered, r.semantics) == (pytest.approx(0.9), True, "dense_exact")
    assert embtable.RmsProp.torch().rho == pytest.approx(0.99)
    assert embtable.RowWiseAdagrad.fbgemm().lr == pytest.approx(0.01)
    assert "Adagrad(lr=0.05" in repr(a)
    a.lr = 0.5
    assert a.lr == 0.5
    a.set(epsilon=1e-3)
    assert a.epsilon == pytest.approx(1e-3)
    with pytest.raises(TypeError, match="momentum"):
        embtable.Adagrad.torch(momentum=0.9)
    with pytest.raises(ValueError, match="lr"):
        embtable.Sgd.torch(lr=-1.0)
    with pytest.raises(ValueError, match="rho"):
        embtable.RmsProp.keras(rho=1.5)
    with pytest.raises(ValueError, match="eps_placement"):
        embtable.Adagrad.torch(eps_placement="sideways")
    with pytest.raises(ValueError, match="lr"):
        a.lr = float("nan")
    assert a.lr == 0.5  # unchanged after the error


def test_adam_adamw_ftrl_presets_and_overrides():
    sparse = embtable.Adam.torch_sparse(lr=0.05, beta_1=0.8)
    assert isinstance(sparse, embtable.Adam) and sparse.kind == "adam"
    assert sparse.config == {"lr": 0.05, "beta_1": 0.8, "beta_2": 0.999, "epsilon": 1e-8,
                             "amsgrad": False, "weight_decay": 0.0, "style": "torch_sparse",
                             "semantics": "lazy"}
    assert embtable.Adam().config == embtable.Adam.keras().config
    assert embtable.Adam.keras().epsilon == pytest.approx(1e-7)
    assert (embtable.Adam.torch().style, embtable.Adam.keras_lazy().semantics) == ("torch", "lazy")
    w = embtable.AdamW.torch(amsgrad=True)
    assert (w.kind, w.weight_decay, w.amsgrad) == ("adamw", pytest.approx(0.01), True)
    assert embtable.AdamW.keras().weight_decay == pytest.approx(0.004)
    f = embtable.Ftrl.keras(lr=0.1, l1_regularization_strength=0.01, beta=0.5)
    assert (f.kind, f.learning_rate_power, f.initial_accumulator_value) == (
        "ftrl", -0.5, pytest.approx(0.1))
    assert (f.l1_regularization_strength, f.beta) == (pytest.approx(0.01), 0.5)
    assert embtable.Ftrl.keras_lazy().semantics == "lazy"
    assert "Adam(lr=0.05, beta_1=0.8" in repr(sparse)
    # Presets by name through the base class, and the errors.
    assert embtable.Optimizer("adam", "torch_sparse", {"lr": 0.05, "beta_1": 0.8}).config == \
        sparse.config
    with pytest.raises(ValueError, match="beta_1"):
        embtable.Adam.torch(beta_1=1.0)
    with pytest.raises(ValueError, match="style"):
        embtable.Adam.keras(style="jax")
    with pytest.raises(ValueError, match="learning_rate_power"):
        embtable.Ftrl.keras(learning_rate_power=0.5)
    with pytest.raises(ValueError, match="presets are keras, keras_lazy"):
        embtable.Optimizer("ftrl", "torch")
    with pytest.raises(TypeError, match="momentum"):
        embtable.Adam.keras(momentum=0.9)
    back = pickle.loads(pickle.dumps(sparse))
    assert isinstance(back, embtable.Adam) and back.config == sparse.config


def test_set_lr_and_schedules(rng):
    """A new rate applies from the next step; under dense-exact semantics a
    row that lagged catches up each missed step with that step's rate."""
    values = rng.standard_normal((4, 3)).astype(np.float32)
    table = embtable.Table.from_numpy(values)
    # Keras SGD with decoupled weight decay: every row shrinks by (1 - lr * wd) each step.
    opt = embtable.Sgd.keras(lr=0.1, weight_decay=0.5)
    g = rng.standard_normal((1, 3)).astype(np.float32)
    opt.step_lookup(table, [0], g)
    opt.set_lr(0.4)
    assert (opt.lr, opt.next_lr) == (pytest.approx(0.4), pytest.approx(0.4))
    opt.step_lookup(table, [1], g)
    opt.lr = 0.2  # the same as set_lr
    opt.step_lookup(table, [0], g)
    opt.flush(table)
    expected = values.astype(np.float64)
    for lr, row in ((0.1, 0), (0.4, 1), (0.2, 0)):
        expected *= 1 - lr * 0.5
        expected[row] -= lr * g[0]
    np.testing.assert_allclose(table.to_numpy(), expected, rtol=1e-6)
    assert opt.steps == 3
    with pytest.raises(ValueError, match="weight_decay"):
        opt.set_lr(2.0)  # lr * weight_decay must stay below 1
    assert opt.lr == pytest.approx(0.2)  # unchanged
    # A rate and another option at once; lr alone keeps the state arrays.
    opt.set(lr=0.3, weight_decay=0.1)
    assert (opt.lr, opt.weight_decay) == (pytest.approx(0.3), pytest.approx(0.1))

    decay = embtable.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
    assert decay(3) == pytest.approx(0.1 * 0.5 ** 1.5)
    assert embtable.StepLR(0.1, step_size=2, gamma=0.5)(5) == pytest.approx(0.025)
    adam = embtable.Adam.keras(lr=1.0)
    adam.set_schedule(decay)
    assert adam.next_lr == pytest.approx(0.1)
    t = embtable.Table.from_numpy(values)
    for _ in range(3):
        adam.step_lookup(t, [2], g)
    assert adam.next_lr == pytest.approx(decay(3)) and adam.lr == pytest.approx(decay(2))
    adam.set_schedule(None)
    assert adam.next_lr == adam.lr
    with pytest.raises(TypeError, match="schedule"):
        adam.set_schedule(lambda step: 0.1)
    with pytest.raises(ValueError, match="decay_steps"):
        embtable.ExponentialDecay(0.1, 0, 0.5)


def test_optimizer_steps_are_the_formulas(rng):
    values = rng.standard_normal((20, 5)).astype(np.float32)
    ids = np.array([3, 7, 3, 11])
    g = rng.standard_normal((4, 5)).astype(np.float32)
    summed = np.zeros((20, 5), np.float32)
    np.add.at(summed, ids, g)
    touched = np.unique(ids)

    table = embtable.Table.from_numpy(values)
    opt = embtable.Adagrad.torch(lr=0.1)
    opt.step(table, table.lookup_grad(ids, g))
    acc = summed * summed
    expected = values - 0.1 * summed / (np.sqrt(acc) + 1e-10)
    np.testing.assert_allclose(table.to_numpy(), expected, rtol=1e-6)
    state = opt.state_dict()
    assert state["steps"] == 1 and state["shape"] == (20, 5)
    np.testing.assert_allclose(state["arrays"]["accumulator"][touched], acc[touched], rtol=1e-6)

    # The fused path is bitwise the same as gradient + step.
    t1, t2 = embtable.Table.from_numpy(values), embtable.Table.from_numpy(values)
    o1, o2 = embtable.RmsProp.torch(momentum=0.5), embtable.RmsProp.torch(momentum=0.5)
    for _ in range(3):
        o1.step(t1, t1.lookup_grad(ids, g))
        o2.step_lookup(t2, ids, g)
    assert t1 == t2
    s1, s2 = o1.state_dict(), o2.state_dict()
    for name in s1["arrays"]:
        np.testing.assert_array_equal(s1["arrays"][name], s2["arrays"][name])

    # A copy has its own state; pickling keeps everything.
    c = o1.copy()
    c.step_lookup(t1.copy(), ids, g)
    assert c.state_dict()["steps"] == 4 and o1.state_dict()["steps"] == 3
    back = pickle.loads(pickle.dumps(o1))
    assert isinstance(back, embtable.RmsProp) and back.config == o1.config
    np.testing.assert_array_equal(back.state_dict()["arrays"]["square_avg"],
                                  s1["arrays"]["square_avg"])


def test_dense_exact_rows_catch_up_on_flush(rng):
    values = rng.standard_normal((6, 3)).astype(np.float32)
    lazy, dense = embtable.Table.from_numpy(values), embtable.Table.from_numpy(values)
    o_lazy = embtable.Sgd.keras_lazy(lr=0.1, momentum=0.9)
    o_dense = embtable.Sgd.keras(lr=0.1, momentum=0.9)
    assert (o_lazy.semantics, o_dense.semantics) == ("lazy", "dense_exact")
    g = np.ones((1, 3), np.float32)
    for opt, table in ((o_lazy, lazy), (o_dense, dense)):
        opt.step_lookup(table, [2], g)
        opt.step_lookup(table, [4], g)
        opt.flush(table)
    # Row 2 keeps moving with its momentum under dense-exact semantics.
    v = -0.1 * g[0]
    np.testing.assert_allclose(dense.row(2), values[2] + v + 0.9 * v, rtol=1e-6)
    np.testing.assert_allclose(lazy.row(2), values[2] + v, rtol=1e-6)


def test_embedding_layer(rng):
    values = rng.standard_normal((30, 4)).astype(np.float32)
    layer = embtable.Embedding(values, embtable.Sgd.torch(lr=0.5), padding_idx=0)
    assert layer.padding_idx == 0 and (layer.weight[0] == 0).all()
    ids = np.array([[0, 5, 5], [7, 0, 1]])
    out = layer.forward(ids)
    assert out.shape == (2, 3, 4)
    assert (out[0, 0] == 0).all()
    np.testing.assert_array_equal(out[0, 1], values[5])
    np.testing.assert_array_equal(layer.mask(ids), ids != 0)
    g = np.ones((2, 3, 4), np.float32)
    layer.backward(ids, g)
    assert sorted(layer.grad.rows.tolist()) == [1, 5, 7]
    layer.step()
    np.testing.assert_allclose(layer.weight[5], values[5] - 0.5 * 2, rtol=1e-6)
    assert (layer.weight[0] == 0).all() and len(layer.grad) == 0
    # `weight` is a view: writes reach the table.
    w = layer.weight
    w[9] = 3.0
    np.testing.assert_array_equal(layer.forward([9]), np.full((1, 4), 3.0, np.float32))
    assert isinstance(layer.optimizer, embtable.Sgd)
    layer.optimizer.lr = 1.0  # the layer's own optimizer, live
    assert layer.optimizer.lr == 1.0
    # Pooled, and the fused backward_step.
    bags = layer.forward_pooled(np.array([5, 0, 7]), np.array([0, 2]), mode="mean")
    np.testing.assert_allclose(bags[0], layer.weight[5], rtol=1e-6)  # padding left out
    before = layer.weight.copy()
    layer.backward_pooled(np.array([5, 0, 7]), np.array([0, 2]), grad_out=np.ones((2, 4)),
                          mode="mean", step=True)
    np.testing.assert_allclose(layer.weight[5], before[5] - 1.0, rtol=1e-6)
    np.testing.assert_allclose(layer.weight[7], before[7] - 1.0, rtol=1e-6)
    with pytest.raises(TypeError, match="optimizer"):
        embtable.Embedding(values)
    frozen = embtable.Embedding(values, trainable=False)
    frozen.backward([1], np.ones((1, 4)))
    frozen.step()
    np.testing.assert_array_equal(frozen.weight, values)


def test_layer_state_dict_round_trip(rng):
    values = rng.standard_normal((10, 3)).astype(np.float32)
    layer = embtable.Embedding(values, embtable.Adagrad.torch(lr=0.1))
    layer.backward_step([1, 2, 1], rng.standard_normal((3, 3)).astype(np.float32))
    state = layer.state_dict()
    other = embtable.Embedding(np.zeros((10, 3)), embtable.Sgd.keras())
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.weight, layer.weight)
    assert isinstance(other.optimizer, embtable.Adagrad)
    g = rng.standard_normal((2, 3)).astype(np.float32)
    layer.backward_step([2, 5], g)
    other.backward_step([2, 5], g)
    np.testing.assert_array_equal(other.weight, layer.weight)


def test_threads_do_not_change_results(rng):
    rows, dim = 5000, 40
    values = rng.standard_normal((rows, dim)).astype(np.float32)
    ids = rng.integers(0, rows, size=(4096, 8))
    g_bag = rng.standard_normal((4096, dim)).astype(np.float32)
    results = []
    before = embtable.get_num_threads()
    try:
        for n in (1, 2, 3):
            embtable.set_num_threads(n)
            assert embtable.get_num_threads() == n
            table = embtable.Table.from_numpy(values)
            pooled = table.pooled_lookup(ids, mode="sqrtn")
            looked = table.lookup(ids)
            opt = embtable.Adagrad.torch(lr=0.1)
            opt.step(table, table.pooled_lookup_grad(ids, grad_out=g_bag, mode="mean"))
            results.append((pooled, looked, table.to_numpy()))
    finally:
        embtable.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        embtable.set_num_threads(0)


def test_long_calls_release_the_gil():
    import threading

    table = embtable.Table(200_000, 64, seed=1)
    ids = np.random.default_rng(0).integers(0, 200_000, size=2_000_000)
    state = {"started": False, "done": False}

    def work():
        state["started"] = True
        for _ in range(3):
            table.lookup(ids)
        state["done"] = True

    thread = threading.Thread(target=work)
    thread.start()
    while not state["started"]:
        pass
    ran_meanwhile = 0
    while not state["done"]:
        ran_meanwhile += 1  # Python runs here only while the lookups hold no GIL
    thread.join()
    assert ran_meanwhile > 0
