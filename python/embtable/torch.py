"""PyTorch modules backed by embtable, with the sparse optimizer fused into
the backward pass.

:class:`Embedding` and :class:`EmbeddingBag` take the constructor arguments
of ``torch.nn.Embedding`` / ``torch.nn.EmbeddingBag`` plus ``optimizer=``
(an :class:`embtable.Optimizer`, e.g. ``embtable.Adagrad.torch(lr=0.05)``).
``forward`` returns a float32 tensor inside autograd; when the backward pass
reaches it, the gradient of the batch is coalesced and the optimizer updates
the rows of the batch right there, as FBGEMM's table-batched embeddings do,
so the rest of the model is trained by an ordinary ``torch.optim`` optimizer
in the same loop::

    bag = embtable.torch.EmbeddingBag(1_000_000, 64, mode="sum",
                                      optimizer=embtable.Adagrad.torch(lr=0.05))
    top = torch.nn.Linear(64, 1)
    opt = torch.optim.Adagrad(top.parameters(), lr=0.05)
    loss = loss_fn(top(bag(ids, offsets)), y)
    opt.zero_grad(); loss.backward(); opt.step()   # the table is already updated

With ``fused=False`` gradients accumulate over several backward passes (two
features sharing a table, gradient accumulation) and are applied by
``module.step()``.

``module.weight`` is the table itself as a float32 tensor (a zero-copy
view; ``requires_grad`` says whether the table trains, as ``freeze`` sets
it); ``state_dict()`` holds the weight and the optimizer's whole state.
Tables live in CPU memory: the modules refuse tensors on other devices.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from . import _embtable
from ._embtable import Optimizer

__all__ = ["Embedding", "EmbeddingBag"]

# The key torch uses for a module's extra (non-tensor) state.
_EXTRA_STATE = "_extra_state"


def _ids(t: Any, what: str) -> np.ndarray:
    """Integer ids as a NumPy array, without a copy when they are on the CPU."""
    if isinstance(t, torch.Tensor):
        if t.device.type != "cpu":
            raise ValueError(
                f"{what} is on {t.device}; embtable tables live in CPU memory, "
                "move it with .cpu()"
            )
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{what} must hold integer ids (int64 or int32), got {t.dtype}")
        return t.detach().numpy()
    return np.asarray(t)


def _floats(t: Any, what: str) -> np.ndarray:
    """Float values as a NumPy array (float32 is read in place)."""
    if isinstance(t, torch.Tensor):
        if t.device.type != "cpu":
            raise ValueError(
                f"{what} is on {t.device}; embtable tables live in CPU memory, "
                "move it with .cpu()"
            )
        if not t.is_floating_point():
            raise ValueError(f"{what} must be floating point, got {t.dtype}")
        t = t.detach()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def _grad(grad: torch.Tensor) -> np.ndarray:
    """The output gradient as a contiguous float32 array."""
    return grad.detach().to(dtype=torch.float32).contiguous().numpy()


def _matrix(embeddings: Any) -> np.ndarray:
    """Pretrained vectors (tensor, array, or embtable.Table) as a 2-D array."""
    if isinstance(embeddings, _embtable.Table):
        return embeddings.to_numpy()
    if isinstance(embeddings, torch.Tensor):
        return _floats(embeddings, "embeddings")
    return np.asarray(embeddings)


class _Lookup(torch.autograd.Function):
    """``module(ids)``; backward hands the gradient to the module's layer."""

    @staticmethod
    def forward(ctx, module, ids, weight):  # type: ignore[override]
        ctx.module, ctx.ids = module, ids
        return torch.from_numpy(module._layer.forward(ids))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.needs_input_grad[2]:
            ctx.module._take_grad(lambda layer, g: layer.backward(ctx.ids, g),
                              lambda layer, g: layer.backward_step(ctx.ids, g), grad)
        return None, None, None


