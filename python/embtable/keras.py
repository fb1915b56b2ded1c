"""A Keras 3 ``Embedding`` layer backed by embtable, trained by a sparse
embtable optimizer inside the backward pass.

:class:`Embedding` takes ``keras.layers.Embedding``'s arguments
(``input_dim``, ``output_dim``, ``embeddings_initializer`` including a
pretrained matrix, ``mask_zero``, ``weights``, ``trainable``, ``name``, ...)
plus ``optimizer=``: an embtable optimizer (``embtable.Adagrad.keras(...)``)
or a Keras optimizer (``keras.optimizers.Adagrad(learning_rate=0.05)``),
translated to the embtable optimizer that gives Keras' numbers. The rest of
the model is trained by the optimizer given to ``model.compile``; the table
is updated when ``loss.backward()`` reaches the layer, rows of the batch
only.

It runs on Keras' torch backend (``KERAS_BACKEND=torch``); building it on
another backend raises an error saying so.
"""

from __future__ import annotations

import json
import random
from typing import Any, Optional

import keras
import numpy as np

from . import _embtable
from ._embtable import Optimizer

__all__ = ["Embedding", "optimizer_from_keras"]

_BACKENDS = ("torch",)


def _check_backend() -> None:
    backend = keras.backend.backend()
    if backend not in _BACKENDS:
        raise RuntimeError(
            f"embtable.keras.Embedding runs on Keras' torch backend (set KERAS_BACKEND=torch "
            f"before importing keras); the current backend is {backend!r}"
        )


def optimizer_from_keras(optimizer: Any) -> Optimizer:
    """The embtable optimizer that gives what ``optimizer`` (a Keras
    ``SGD``, ``Adagrad``, ``RMSprop``, ``Adam``, ``AdamW`` or ``Ftrl``)
    computes on a dense gradient: Keras' formulas and options, dense-exact
    semantics where they differ from lazy ones. A learning rate given as
    ``keras.optimizers.schedules.ExponentialDecay`` becomes the same
    schedule. Options embtable cannot honour for a sparse table (gradient
    clipping, EMA, loss scaling, gradient accumulation, other schedules,
    Keras' decoupled ``weight_decay`` on Adagrad, RMSprop and Ftrl) raise
    ``ValueError``."""
    config = optimizer.get_config()
    name = type(optimizer).__name__
    lr = config.get("learning_rate")
    schedule = None
    if isinstance(lr, dict) and lr.get("class_name") == "ExponentialDecay":
        c = lr["config"]
        schedule = _embtable.ExponentialDecay(
            c["initial_learning_rate"], c["decay_steps"], c["decay_rate"], c["staircase"]
        )
        lr = c["initial_learning_rate"]
    elif not isinstance(lr, (int, float)):
        raise ValueError(
            f"{name}: only a number or keras.optimizers.schedules.ExponentialDecay is supported "
            f"as learning_rate, got {lr!r}"
        )
    for option in ("clipnorm", "clipvalue", "global_clipnorm", "loss_scale_factor",
                   "gradient_accumulation_steps"):
        if config.get(option) not in (None, 0, 0.0):
            raise ValueError(f"{name}: {option}={config[option]!r} is not supported")
    if config.get("use_ema"):
        raise ValueError(f"{name}: use_ema=True is not supported")
    decay = config.get("weight_decay") or 0.0
    if decay and name in ("Adagrad", "RMSprop", "Ftrl"):
        raise ValueError(
            f"{name}: weight_decay={decay!r} is not supported (Keras decouples it; embtable's "
            f"{name} has PyTorch's coupled form only); use AdamW or SGD"
        )
    options: dict[str, Any] = {"lr": lr}
    if name == "SGD":
        made = _embtable.Sgd.keras(**options, momentum=config["momentum"],
                                   nesterov=config["nesterov"], weight_decay=decay)
    elif name == "Adagrad":
        made = _embtable.Adagrad.keras(
            **options, initial_accumulator_value=config["initial_accumulator_value"],
            epsilon=config["epsilon"],
        )
    elif name == "RMSprop":
        made = _embtable.RmsProp.keras(
            **options, rho=config["rho"], momentum=config["momentum"], epsilon=config["epsilon"],
            centered=config["centered"],
        )
    elif name in ("Adam", "AdamW"):
        cls = _embtable.Adam if name == "Adam" else _embtable.AdamW
        made = cls.keras(**options, beta_1=config["beta_1"], beta_2=config["beta_2"],
                         epsilon=config["epsilon"], amsgrad=config["amsgrad"],
                         weight_decay=decay)
    elif name == "Ftrl":
        made = _embtable.Ftrl.keras(**options, **{k: config[k] for k in (
            "learning_rate_power", "initial_accumulator_value", "l1_regularization_strength",
            "l2_regularization_strength", "l2_shrinkage_regularization_strength", "beta")})
    else:
        raise ValueError(
            f"Keras' {name} has no embtable counterpart yet; use SGD, Adagrad, RMSprop, Adam, "
            "AdamW or Ftrl, or an embtable optimizer"
        )
    if schedule is not None:
        made.set_schedule(schedule)
    return made


