"""Type stubs of embtable's compiled module (``embtable._embtable``).

Every class and function here is re-exported by ``embtable``. Ids are any
integer array-like of any shape (``int8`` to ``uint64``, lists, views);
float inputs are converted to float32; outputs are new float32 arrays
unless ``out=`` is given.
"""

from collections.abc import Iterator, Mapping, Sequence
from os import PathLike
from typing import Any, Literal, Optional, Union, overload

import numpy as np
import numpy.typing as npt

_Ids = npt.ArrayLike
_Floats = npt.ArrayLike
_Path = Union[str, PathLike[str]]
_Mode = Literal["sum", "mean", "max", "sqrtn"]
_F32 = npt.NDArray[np.float32]

__version__: str

class Table:
    """A ``num_rows x dim`` float32 embedding table (one 64-byte aligned
    allocation, rows padded to 16 floats).

    ``Table(num_rows, dim, seed=0)`` draws Keras' default, U(-0.05, 0.05).
    The same seed gives the same table on every machine and thread count
    (embtable's own generator: values differ from Keras' or PyTorch's).
    """

    def __init__(self, num_rows: int, dim: int, *, seed: int = 0) -> None: ...
    @staticmethod
    def uniform(num_rows: int, dim: int, low: float = -0.05, high: float = 0.05, *, seed: int = 0) -> Table:
        """Values uniform in ``[low, high)``."""
    @staticmethod
    def normal(num_rows: int, dim: int, mean: float = 0.0, std: float = 1.0, *, seed: int = 0) -> Table:
        """Normal values (PyTorch's embedding default is N(0, 1))."""
    @staticmethod
    def truncated_normal(num_rows: int, dim: int, mean: float = 0.0, std: float = 0.05, *, seed: int = 0) -> Table:
        """Normal values re-drawn beyond two standard deviations (Keras'
        ``TruncatedNormal``; the spread is not rescaled)."""
    @staticmethod
    def zeros(num_rows: int, dim: int) -> Table:
        """All zeros."""
    @staticmethod
    def full(num_rows: int, dim: int, value: float) -> Table:
        """Every value ``value``."""
    @staticmethod
    def from_numpy(array: _Floats) -> Table:
        """A copy of a 2-D float array (float64/float16 converted to float32)."""
    def to_numpy(self) -> _F32:
        """A copy of the values, ``(num_rows, dim)`` float32."""
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray: ...
    @property
    def num_rows(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def shape(self) -> tuple[int, int]: ...
    def __len__(self) -> int: ...
    def lookup(self, ids: _Ids, *, out: Optional[_F32] = None) -> _F32:
        """The rows of ``ids``: shape ``ids.shape + (dim,)``.

        Raises ``IndexError`` naming the position and the value of the first
        id that is negative or ``>= num_rows``; nothing is written then.
        ``out`` must be a C-contiguous float32 array of that shape.
        """
    def pooled_lookup(
        self,
        input: _Ids,
        offsets: Optional[_Ids] = None,
        *,
        mode: _Mode = "mean",
        per_sample_weights: Optional[_Floats] = None,
        include_last_offset: bool = False,
        out: Optional[_F32] = None,
    ) -> _F32:
        """Each bag of ids reduced to one row: ``(bags, dim)``.

        PyTorch's ``embedding_bag`` inputs: 1-D ``input`` with ``offsets``
        (the start of each bag; with ``include_last_offset=True`` also the
        total at the end), or 2-D ``input`` (one bag per row, no offsets).
        ``mode``: ``"sum"`` (Σ wᵢeᵢ), ``"mean"`` (Σ wᵢeᵢ / Σ wᵢ), ``"sqrtn"``
        (Σ wᵢeᵢ / √Σ wᵢ²) or ``"max"`` (per lane, no weights). Empty bags
        give zero rows.
        """
    def lookup_grad(self, ids: _Ids, grad_out: _Floats) -> SparseGrad:
        """The gradient of ``lookup(ids)`` given ``grad_out`` (shape
        ``ids.shape + (dim,)`` or ``(ids.size, dim)``)."""
    def pooled_lookup_grad(
        self,
        input: _Ids,
        offsets: Optional[_Ids] = None,
        *,
        grad_out: _Floats,
        mode: _Mode = "mean",
        per_sample_weights: Optional[_Floats] = None,
        include_last_offset: bool = False,
    ) -> SparseGrad:
        """The gradient of ``pooled_lookup(...)`` given ``grad_out``
        (``(bags, dim)``); max routes each lane to its arg-max id."""
    def row(self, i: int) -> _F32:
        """A copy of row ``i``."""
    def renorm_rows(self, ids: _Ids, max_norm: float) -> None:
        """Rescales rows of ``ids`` whose L2 norm exceeds ``max_norm``
        (``row *= max_norm / (norm + 1e-7)``, PyTorch's ``max_norm``)."""
    def copy(self) -> Table: ...
    def __eq__(self, other: object) -> bool:
        """Same shape and the same bits."""

class SparseGrad:
    """A table's gradient, one row per distinct id (duplicates summed in
    batch order)."""

    def __init__(self, dim: int) -> None: ...
    def accumulate_lookup(self, ids: _Ids, grad_out: _Floats) -> None:
        """Adds the gradient of ``table.lookup(ids)``."""
    def accumulate_pooled(
        self,
        table: Table,
        input: _Ids,
        offsets: Optional[_Ids] = None,
        *,
        grad_out: _Floats,
        mode: _Mode = "mean",
        per_sample_weights: Optional[_Floats] = None,
        include_last_offset: bool = False,
    ) -> None:
        """Adds the gradient of ``table.pooled_lookup(...)``."""
    @property
    def dim(self) -> int: ...
    @property
    def rows(self) -> npt.NDArray[np.int64]:
        """The distinct rows, in the order first seen."""
    @property
    def values(self) -> _F32:
        """The summed gradient of each row of ``rows``: ``(len, dim)``."""
    def to_dense(self, num_rows: int) -> _F32:
        """The dense ``(num_rows, dim)`` gradient."""
    def clear(self) -> None: ...
    def __len__(self) -> int: ...

class Optimizer:
    """Base class of the sparse optimizers: a config and, once it has
    stepped, the state of the one table it steps.

    Only the rows of the batch are updated; duplicate ids are summed first
    (Adagrad adds (Σg)², not Σg²). Options are read and set as attributes
    (``opt.lr``, ``opt.lr = 0.01``) or with :meth:`set`; ``config`` gives
    them all. Semantics ``"lazy"``: absent rows keep weights and state bit
    for bit (PyTorch sparse, TensorFlow, FBGEMM); ``"dense_exact"``: what
    the dense optimizer computes on the dense gradient (Keras 3), work
    still proportional to the batch.
    """

    def __init__(self, kind: str, preset: str, config: Optional[Mapping[str, Any]] = None) -> None:
        """Any optimizer by kind (``"adagrad"``) and preset (``"torch"``)."""
    @property
    def kind(self) -> str:
        """``"sgd"``, ``"rmsprop"``, ``"adagrad"``, ``"rowwise_adagrad"``,
        ``"adam"``, ``"adamw"`` or ``"ftrl"``."""
    @property
    def config(self) -> dict[str, Any]:
        """Every option by name (floats shown as their float32 value)."""
    def __getattr__(self, name: str) -> Any: ...
    def set(self, **options: Any) -> None:
        """Changes options, keeping the state. Options that decide which
        state arrays exist (``momentum`` from or to 0, ``centered``,
        ``amsgrad``) cannot change after the first step. A new ``lr`` goes
        through :meth:`set_lr` (cheap); other options copy the state twice:
        fine between epochs, slow every step of a large table. On error
        nothing changes."""
    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps (as ``opt.lr = lr``, a
        PyTorch scheduler or Keras' ``optimizer.learning_rate = lr``).
        Under ``"dense_exact"``, rows lagging behind still catch up the
        steps they missed with the rates those steps used."""
    def set_schedule(self, schedule: Union[ExponentialDecay, StepLR, None]) -> None:
        """Before each step the rate becomes ``schedule(steps)``; ``None``
        removes it. Not saved by :meth:`state_dict`: set it again after
        loading."""
    @property
    def steps(self) -> int:
        """Steps taken so far (Keras' ``optimizer.iterations``)."""
    @property
    def next_lr(self) -> float:
        """The rate the next step will use (the schedule's, if set)."""
    def step(self, table: Table, grad: SparseGrad) -> None:
        """One step on the rows ``grad`` names."""
    def step_lookup(self, table: Table, ids: _Ids, grad_out: _Floats) -> None:
        """One step with the gradient of ``table.lookup(ids)``, coalescing
        and updating in one pass (bitwise the same as ``step``)."""
    def flush(self, table: Table) -> None:
        """Brings every row current (``"dense_exact"``)."""
    def state_dict(self) -> dict[str, Any]:
        """``kind``, ``config``, ``steps``, ``shape``, ``arrays`` (name ->
        ``(num_rows, dim)`` or ``(num_rows,)`` float32), ``last_step``
        (int64 per row under ``"dense_exact"``, else empty) and
        ``lr_history`` (``(until_step, lr)`` pairs lagging rows still need)."""
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replaces config and state; on error nothing changes."""
    def copy(self) -> Optimizer:
        """An independent copy, state included."""

class Sgd(Optimizer):
    """SGD with momentum, Nesterov and weight decay.

    Options: ``lr``, ``momentum``, ``nesterov``, ``weight_decay``,
    ``semantics`` (``"lazy"``/``"dense_exact"``), ``style`` (``"keras"``:
    v = μv − ηg, w += v, decoupled decay; ``"torch"``: b = μb + g, w −= ηb,
    coupled decay). ``Sgd(**options)`` is ``Sgd.keras(**options)``.
    """

    def __init__(self, **options: Any) -> None: ...
    @staticmethod
    def keras(**overrides: Any) -> Sgd:
        """Keras 3's ``SGD``: lr 0.01, no momentum, dense-exact."""
    @staticmethod
    def keras_lazy(**overrides: Any) -> Sgd:
        """Keras' formulas with lazy semantics (TensorFlow's sparse updates)."""
    @staticmethod
    def torch(**overrides: Any) -> Sgd:
        """``torch.optim.SGD``: lr 1e-3, torch's momentum form."""

class RmsProp(Optimizer):
    """RMSprop, plain or centred, with momentum.

    Options: ``lr``, ``rho`` (torch's ``alpha``), ``momentum``,
    ``epsilon``, ``centered``, ``eps_placement`` (``"inside_sqrt"``:
    √(s+ε), Keras; ``"outside_sqrt"``: √s+ε, torch), ``semantics``.
    """

    def __init__(self, **options: Any) -> None: ...
    @staticmethod
    def keras(**overrides: Any) -> RmsProp:
        """Keras 3's ``RMSprop``: lr 1e-3, rho 0.9, eps 1e-7 inside the root, dense-exact."""
    @staticmethod
    def keras_lazy(**overrides: Any) -> RmsProp:
        """Keras' formulas with lazy semantics."""
    @staticmethod
    def torch(**overrides: Any) -> RmsProp:
        """``torch.optim.RMSprop``: lr 1e-2, alpha 0.99, eps 1e-8 outside the root."""

class Adagrad(Optimizer):
    """Adagrad, element-wise: a += g²; w −= ηg/√(a+ε) (or /(√a+ε)).

    Options: ``lr``, ``initial_accumulator_value``, ``epsilon``,
    ``eps_placement``, ``lr_decay`` and ``weight_decay`` (PyTorch's,
    coupled), ``semantics`` (lazy and dense agree without weight decay).
    """

    def __init__(self, **options: Any) -> None: ...
    @staticmethod
    def keras(**overrides: Any) -> Adagrad:
        """Keras 3's ``Adagrad``: lr 1e-3, accumulators from 0.1, eps 1e-7 inside."""
    @staticmethod
    def torch(**overrides: Any) -> Adagrad:
        """``torch.optim.Adagrad``: lr 1e-2, accumulators from 0, eps 1e-10 outside."""

class RowWiseAdagrad(Optimizer):
    """FBGEMM's row-wise Adagrad: one accumulator per row,
    h += mean(g²); w −= ηg/(√h+ε).

    Options: ``lr``, ``initial_accumulator_value``, ``epsilon``.
    """

    def __init__(self, **options: Any) -> None: ...
    @staticmethod
    def fbgemm(**overrides: Any) -> RowWiseAdagrad:
        """FBGEMM's defaults: lr 0.01, eps 1e-8, accumulators from 0."""

class Adam(Optimizer):
    """Adam with Keras', PyTorch's dense or ``SparseAdam``'s formulas.

    Options: ``lr``, ``beta_1``, ``beta_2`` (kept as doubles), ``epsilon``,
    ``amsgrad``, ``weight_decay`` (decoupled for ``style="keras"``,
    coupled for ``"torch"`` / ``"torch_sparse"``), ``style``,
    ``semantics``.
    """

    def __init__(self, **options: Any) -> None: ...
    @staticmethod
    def keras(**overrides: Any) -> Adam:
        """Keras 3's ``Adam``: lr 1e-3, betas (0.9, 0.999), eps 1e-7, dense-exact."""
    @staticmethod
    def keras_lazy(**overrides: Any) -> Adam:
        """Keras' formulas, lazy (TensorFlow Addons' ``LazyAdam``)."""
    @staticmethod
    def torch(**overrides: Any) -> Adam:
        """``torch.optim.Adam`` on a dense gradient: eps 1e-8 added to the
        bias-corrected root, dense-exact."""
    @staticmethod
    def torch_sparse(**overrides: Any) -> Adam:
        """``torch.optim.SparseAdam``: eps 1e-8, lazy."""

class AdamW(Optimizer):
    """Adam with decoupled weight decay. Options as :class:`Adam`."""

    def __init__(self, **options: Any) -> None: ...
    @staticmethod
    def keras(**overrides: Any) -> AdamW:
        """Keras 3's ``AdamW``: weight decay 0.004, dense-exact."""
    @staticmethod
    def keras_lazy(**overrides: Any) -> AdamW:
        """Keras' formulas, lazy."""
    @staticmethod
    def torch(**overrides: Any) -> AdamW:
        """``torch.optim.AdamW``: weight decay 0.01, eps 1e-8, dense-exact."""

class Ftrl(Optimizer):
    """FTRL-proximal, as Keras 3's ``Ftrl``.

    Options: ``lr``, ``learning_rate_power``, ``initial_accumulator_value``,
    ``l1_regularization_strength``, ``l2_regularization_strength``,
    ``l2_shrinkage_regularization_strength``, ``beta``, ``semantics``.
    """

    def __init__(self, **options: Any) -> None: ...
    @staticmethod
    def keras(**overrides: Any) -> Ftrl:
        """Keras 3's ``Ftrl``: lr 1e-3, power -0.5, accumulators from 0.1, dense-exact."""
    @staticmethod
    def keras_lazy(**overrides: Any) -> Ftrl:
        """Keras' formulas, lazy (TensorFlow's sparse FTRL)."""

class ExponentialDecay:
    """Keras' ``ExponentialDecay``: ``initial_learning_rate *
    decay_rate ** (steps / decay_steps)``, floored exponent if ``staircase``."""

    def __init__(
        self, initial_learning_rate: float, decay_steps: int, decay_rate: float, staircase: bool = False
    ) -> None: ...
    def __call__(self, steps: int) -> float: ...

class StepLR:
    """PyTorch's ``StepLR`` counted in optimizer steps:
    ``lr * gamma ** (steps // step_size)``."""

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1) -> None: ...
    def __call__(self, steps: int) -> float: ...

def optimizer_from_state_dict(state: Mapping[str, Any]) -> Optimizer:
    """The optimizer a ``state_dict()`` describes (its class by ``kind``)."""

class Embedding:
    """An embedding layer: a table, its optimizer and the gradient pending
    for the next :meth:`step`.

    ``table``: a :class:`Table` or a 2-D float array (copied), or a
    ``(num_rows, dim)`` shape (zeros). ``optimizer`` is copied (required
    unless ``trainable=False``). ``padding_idx``: a row that is zero, left
    out of bags and never trained. ``out_of_range``: ``"error"``
    (``IndexError``), ``"zero"``, ``"modulo"`` or a row number to use
    instead. ``max_norm``: rows are rescaled to it after each step that
    updates them (``max_norm_at="step"``, Keras' ``MaxNorm``) or when they
    are looked up (``"lookup"``, PyTorch's ``max_norm``).
    """

    def __init__(
        self,
        table: Union[Table, _Floats, tuple[int, int]],
        optimizer: Optional[Optimizer] = None,
        *,
        padding_idx: Optional[int] = None,
        out_of_range: Union[Literal["error", "zero", "modulo"], int, None] = None,
        trainable: bool = True,
        max_norm: Optional[float] = None,
        max_norm_at: Literal["step", "lookup"] = "step",
    ) -> None: ...
    def forward(self, ids: _Ids, *, out: Optional[_F32] = None) -> _F32:
        """The rows of ``ids``: ``ids.shape + (dim,)``."""
    def backward(self, ids: _Ids, grad_out: _Floats) -> None:
        """Accumulates the gradient of ``forward(ids)``."""
    def backward_step(self, ids: _Ids, grad_out: _Floats) -> None:
        """``backward`` and ``step`` in one call (fused, as in training)."""
    def forward_pooled(
        self,
        input: _Ids,
        offsets: Optional[_Ids] = None,
        *,
        mode: _Mode = "mean",
        per_sample_weights: Optional[_Floats] = None,
        include_last_offset: bool = False,
        out: Optional[_F32] = None,
    ) -> _F32:
        """Pooled rows, as :meth:`Table.pooled_lookup`; padding ids are
        left out of their bags."""
    def backward_pooled(
        self,
        input: _Ids,
        offsets: Optional[_Ids] = None,
        *,
        grad_out: _Floats,
        mode: _Mode = "mean",
        per_sample_weights: Optional[_Floats] = None,
        include_last_offset: bool = False,
        step: bool = False,
    ) -> None:
        """Accumulates the gradient of ``forward_pooled``; ``step=True``
        also steps."""
    def per_sample_weights_grad(
        self,
        input: _Ids,
        offsets: Optional[_Ids] = None,
        *,
        grad_out: _Floats,
        mode: _Mode = "sum",
        per_sample_weights: Optional[_Floats] = None,
        include_last_offset: bool = False,
    ) -> _F32:
        """The gradient of ``forward_pooled`` with respect to the
        per-sample weights (input's shape). Sum: row · grad; Mean and
        SqrtN through the normaliser too."""
    def step(self) -> None:
        """Applies the pending gradient and clears it."""
    def clear_grad(self) -> None:
        """Drops the pending gradient."""
    def flush(self) -> None:
        """Brings every row current (``"dense_exact"`` optimizers)."""
    def mask(self, ids: _Ids) -> npt.NDArray[np.bool_]:
        """Keras' ``mask_zero``: ``ids != 0``."""
    @property
    def weight(self) -> _F32:
        """The table as a writable ``(num_rows, dim)`` view (not a copy)."""
    @property
    def table(self) -> Table:
        """A copy of the table."""
    @property
    def optimizer(self) -> Optional[Optimizer]:
        """The layer's own optimizer (live: changes apply to the next
        step); assigning copies the given one in."""
    @optimizer.setter
    def optimizer(self, optimizer: Optimizer) -> None: ...
    @property
    def grad(self) -> SparseGrad:
        """A copy of the pending gradient."""
    @property
    def num_rows(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def padding_idx(self) -> Optional[int]: ...
    @property
    def max_norm(self) -> Optional[float]: ...
    @property
    def max_norm_at(self) -> Literal["step", "lookup"]: ...
    @property
    def trainable(self) -> bool:
        """Whether :meth:`step` trains the table (Keras' ``layer.trainable``)."""
    @trainable.setter
    def trainable(self, trainable: bool) -> None:
        """Refused while a gradient is pending, or to unfreeze without an optimizer."""
    def state_dict(self) -> dict[str, Any]:
        """``{"weight": array, "optimizer": state dict or None}``, current."""
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Loads what ``state_dict`` gave; on error nothing changes."""
    def save(self, path: _Path) -> None:
        """The table, the optimizer's whole state and the options in one
        safetensors file (as Rust's ``Embedding::save``); refused while a
        gradient is pending."""
    @staticmethod
    def load(path: _Path) -> Embedding:
        """The layer :meth:`save` (or Rust's ``Embedding::save``) wrote,
        with a fresh optimizer of the saved kind holding the saved state."""

class Vocab(Mapping[str, int]):
    """Words in row order: a read-only mapping from word to row."""

    def __init__(self, words: Sequence[str]) -> None: ...
    def __getitem__(self, word: str) -> int: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    @property
    def words(self) -> list[str]: ...

class Pretrained:
    """Pretrained vectors: ``vocab`` and ``table`` (``vocab, table = p``)."""

    @property
    def vocab(self) -> Vocab: ...
    @property
    def table(self) -> Table: ...
    @property
    def dim(self) -> int: ...
    @property
    def duplicates(self) -> list[tuple[str, int, int]]:
        """``(word, line, first_row)`` of repeated words whose vectors were
        skipped (the first occurrence wins, as in gensim)."""
    def vector(self, word: str) -> Optional[_F32]: ...
    def table_for(
        self,
        word_index: Mapping[str, int],
        num_rows: Optional[int] = None,
        *,
        missing: Literal["zeros", "uniform", "normal"] = "zeros",
        seed: int = 0,
        padding_idx: Optional[int] = None,
    ) -> tuple[Table, dict[str, Any]]:
        """A table for your vocabulary (e.g. a tokenizer's ``word_index``)
        and its coverage (``found``, ``missing``, ``first_missing``,
        ``unnamed_rows``)."""
    def __iter__(self) -> Iterator[Any]: ...

class Checkpoint:
    """A checkpoint read back: ``ckpt[name]`` is ``(Table, Optimizer or None)``."""

    @property
    def names(self) -> list[str]: ...
    def __getitem__(self, name: str) -> tuple[Table, Optional[Optimizer]]: ...
    def __contains__(self, name: object) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def metadata(self, key: str) -> Optional[str]: ...
    def state_dict(self, name: str) -> dict[str, Any]:
        """As :meth:`Embedding.load_state_dict` takes it."""
    def take_layer(self, name: str) -> Embedding:
        """Removes layer ``name`` from this checkpoint and returns it with
        its optimizer state and options."""

def read_word2vec(
    path: _Path,
    *,
    binary: bool = False,
    limit: Optional[int] = None,
    unicode_errors: Literal["strict", "replace"] = "strict",
    words_with_spaces: bool = False,
) -> Pretrained:
    """Reads word2vec text (or ``binary=True``). ``FileNotFoundError`` /
    ``OSError`` for the file system, ``ValueError`` naming the file and the
    line for malformed content."""

def read_fasttext_vec(
    path: _Path,
    *,
    limit: Optional[int] = None,
    unicode_errors: Literal["strict", "replace"] = "strict",
    words_with_spaces: bool = False,
) -> Pretrained:
    """Reads a fastText ``.vec`` file."""

def read_glove(
    path: _Path,
    *,
    limit: Optional[int] = None,
    unicode_errors: Literal["strict", "replace"] = "strict",
    words_with_spaces: bool = False,
) -> Pretrained:
    """Reads a GloVe file (``words_with_spaces=True`` for glove.840B)."""

def write_word2vec(
    path: _Path, vocab: Union[Vocab, Sequence[str], Mapping[str, int]], table: Table, *, binary: bool = False
) -> None:
    """Writes word2vec text or binary, atomically; reads back bit for bit."""

def write_glove(path: _Path, vocab: Union[Vocab, Sequence[str], Mapping[str, int]], table: Table) -> None:
    """Writes GloVe text, atomically."""

def save_npy(path: _Path, table: Table) -> None:
    """Saves ``(num_rows, dim)`` float32 ``.npy``, atomically."""

def load_npy(path: _Path) -> Table:
    """Loads a 2-D ``.npy`` (float32; float16/float64 converted)."""

def save_table_safetensors(path: _Path, name: str, table: Table) -> None:
    """Saves one tensor ``name`` in a safetensors file."""

def load_table_safetensors(path: _Path, name: str) -> Table:
    """Loads tensor ``name`` of a safetensors file."""

def save_checkpoint(path: _Path, tables: Mapping[str, Any], *, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Saves tables with their optimizers' whole state (see
    ``embtable.save_checkpoint``)."""

def load_checkpoint(path: _Path) -> Checkpoint:
    """Reads a checkpoint written by Python or by the Rust library."""

def set_num_threads(n: int) -> None:
    """Sets the number of threads embtable's calls run on; results are
    bitwise the same for every ``n``."""

def get_num_threads() -> int: ...
def native_seconds() -> float:
    """Seconds spent inside embtable's native calls so far (benchmarks)."""