class _Bag(torch.autograd.Function):
    """``module(input, offsets, per_sample_weights)``; backward gives the
    weights' gradient (from the rows as they were in forward) and then hands
    the rows' gradient to the module's layer."""

    @staticmethod
    def forward(ctx, module, ids, offsets, weights, weight, weights_tensor):  # type: ignore[override]
        ctx.module, ctx.ids, ctx.offsets, ctx.weights = module, ids, offsets, weights
        out = module._layer.forward_pooled(
            ids,
            offsets,
            mode=module.mode,
            per_sample_weights=weights,
            include_last_offset=module.include_last_offset,
        )
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        module = ctx.module
        bag = dict(
            mode=module.mode,
            per_sample_weights=ctx.weights,
            include_last_offset=module.include_last_offset,
        )
        g = _grad(grad)
        weights_grad = None
        if ctx.needs_input_grad[5]:
            dw = module._layer.per_sample_weights_grad(ctx.ids, ctx.offsets, grad_out=g, **bag)
            weights_grad = torch.from_numpy(dw)
        if ctx.needs_input_grad[4]:
            module._take_grad(
                lambda layer, g: layer.backward_pooled(ctx.ids, ctx.offsets, grad_out=g, **bag),
                lambda layer, g: layer.backward_pooled(
                    ctx.ids, ctx.offsets, grad_out=g, step=True, **bag
                ),
                g,
            )
        return None, None, None, None, None, weights_grad