def _initial_table(initializer: Any, input_dim: int, output_dim: int) -> Any:
    """What ``embtable.Embedding`` takes for ``embeddings_initializer``: a
    Table drawn natively for Keras' usual initializers, else the matrix."""
    if isinstance(initializer, _embtable.Table):
        return initializer
    if isinstance(initializer, str):
        initializer = keras.initializers.get(initializer)
    if not callable(initializer):
        return _matrix(initializer, input_dim, output_dim)
    config = initializer.get_config() if hasattr(initializer, "get_config") else {}
    seed = config.get("seed")
    seed = seed if isinstance(seed, int) else random.getrandbits(63)
    kind = type(initializer).__name__
    n, d = input_dim, output_dim
    if kind == "RandomUniform":
        return _embtable.Table.uniform(n, d, config["minval"], config["maxval"], seed=seed)
    if kind == "RandomNormal":
        return _embtable.Table.normal(n, d, config["mean"], config["stddev"], seed=seed)
    if kind == "TruncatedNormal":
        return _embtable.Table.truncated_normal(n, d, config["mean"], config["stddev"], seed=seed)
    if kind == "Zeros":
        return _embtable.Table.zeros(n, d)
    if kind == "Ones":
        return _embtable.Table.full(n, d, 1.0)
    if kind == "Constant":
        value = np.asarray(keras.ops.convert_to_numpy(initializer.value), dtype=np.float32)
        if value.ndim == 0:
            return _embtable.Table.full(n, d, float(value))
        return _matrix(value, n, d)
    # Any other initializer: let Keras draw the matrix.
    return _matrix(keras.ops.convert_to_numpy(initializer((n, d), dtype="float32")), n, d)


def _serializable(initializer: Any) -> Any:
    """The initializer as ``get_config`` saves it, or ``None`` for a
    pretrained matrix (saved with the weights instead, as Keras does)."""
    if isinstance(initializer, str):
        initializer = keras.initializers.get(initializer)
    if not isinstance(initializer, keras.initializers.Initializer):
        return None
    if type(initializer).__name__ == "Constant" and np.ndim(initializer.value) > 0:
        return None
    return keras.initializers.serialize(initializer)


def _matrix(value: Any, input_dim: int, output_dim: int) -> np.ndarray:
    matrix = np.asarray(keras.ops.convert_to_numpy(value) if not isinstance(value, np.ndarray)
                        else value)
    if matrix.shape != (input_dim, output_dim):
        raise ValueError(
            f"the embeddings matrix has shape {matrix.shape}, expected ({input_dim}, {output_dim})"
        )
    return matrix


