"""embtable: fast, sparse embedding tables.

A Rust library for the layer that dominates recommender and NLP training,
the embedding table, with a NumPy API here, PyTorch modules in
:mod:`embtable.torch` and a Keras 3 layer in :mod:`embtable.keras`.

- :class:`Table`: a ``num_rows x dim`` float32 table; ``lookup`` takes
  integer ids of any shape and dtype, ``pooled_lookup`` PyTorch's
  ``embedding_bag`` inputs.
- :class:`SparseGrad`: a lookup's gradient, one row per distinct id.
- Optimizers :class:`Sgd`, :class:`RmsProp`, :class:`Adagrad`,
  :class:`RowWiseAdagrad`, :class:`Adam`, :class:`AdamW`, :class:`Ftrl`
  with Keras' and PyTorch's formulas as presets (``Adagrad.torch(lr=0.05)``,
  ``Adam.torch_sparse(lr=0.01)``, ``Ftrl.keras(...)``), updating only the
  rows of the batch; ``set_lr`` and schedules (:class:`ExponentialDecay`,
  :class:`StepLR`).
- :class:`Embedding`: a table, its optimizer and its pending gradient;
  ``save`` / ``Embedding.load`` keep all three's state in one file.
- Files: word2vec / GloVe / fastText vectors (:func:`read_word2vec`, ...),
  ``.npy``, safetensors, and checkpoints with the optimizer state.

Errors are standard exceptions naming the position and the value:
``IndexError`` for an id out of range, ``ValueError`` for shapes, dtypes,
configs and malformed files, ``OSError`` for the file system; after an
error nothing has changed. Long calls release the GIL and run on
embtable's threads (:func:`set_num_threads`); results do not depend on
their number.
"""

from __future__ import annotations

from collections.abc import Mapping as _Mapping
from typing import Any as _Any

from . import _embtable
from ._embtable import (
    Adagrad,
    Adam,
    AdamW,
    Checkpoint,
    Embedding,
    ExponentialDecay,
    Ftrl,
    Optimizer,
    Pretrained,
    RmsProp,
    RowWiseAdagrad,
    Sgd,
    SparseGrad,
    StepLR,
    Table,
    Vocab,
    __version__,
    get_num_threads,
    load_checkpoint,
    load_npy,
    load_table_safetensors,
    read_fasttext_vec,
    read_glove,
    read_word2vec,
    save_npy,
    save_table_safetensors,
    set_num_threads,
    write_glove,
    write_word2vec,
)

# A Vocab is a read-only mapping from word to row.
_Mapping.register(Vocab)


def save_checkpoint(
    path: _Any, tables: _Mapping[str, _Any], *, metadata: _Mapping[str, str] | None = None
) -> None:
    """Saves tables with their optimizers' whole state to one safetensors file.

    ``tables`` maps each name to an :class:`Embedding`, an
    ``embtable.torch`` or ``embtable.keras`` module, a :class:`Table`, or a
    ``(Table, Optimizer)`` pair. The file is written atomically; training
    resumes from it bit for bit (:func:`load_checkpoint`). The Rust library
    reads and writes the same format.
    """
    unwrapped = {name: getattr(value, "_layer", value) for name, value in tables.items()}
    _embtable.save_checkpoint(path, unwrapped, metadata=dict(metadata or {}))


__all__ = [
    "Adagrad",
    "Adam",
    "AdamW",
    "Checkpoint",
    "Embedding",
    "ExponentialDecay",
    "Ftrl",
    "Optimizer",
    "Pretrained",
    "RmsProp",
    "RowWiseAdagrad",
    "Sgd",
    "SparseGrad",
    "StepLR",
    "Table",
    "Vocab",
    "__version__",
    "get_num_threads",
    "load_checkpoint",
    "load_npy",
    "load_table_safetensors",
    "read_fasttext_vec",
    "read_glove",
    "read_word2vec",
    "save_checkpoint",
    "save_npy",
    "save_table_safetensors",
    "set_num_threads",
    "write_glove",
    "write_word2vec",
]