class _Module(nn.Module):
    """What :class:`Embedding` and :class:`EmbeddingBag` share."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int],
        max_norm: Optional[float],
        norm_type: float,
        scale_grad_by_freq: bool,
        sparse: bool,
        _weight: Optional[Any],
        _freeze: bool,
        device: Any,
        dtype: Any,
        optimizer: Optional[Optimizer],
        fused: bool,
    ) -> None:
        super().__init__()
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"embtable tables live in CPU memory; device={device!r} is not supported")
        if dtype is not None and dtype != torch.float32:
            raise ValueError(f"embtable tables hold float32; dtype={dtype!r} is not supported")
        if norm_type != 2.0:
            raise ValueError(f"only norm_type=2.0 (the L2 norm of max_norm) is supported, got {norm_type}")
        if scale_grad_by_freq:
            raise ValueError("scale_grad_by_freq=True is not supported")
        del sparse  # the gradient is always sparse
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(
                    f"padding_idx {padding_idx} must be within num_embeddings {num_embeddings}"
                )
            if padding_idx < 0:
                padding_idx += num_embeddings
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise TypeError(
                "optimizer must be an embtable optimizer such as embtable.Adagrad.torch(lr=0.01), "
                f"got {type(optimizer).__name__}"
            )
        if optimizer is None and not _freeze:
            raise TypeError(
                "a trainable module needs optimizer=, e.g. embtable.Adagrad.torch(lr=0.01) "
                "(or freeze the table)"
            )
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scale_grad_by_freq = False
        self.sparse = True
        self.fused = fused
        if _weight is None:
            table: Any = (num_embeddings, embedding_dim)
        else:
            table = _matrix(_weight)
            if tuple(table.shape) != (num_embeddings, embedding_dim):
                raise ValueError(
                    f"_weight has shape {tuple(table.shape)}, expected "
                    f"({num_embeddings}, {embedding_dim})"
                )
        # PyTorch rescales the rows of a batch to max_norm when it looks them up.
        self._layer = _embtable.Embedding(
            table, optimizer, padding_idx=padding_idx, trainable=optimizer is not None,
            max_norm=max_norm, max_norm_at="lookup",
        )
        # The table itself, shared with the layer (a strided view of its padded rows).
        self.weight = nn.Parameter(torch.from_numpy(self._layer.weight), requires_grad=not _freeze)
        if _weight is None:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws N(0, 1) from torch's generator, as torch's modules do;
        the padding row is zero."""
        with torch.no_grad():
            self.weight.normal_()
            if self.padding_idx is not None:
                self.weight[self.padding_idx].fill_(0)

    @property
    def optimizer(self) -> Optional[Optimizer]:
        """The optimizer the table trains with (changing its options,
        e.g. ``module.optimizer.lr = 0.01``, takes effect at the next
        update), or ``None``."""
        return self._layer.optimizer

    @optimizer.setter
    def optimizer(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be an embtable optimizer, got {type(optimizer).__name__}")
        self._layer.optimizer = optimizer
        self._layer.trainable = True

    def step(self) -> None:
        """Applies the gradient accumulated since the last step
        (``fused=False``); with ``fused=True`` nothing is ever pending."""
        self._layer.step()

    def clear_grad(self) -> None:
        """Drops the gradient accumulated since the last step."""
        self._layer.clear_grad()

    def flush(self) -> None:
        """Brings every row current (dense-exact optimizers such as the
        Keras presets with momentum); ``state_dict`` does it too."""
        self._layer.flush()

    def _take_grad(self, accumulate, fused_update, grad) -> None:
        """Hands ``grad`` to the layer: fused update, or accumulate."""
        if self._layer.optimizer is None:
            raise RuntimeError(
                "the table requires grad but the module has no optimizer; "
                "set module.optimizer = embtable.Adagrad.torch(...) (or freeze the weight)"
            )
        g = grad if isinstance(grad, np.ndarray) else _grad(grad)
        (fused_update if self.fused else accumulate)(self._layer, g)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # `.to()`, `.double()`, `.cuda()`, `.share_memory()` all come here: the
        # table is embtable's memory, so only what keeps it in place is allowed.
        ptr = self.weight.data_ptr()
        moved = fn(self.weight)
        if (
            moved.data_ptr() != ptr
            or self.weight.data_ptr() != ptr
            or moved.dtype != torch.float32
            or moved.device.type != "cpu"
        ):
            raise ValueError(
                "an embtable table stays in CPU memory as float32; it cannot be moved or "
                f"converted (got {moved.dtype} on {moved.device})"
            )
        return super()._apply(lambda t: t if t is self.weight else fn(t), recurse)

    # -- state dict: the weight, the optimizer's arrays as tensors, and the
    # rest of its state (kind, config, step count) as extra state.

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        self._layer.flush()
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        extra: dict = {"optimizer": None}
        if self._layer.optimizer is not None:
            state = self._layer.optimizer.state_dict()
            for name, array in state.pop("arrays").items():
                destination[prefix + "optimizer." + name] = torch.from_numpy(array)
            destination[prefix + "optimizer.last_step"] = torch.from_numpy(state.pop("last_step"))
            extra["optimizer"] = state
        destination[prefix + _EXTRA_STATE] = extra

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if "weight" not in ours:
            missing_keys.append(prefix + "weight")
            return
        weight = ours.pop("weight")
        extra = ours.pop(_EXTRA_STATE, None)
        arrays = {k[len("optimizer."):]: ours.pop(k) for k in list(ours) if k.startswith("optimizer.")}
        unexpected_keys.extend(prefix + k for k in ours)
        state: dict = {"weight": _floats(weight, prefix + "weight")}
        saved = (extra or {}).get("optimizer")
        if saved is not None:
            last_step = arrays.pop("last_step", None)
            if last_step is None:
                missing_keys.append(prefix + "optimizer.last_step")
                return
            state["optimizer"] = dict(
                saved,
                arrays={name: _floats(t, prefix + "optimizer." + name) for name, t in arrays.items()},
                last_step=_ids(last_step, prefix + "optimizer.last_step"),
            )
        elif arrays:
            unexpected_keys.extend(prefix + "optimizer." + k for k in arrays)
        try:
            self._layer.load_state_dict(state)
        except (ValueError, IndexError) as e:
            error_msgs.append(f"While loading {prefix or 'the module'}: {e}")
            return
        if saved is not None:
            self._layer.trainable = True

    def _extra_repr_common(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.max_norm is not None:
            s += f", max_norm={self.max_norm}"
        return s

    def _optimizer_repr(self) -> str:
        return f", optimizer={self.optimizer!r}" + ("" if self.fused else ", fused=False")


class Embedding(_Module):
    """``torch.nn.Embedding`` with its table in embtable, trained by a
    sparse embtable optimizer inside the backward pass.

    Arguments as ``torch.nn.Embedding``: ``num_embeddings``,
    ``embedding_dim``, ``padding_idx`` (that row is zero and never trains),
    ``max_norm`` (rows looked up are rescaled to it first, L2 only),
    ``_weight``/``_freeze``; ``sparse`` is accepted and ignored (the
    gradient is always sparse); ``device`` must be the CPU and ``dtype``
    float32. Added: ``optimizer`` (required unless frozen) and ``fused``.

    ``forward(input)`` takes int64 or int32 ids of any shape and returns
    ``input.shape + (embedding_dim,)``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int] = None,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Optional[Any] = None,
        _freeze: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        optimizer: Optional[Optimizer] = None,
        fused: bool = True,
    ) -> None:
        super().__init__(
            num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
            scale_grad_by_freq, sparse, _weight, _freeze, device, dtype, optimizer, fused,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        ids = _ids(input, "input")
        return _Lookup.apply(self, ids, self.weight)

    @classmethod
    def from_pretrained(
        cls,
        embeddings: Any,
        freeze: bool = True,
        padding_idx: Optional[int] = None,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        *,
        optimizer: Optional[Optimizer] = None,
        fused: bool = True,
    ) -> "Embedding":
        """A module holding a copy of ``embeddings`` (a 2-D tensor, array or
        ``embtable.Table``), frozen unless ``freeze=False``. The padding
        row, if any, is set to zero."""
        matrix = _matrix(embeddings)
        if matrix.ndim != 2:
            raise ValueError(f"embeddings must be 2-D, got shape {tuple(matrix.shape)}")
        rows, dim = matrix.shape
        return cls(
            rows, dim, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse,
            _weight=matrix, _freeze=freeze, optimizer=optimizer, fused=fused,
        )

    def extra_repr(self) -> str:
        return self._extra_repr_common() + self._optimizer_repr()


class EmbeddingBag(_Module):
    """``torch.nn.EmbeddingBag`` with its table in embtable, trained by a
    sparse embtable optimizer inside the backward pass.

    Arguments as ``torch.nn.EmbeddingBag``: ``num_embeddings``,
    ``embedding_dim``, ``max_norm``, ``mode`` (``"sum"``, ``"mean"``,
    ``"max"``, and TensorFlow's ``"sqrtn"``), ``include_last_offset``,
    ``padding_idx`` (left out of its bag), ``_weight``/``_freeze``;
    ``sparse`` is accepted and ignored. Added: ``optimizer`` and ``fused``.

    ``forward(input, offsets=None, per_sample_weights=None)``: 1-D ids with
    ``offsets`` (one start per bag, or with the total appended when
    ``include_last_offset``), or 2-D ids (one bag per row). Per-sample
    weights work with ``"sum"`` (as in torch), ``"mean"`` and ``"sqrtn"``;
    their gradient flows when they require grad.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        mode: str = "mean",
        sparse: bool = False,
        _weight: Optional[Any] = None,
        include_last_offset: bool = False,
        padding_idx: Optional[int] = None,
        device: Any = None,
        dtype: Any = None,
        *,
        _freeze: bool = False,
        optimizer: Optional[Optimizer] = None,
        fused: bool = True,
    ) -> None:
        if mode not in ("sum", "mean", "max", "sqrtn"):
            raise ValueError(f'mode must be "sum", "mean", "max" or "sqrtn", got {mode!r}')
        self.mode = mode
        self.include_last_offset = include_last_offset
        super().__init__(
            num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
            scale_grad_by_freq, sparse, _weight, _freeze, device, dtype, optimizer, fused,
        )

    def forward(
        self,
        input: torch.Tensor,
        offsets: Optional[torch.Tensor] = None,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        ids = _ids(input, "input")
        offs = None if offsets is None else _ids(offsets, "offsets")
        weights = None
        if per_sample_weights is not None:
            if self.mode == "max":
                raise ValueError('per_sample_weights cannot be used with mode="max"')
            weights = _floats(per_sample_weights, "per_sample_weights")
        return _Bag.apply(self, ids, offs, weights, self.weight, per_sample_weights)

    @classmethod
    def from_pretrained(
        cls,
        embeddings: Any,
        freeze: bool = True,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        mode: str = "mean",
        sparse: bool = False,
        include_last_offset: bool = False,
        padding_idx: Optional[int] = None,
        *,
        optimizer: Optional[Optimizer] = None,
        fused: bool = True,
    ) -> "EmbeddingBag":
        """A module holding a copy of ``embeddings`` (a 2-D tensor, array or
        ``embtable.Table``), frozen unless ``freeze=False``."""
        matrix = _matrix(embeddings)
        if matrix.ndim != 2:
            raise ValueError(f"embeddings must be 2-D, got shape {tuple(matrix.shape)}")
        rows, dim = matrix.shape
        return cls(
            rows, dim, max_norm, norm_type, scale_grad_by_freq, mode, sparse, matrix,
            include_last_offset, padding_idx, _freeze=freeze, optimizer=optimizer, fused=fused,
        )

    def extra_repr(self) -> str:
        s = self._extra_repr_common() + f", mode={self.mode!r}"
        if self.include_last_offset:
            s += ", include_last_offset=True"
        return s + self._optimizer_repr()
