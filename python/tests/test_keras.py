"""embtable.keras.Embedding against keras.layers.Embedding with the same Keras
optimizer, on Keras' torch backend."""

import keras
import numpy as np
import pytest

import embtable
import embtable.keras as ek

V, D, L = 60, 8, 6

assert keras.backend.backend() == "torch"


def model(embedding):
    return keras.Sequential([
        keras.Input(shape=(L,), dtype="int32"),
        embedding,
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(1),
    ])


def data(seed, n=32):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, size=(n, L)).astype(np.int32)
    y = rng.standard_normal((n, 1)).astype(np.float32)
    return x, y


def train_both(make_keras_optimizer, ours_optimizer, steps=20):
    keras.utils.set_random_seed(0)
    matrix = np.random.default_rng(1).uniform(-0.05, 0.05, (V, D)).astype(np.float32)
    ref = model(keras.layers.Embedding(V, D, weights=[matrix]))
    ours = model(ek.Embedding(V, D, embeddings_initializer=matrix, optimizer=ours_optimizer))
    ours.layers[-1].set_weights(ref.layers[-1].get_weights())
    ref.compile(optimizer=make_keras_optimizer(), loss="mse")
    ours.compile(optimizer=make_keras_optimizer(), loss="mse")
    for step in range(steps):
        x, y = data(step)
        ref.train_on_batch(x, y)
        ours.train_on_batch(x, y)
    return ref, ours


def assert_trained_alike(ref, ours, rtol=1e-5):
    ref_table = keras.ops.convert_to_numpy(ref.layers[0].embeddings)
    ours_table = ours.layers[0].embeddings
    assert not np.allclose(ref_table, np.random.default_rng(1).uniform(-0.05, 0.05, (V, D)))
    np.testing.assert_allclose(ours_table, ref_table, rtol=rtol, atol=rtol * np.abs(ref_table).max())
    # The head's bias is one value near zero: tolerances on the layer's scale.
    head = ref.layers[-1].get_weights()
    scale = max(np.abs(a).max() for a in head)
    for a, b in zip(head, ours.layers[-1].get_weights()):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize(
    "make_optimizer, ours",
    [
        (lambda: keras.optimizers.SGD(learning_rate=0.5), embtable.Sgd.keras(lr=0.5)),
        (lambda: keras.optimizers.Adagrad(learning_rate=0.5), embtable.Adagrad.keras(lr=0.5)),
        (lambda: keras.optimizers.Adam(learning_rate=0.01), embtable.Adam.keras(lr=0.01)),
        (lambda: keras.optimizers.Ftrl(learning_rate=0.5), embtable.Ftrl.keras(lr=0.5)),
    ],
    ids=["sgd", "adagrad", "adam", "ftrl"],
)
def test_trains_like_keras_embedding(make_optimizer, ours):
    assert_trained_alike(*train_both(make_optimizer, ours))


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: keras.optimizers.SGD(learning_rate=0.3, momentum=0.9),
        lambda: keras.optimizers.RMSprop(learning_rate=0.01, momentum=0.5),
        lambda: keras.optimizers.RMSprop(learning_rate=0.01, centered=True),
        lambda: keras.optimizers.Adagrad(learning_rate=0.5, epsilon=1e-4),
        lambda: keras.optimizers.SGD(learning_rate=0.3, momentum=0.8, nesterov=True,
                                     weight_decay=0.01),
        lambda: keras.optimizers.Adam(learning_rate=0.01, beta_1=0.8, amsgrad=True,
                                      weight_decay=0.05),
        lambda: keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(0.02, 5, 0.5)),
        lambda: keras.optimizers.AdamW(learning_rate=0.01),
        lambda: keras.optimizers.Ftrl(learning_rate=0.3, l1_regularization_strength=0.001,
                                      l2_regularization_strength=0.01,
                                      l2_shrinkage_regularization_strength=0.01, beta=0.5),
        lambda: keras.optimizers.Ftrl(learning_rate=0.3, learning_rate_power=-0.3),
    ],
    ids=["sgd-momentum", "rmsprop-momentum", "rmsprop-centered", "adagrad", "sgd-nesterov-decay",
         "adam-amsgrad-decay", "adam-schedule", "adamw", "ftrl-regularized", "ftrl-power"],
)
def test_a_keras_optimizer_gives_keras_numbers(make_optimizer):
    """optimizer=<Keras optimizer>: translated to embtable, dense-exact
    where Keras' dense updates differ from lazy ones."""
    ref, ours = train_both(make_optimizer, make_optimizer())
    assert isinstance(ours.layers[0].optimizer, embtable.Optimizer)  # translated
    assert_trained_alike(ref, ours)


