"""Bad input raises the fitting exception, naming the position and the
value, and changes nothing: tables, optimizer state, pending gradients and
output buffers are as they were."""

import numpy as np
import pytest

import embtable


@pytest.fixture
def trained(rng):
    """A layer and a table with optimizer state, after a few steps."""
    values = rng.standard_normal((40, 6)).astype(np.float32)
    layer = embtable.Embedding(values, embtable.RmsProp.torch(lr=0.01, momentum=0.5))
    for _ in range(3):
        ids = rng.integers(0, 40, size=10)
        layer.backward_step(ids, rng.standard_normal((10, 6)).astype(np.float32))
    return layer


def snapshot(layer):
    state = layer.state_dict()
    opt = state["optimizer"]
    return (state["weight"].copy(), {k: v.copy() for k, v in opt["arrays"].items()},
            opt["steps"], layer.grad.to_dense(layer.num_rows))


def assert_unchanged(layer, before):
    after = snapshot(layer)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[1].keys() == before[1].keys()
    for k in after[1]:
        np.testing.assert_array_equal(after[1][k], before[1][k])
    assert after[2] == before[2]
    np.testing.assert_array_equal(after[3], before[3])


def test_ids_out_of_range_are_index_errors_with_position_and_value(trained):
    layer = trained
    layer.backward([1, 2], np.ones((2, 6), np.float32))  # a pending gradient
    before = snapshot(layer)
    out = np.full((2, 3, 6), 7.0, np.float32)
    with pytest.raises(IndexError, match=r"id 40 at position 4 .*40 rows"):
        layer.forward(np.array([[1, 2, 3], [4, 40, 5]]), out=out)
    assert (out == 7.0).all()  # the output buffer is untouched too
    with pytest.raises(IndexError, match=r"id -3 at position 1"):
        layer.backward(np.array([0, -3]), np.ones((2, 6), np.float32))
    with pytest.raises(IndexError, match=r"id 99 at position 2"):
        layer.forward_pooled(np.array([1, 2, 99]), np.array([0, 2]), mode="sum")
    with pytest.raises(IndexError, match="position 0"):
        layer.forward(np.array([2**64 - 1], dtype=np.uint64))
    assert_unchanged(layer, before)
    table = embtable.Table.zeros(5, 2)
    with pytest.raises(IndexError, match=r"id 5 at position 0"):
        table.lookup([5])


def test_shapes_dtypes_and_values_are_value_errors(trained):
    layer = trained
    before = snapshot(layer)
    ids = np.array([1, 2, 3])
    with pytest.raises(ValueError, match=r"grad_out has shape \(3, 5\)"):
        layer.backward(ids, np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"grad_out has shape \(6, 3\)"):
        layer.backward(ids, np.ones((6, 3), np.float32))  # the same count, laid out otherwise
    with pytest.raises(ValueError, match="integers.*float64"):
        layer.forward(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="integers.*bool"):
        layer.forward(np.array([True]))
    with pytest.raises(ValueError, match="floating point.*int64"):
        layer.backward(ids, np.ones((3, 6), np.int64))
    grad = np.ones((3, 6), np.float32)
    grad[1, 4] = np.nan
    with pytest.raises(ValueError, match=r"gradient at position 10 is not finite \(NaN\)"):
        layer.backward_step(ids, grad)
    with pytest.raises(ValueError, match=r"offset 1 at position 2"):
        layer.forward_pooled(ids, np.array([0, 2, 1]), mode="sum")
    with pytest.raises(ValueError, match=r"offset -1 at position 1"):
        layer.forward_pooled(ids, np.array([0, -1]), mode="sum")
    with pytest.raises(ValueError, match="mode"):
        layer.forward_pooled(ids, np.array([0]), mode="median")
    with pytest.raises(ValueError, match="per_sample_weights has shape"):
        layer.forward_pooled(ids, np.array([0]), mode="sum", per_sample_weights=np.ones(2))
    weights = np.array([1.0, np.inf, 1.0], np.float32)
    with pytest.raises(ValueError, match=r"position 1 is not finite"):
        layer.forward_pooled(ids, np.array([0]), mode="sum", per_sample_weights=weights)
    with pytest.raises(ValueError, match="max"):
        layer.forward_pooled(ids, np.array([0]), mode="max", per_sample_weights=np.ones(3))
    with pytest.raises(ValueError, match="out must be"):
        layer.forward(ids, out=np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="weight has shape"):
        layer.load_state_dict({"weight": np.zeros((40, 5)), "optimizer": None})
    bad_state = layer.optimizer.state_dict()
    bad_state["arrays"]["square_avg"] = bad_state["arrays"]["square_avg"][:-1]
    with pytest.raises(ValueError):
        layer.load_state_dict({"weight": np.zeros((40, 6)), "optimizer": bad_state})
    with pytest.raises(ValueError, match="pending"):
        layer.backward(ids, np.ones((3, 6), np.float32))
        layer.backward_step(ids, np.ones((3, 6), np.float32))
    layer.clear_grad()
    assert_unchanged(layer, before)