@keras.saving.register_keras_serializable(package="embtable")
class Embedding(keras.layers.Layer):
    """``keras.layers.Embedding`` with its table in embtable.

    Args:
        input_dim: Number of rows (vocabulary size).
        output_dim: Floats per row.
        embeddings_initializer: A Keras initializer (name or object), a
            ``(input_dim, output_dim)`` matrix of pretrained vectors (array
            or tensor, or ``keras.initializers.Constant(matrix)``), or an
            ``embtable.Table``. Default ``"uniform"``: U(-0.05, 0.05), drawn
            by embtable from the initializer's seed (values differ from
            Keras' own stream; the distribution is the same).
        mask_zero: Whether id 0 is padding: ``compute_mask`` gives
            ``ids != 0`` for the layers downstream (the lookup itself is
            unchanged, as in Keras).
        weights: Pretrained vectors, as Keras' ``weights`` argument.
        optimizer: An embtable optimizer, or a Keras ``SGD``, ``Adagrad``,
            ``RMSprop``, ``Adam``, ``AdamW`` or ``Ftrl`` (see
            :func:`optimizer_from_keras`). Required unless ``trainable=False``.
        **kwargs: ``trainable``, ``name``, ``dtype``, ... as any Keras layer.

    Regularizers, constraints and LoRA need the dense table at every step
    and are refused.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        embeddings_initializer: Any = "uniform",
        embeddings_regularizer: Any = None,
        embeddings_constraint: Any = None,
        mask_zero: bool = False,
        weights: Any = None,
        lora_rank: Optional[int] = None,
        *,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        _check_backend()
        for name, value in (("embeddings_regularizer", embeddings_regularizer),
                            ("embeddings_constraint", embeddings_constraint),
                            ("lora_rank", lora_rank)):
            if value is not None:
                raise ValueError(f"embtable.keras.Embedding does not support {name}")
        super().__init__(**kwargs)
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.mask_zero = mask_zero
        self.supports_masking = mask_zero
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            optimizer = optimizer_from_keras(optimizer)
        if optimizer is None and self.trainable:
            raise TypeError(
                "a trainable embtable.keras.Embedding needs optimizer=, e.g. "
                "keras.optimizers.Adagrad(learning_rate=0.05) or embtable.Adagrad.keras(lr=0.05)"
            )
        if weights is not None:
            if isinstance(weights, (list, tuple)) and len(weights) == 1:
                weights = weights[0]
            embeddings_initializer = weights
        self._initializer_config = _serializable(embeddings_initializer)
        table = _initial_table(embeddings_initializer, self.input_dim, self.output_dim)
        self._layer = _embtable.Embedding(table, optimizer, trainable=optimizer is not None)
        # A zero-size trainable weight: the input through which autograd
        # reaches this layer, and what makes Keras call `loss.backward()`
        # for a model whose only trainable part is this table.
        self._anchor = self.add_weight(
            shape=(0,), initializer="zeros", trainable=True, name="sparse_update"
        )
        self.built = True

    def build(self, input_shape: Any = None) -> None:
        self.built = True

    @property
    def embeddings(self) -> np.ndarray:
        """The table as a writable ``(input_dim, output_dim)`` NumPy view,
        current: rows a dense-exact optimizer has not updated lately (Keras
        moves every row each step) are brought up to date first."""
        self._layer.flush()
        return self._layer.weight

    @property
    def optimizer(self) -> Optional[Optimizer]:
        """The embtable optimizer the table trains with, or ``None``."""
        return self._layer.optimizer

    def call(self, inputs: Any) -> Any:
        import torch

        from .torch import _ids

        if isinstance(inputs, torch.Tensor) and (inputs.is_floating_point() or inputs.dtype == torch.bool):
            inputs = inputs.to(torch.int64)  # as Keras' Embedding casts ids
        ids = _ids(inputs, "inputs")
        anchor = self._anchor.value
        return _KerasLookup.apply(self, ids, anchor)

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        if not self.mask_zero:
            return None
        return keras.ops.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (*input_shape, self.output_dim)

    def get_config(self) -> dict:
        config = super().get_config()
        optimizer = None
        opt = self._layer.optimizer
        if opt is not None:
            optimizer = {"kind": opt.kind, "config": opt.config}
        config.update(
            input_dim=self.input_dim,
            output_dim=self.output_dim,
            mask_zero=self.mask_zero,
            embeddings_initializer=self._initializer_config or "zeros",
            optimizer=optimizer,
        )
        return config

    @classmethod
    def from_config(cls, config: dict) -> "Embedding":
        config = dict(config)
        spec = config.pop("optimizer", None)
        if spec is not None:
            config["optimizer"] = _embtable.optimizer_from_state_dict(
                {"kind": spec["kind"], "config": spec["config"], "steps": 0, "shape": None,
                 "arrays": {}, "last_step": np.zeros(0, np.int64), "lr_history": []}
            )
        return cls(**config)

    # Keras 3 saving (`model.save("m.keras")`): the table and the whole
    # optimizer state, current.
    # The zero-size anchor holds nothing, so Keras' own variable handling
    # is not called.
    def save_own_variables(self, store: Any) -> None:
        state = self._layer.state_dict()
        store["embtable.weight"] = state["weight"]
        opt = state["optimizer"]
        if opt is not None:
            for name, array in opt.pop("arrays").items():
                store["embtable.optimizer." + name] = array
            store["embtable.optimizer.last_step"] = opt.pop("last_step")
        meta = json.dumps({"optimizer": opt}).encode()
        store["embtable.meta"] = np.frombuffer(meta, dtype=np.uint8)

    def load_own_variables(self, store: Any) -> None:
        meta = json.loads(bytes(np.asarray(store["embtable.meta"], dtype=np.uint8)).decode())
        state: dict = {"weight": np.asarray(store["embtable.weight"]), "optimizer": None}
        opt = meta.get("optimizer")
        if opt is not None:
            prefix = "embtable.optimizer."
            arrays = {k[len(prefix):]: np.asarray(store[k]) for k in store.keys()
                      if k.startswith(prefix) and k != prefix + "last_step"}
            state["optimizer"] = dict(
                opt, shape=tuple(opt["shape"]) if opt["shape"] else None, arrays=arrays,
                last_step=np.asarray(store[prefix + "last_step"]),
                lr_history=[tuple(p) for p in opt["lr_history"]],
            )
        self._layer.load_state_dict(state)


def _lookup_function():
    """The autograd function, defined on first use so that importing this
    module does not import torch on other backends."""
    import torch

    class Lookup(torch.autograd.Function):
        @staticmethod
        def forward(ctx, layer, ids, anchor):  # type: ignore[override]
            ctx.layer, ctx.ids = layer, ids
            return torch.from_numpy(layer._layer.forward(ids))

        @staticmethod
        def backward(ctx, grad):  # type: ignore[override]
            layer = ctx.layer
            if ctx.needs_input_grad[2] and layer.trainable:
                if layer._layer.optimizer is None:
                    raise RuntimeError("the layer has no optimizer; build it with optimizer=")
                g = grad.detach().to(torch.float32).contiguous().numpy()
                layer._layer.backward_step(ctx.ids, g)
            # A zero gradient for the zero-size anchor keeps Keras' optimizer quiet.
            return None, None, torch.zeros(0, dtype=grad.dtype)

    return Lookup


class _LazyFunction:
    def __init__(self) -> None:
        self._fn = None

    def apply(self, *args: Any) -> Any:
        if self._fn is None:
            self._fn = _lookup_function()
        return self._fn.apply(*args)


_KerasLookup = _LazyFunction()