def test_unsupported_keras_options_are_refused():
    with pytest.raises(ValueError, match="clipnorm"):
        ek.Embedding(V, D, optimizer=keras.optimizers.SGD(clipnorm=1.0))
    with pytest.raises(ValueError, match="weight_decay"):
        ek.Embedding(V, D, optimizer=keras.optimizers.Adagrad(weight_decay=0.01))
    with pytest.raises(ValueError, match="learning_rate"):
        ek.Embedding(V, D, optimizer=keras.optimizers.SGD(
            keras.optimizers.schedules.CosineDecay(0.1, 100)))
    with pytest.raises(ValueError, match="no embtable counterpart"):
        ek.Embedding(V, D, optimizer=keras.optimizers.Lion())
    with pytest.raises(ValueError, match="regularizer"):
        ek.Embedding(V, D, embeddings_regularizer="l2", optimizer=embtable.Sgd.keras())
    with pytest.raises(TypeError, match="optimizer"):
        ek.Embedding(V, D)


def test_mask_zero_and_shapes_like_keras():
    keras.utils.set_random_seed(0)
    matrix = np.random.default_rng(2).standard_normal((V, D)).astype(np.float32)
    ref = model(keras.layers.Embedding(V, D, weights=[matrix], mask_zero=True))
    ours = model(ek.Embedding(V, D, embeddings_initializer=keras.initializers.Constant(matrix),
                              mask_zero=True, trainable=False))
    ours.layers[-1].set_weights(ref.layers[-1].get_weights())
    x, _ = data(3)
    x[:, -2:] = 0  # padding, masked out of the average
    np.testing.assert_allclose(ours.predict(x, verbose=0), ref.predict(x, verbose=0), rtol=1e-6)
    layer = ours.layers[0]
    mask = keras.ops.convert_to_numpy(layer.compute_mask(keras.ops.convert_to_tensor(x)))
    np.testing.assert_array_equal(mask, x != 0)
    assert layer.compute_output_shape((None, L)) == (None, L, D)
    out = keras.ops.convert_to_numpy(layer(np.array([[[1, 2]]])))
    assert out.shape == (1, 1, 2, D)


def test_frozen_layer_keeps_its_table_and_the_rest_trains():
    matrix = np.random.default_rng(4).standard_normal((V, D)).astype(np.float32)
    ours = model(ek.Embedding(V, D, embeddings_initializer=matrix, trainable=False))
    dense_before = ours.layers[-1].get_weights()[0].copy()
    ours.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    ours.train_on_batch(*data(0))
    np.testing.assert_array_equal(ours.layers[0].embeddings, matrix)
    assert not np.array_equal(ours.layers[-1].get_weights()[0], dense_before)


def test_initializers():
    layer = ek.Embedding(1000, 4, embeddings_initializer="uniform", optimizer=embtable.Sgd.keras())
    w = layer.embeddings
    assert w.min() >= -0.05 and w.max() < 0.05
    layer = ek.Embedding(3000, 4, keras.initializers.RandomNormal(stddev=2.0, seed=1),
                         optimizer=embtable.Sgd.keras())
    assert abs(float(layer.embeddings.std()) - 2.0) < 0.1
    layer = ek.Embedding(10, 4, "ones", optimizer=embtable.Sgd.keras())
    assert (layer.embeddings == 1).all()
    layer = ek.Embedding(50, 4, "glorot_uniform", optimizer=embtable.Sgd.keras())
    limit = np.sqrt(6 / 54)
    assert np.abs(layer.embeddings).max() <= limit and layer.embeddings.std() > 0
    with pytest.raises(ValueError, match="shape"):
        ek.Embedding(10, 4, np.zeros((10, 5)), optimizer=embtable.Sgd.keras())


def test_model_save_and_load(tmp_path):
    ref, ours = train_both(lambda: keras.optimizers.Adagrad(0.5), embtable.Adagrad.keras(lr=0.5), 3)
    path = tmp_path / "model.keras"
    ours.save(path)
    back = keras.models.load_model(path)
    np.testing.assert_array_equal(back.layers[0].embeddings, ours.layers[0].embeddings)
    saved = ours.layers[0].optimizer.state_dict()
    loaded = back.layers[0].optimizer.state_dict()
    assert loaded["config"] == saved["config"] and loaded["steps"] == saved["steps"]
    np.testing.assert_array_equal(loaded["arrays"]["accumulator"], saved["arrays"]["accumulator"])


def test_other_backends_get_a_clear_error(monkeypatch):
    # Only torch's backend is installed here; the check reads the backend name.
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match=r"torch backend.*'jax'"):
        ek.Embedding(3, 2, trainable=False)