def test_a_failed_step_changes_nothing(rng):
    """A step whose summed gradient overflows is refused as a whole."""
    table = embtable.Table.from_numpy(rng.standard_normal((4, 2)).astype(np.float32))
    opt = embtable.Adagrad.torch()
    opt.step_lookup(table, [0], np.ones((1, 2), np.float32))
    values, state = table.to_numpy(), opt.state_dict()
    huge = np.full((2, 2), 3e38, np.float32)
    with pytest.raises(ValueError, match="not finite"):
        opt.step_lookup(table, [1, 1], huge)
    np.testing.assert_array_equal(table.to_numpy(), values)
    np.testing.assert_array_equal(opt.state_dict()["arrays"]["accumulator"],
                                  state["arrays"]["accumulator"])
    assert opt.state_dict()["steps"] == state["steps"]
    wrong = embtable.Table.zeros(5, 2)
    with pytest.raises(ValueError, match="shape|rows"):
        opt.step_lookup(wrong, [0], np.ones((1, 2), np.float32))


def test_bad_configs_are_value_errors():
    for make, field in [
        (lambda: embtable.Sgd.keras(momentum=1.0), "momentum"),
        (lambda: embtable.Sgd.torch(lr=0.0), "lr"),
        (lambda: embtable.Adagrad.keras(epsilon=0.0), "epsilon"),
        (lambda: embtable.RmsProp.keras(lr=float("inf")), "lr"),
        (lambda: embtable.RowWiseAdagrad.fbgemm(initial_accumulator_value=-1.0), "initial_accumulator_value"),
        (lambda: embtable.Sgd.keras(nesterov=1), "nesterov"),
        (lambda: embtable.Sgd.keras(lr="fast"), "lr"),
        (lambda: embtable.Optimizer("lamb", "keras"), "lamb"),
        (lambda: embtable.Optimizer("sgd", "jax"), "presets"),
        (lambda: embtable.Table(0, 4), "rows"),
        (lambda: embtable.Table.uniform(2, 2, 1.0, 0.0), "low|high"),
        (lambda: embtable.Embedding((4, 2), embtable.Sgd.keras(), padding_idx=4), "padding_idx"),
    ]:
        with pytest.raises(ValueError, match=field):
            make()
    opt = embtable.RmsProp.torch()
    opt.step_lookup(embtable.Table.zeros(3, 2), [1], np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="arrays"):
        opt.set(centered=True)  # would need a state array the optimizer does not keep
    assert opt.centered is False


def test_what_is_not_numbers_is_a_type_error(trained):
    layer = trained
    before = snapshot(layer)
    for bad in (None, "abc", ["a", "b"], np.array([1, None], dtype=object)):
        with pytest.raises(TypeError, match=r"ids must be integers, got an array of"):
            layer.forward(bad)
    with pytest.raises(TypeError, match="grad_out must be floating point"):
        layer.backward_step([1], "x")
    with pytest.raises(TypeError, match="array must be floating point"):
        embtable.Table.from_numpy([["a"]])
    with pytest.raises(TypeError, match="Optimizer|optimizer"):
        embtable.Embedding((3, 2), "adam")
    assert_unchanged(layer, before)


def test_offsets_name_the_offset_and_its_position(trained):
    layer = trained
    before = snapshot(layer)
    ids = np.array([1, 2, 3])
    with pytest.raises(ValueError, match=r"offset 2 at position 1 \(the last\) must equal the "
                                         r"number of ids, 3, with include_last_offset=True"):
        layer.forward_pooled(ids, np.array([0, 2]), mode="sum", include_last_offset=True)
    with pytest.raises(ValueError, match=r"offset 1 at position 0"):
        layer.forward_pooled(ids, np.array([1]), mode="sum")
    with pytest.raises(ValueError, match=r"grad_out has shape \(2, 6\); expected \(1, 6\) \(bags, dim\)"):
        layer.backward_pooled(ids, np.array([0]), grad_out=np.ones((2, 6), np.float32),
                              mode="sum")
    assert_unchanged(layer, before)


def test_torch_and_keras_modules_refuse_bad_ids_and_change_nothing():
    import keras
    import torch

    import embtable.keras as ek
    import embtable.torch as et

    torch.manual_seed(0)
    m = et.Embedding(10, 3, optimizer=embtable.Adam.torch_sparse(lr=0.1), fused=False)
    m(torch.tensor([1, 2])).sum().backward()  # pending, applied by step()
    weight, state = m.weight.detach().clone(), m._layer.optimizer.state_dict()
    pending = m._layer.grad.to_dense(10)
    with pytest.raises(IndexError, match=r"id 10 at position 3"):
        m(torch.tensor([[0, 1], [2, 10]]))
    with pytest.raises(ValueError, match=r"on meta"):
        m(torch.tensor([1]).to("meta"))
    out = m(torch.tensor([3]))
    with pytest.raises(ValueError, match=r"position 2 is not finite \(NaN\)"):
        (out * torch.tensor([1.0, 1.0, float("nan")])).sum().backward()
    assert torch.equal(m.weight, weight)
    np.testing.assert_array_equal(m._layer.grad.to_dense(10), pending)
    assert m._layer.optimizer.state_dict()["steps"] == state["steps"]

    layer = ek.Embedding(10, 3, optimizer=keras.optimizers.Adam(0.1))
    model = keras.Sequential([keras.Input((2,), dtype="int32"), layer,
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    table = layer.embeddings.copy()
    with pytest.raises(IndexError, match=r"id 12 at position 1"):
        model.train_on_batch(np.array([[1, 12]]), np.zeros((1, 1)))
    np.testing.assert_array_equal(layer.embeddings, table)
    assert layer.optimizer.steps == 0
