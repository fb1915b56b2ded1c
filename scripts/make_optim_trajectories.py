#!/usr/bin/env python3
"""Writes tests/fixtures/optim_trajectories.txt: the weights Keras 3 and
PyTorch compute, step by step, for small embedding tables trained with
their own optimizers, for tests/trajectories.rs to compare embtable's
`::keras()` / `::torch()` / `::torch_sparse()` presets with.

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch keras numpy
    KERAS_BACKEND=torch /tmp/tv/bin/python scripts/make_optim_trajectories.py

(written with torch 2.15.0 and keras 3.15.1 on the torch backend.)

Every case trains a 6 x 5 float32 table for 20 steps (a zero table, and
positive gradients, for the cases named `*_from_zero`). Step t looks up a
batch of ids (duplicates included; rows 4 and 5 are looked up rarely, so
dense and lazy optimizers differ on them) with an output gradient drawn
from a seeded generator. The framework gets the summed gradient of the
lookup, summed in batch order in float32 as embtable sums it: a dense
tensor (Keras, and PyTorch's dense optimizers, as a dense `nn.Embedding`
hands them), or a coalesced sparse one (PyTorch's `sparse=True`).

Format, one record per line, floats as the hex of their float32 bits:

    case <name> <embtable config: kind field=value ...>
    table <rows> <dim> <values...>
    step <ids...> ; <grad_out values...>
    weights <values...>          (after the step; one per step)
    end
"""

import os
import struct
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "optim_trajectories.txt"
ROWS, DIM, STEPS = 6, 5, 20


def hexes(values):
    return " ".join(
        f"{struct.unpack('<I', struct.pack('<f', float(v)))[0]:08x}"
        for v in np.asarray(values, dtype=np.float32).ravel()
    )


def batches(seed):
    rng = np.random.RandomState(seed)
    # Cases whose name says "from_zero" get positive gradients only.
    low = 0.5 if CASES[seed - 1][0].endswith("from_zero") else -1.0
    out = []
    for t in range(STEPS):
        n = rng.randint(1, 7)
        # Rows 0..3 often, 4 and 5 now and then.
        pool = 6 if t % 7 == 3 else 4
        ids = rng.randint(0, pool, size=n)
        grad_out = rng.uniform(low, 1.0, size=(n, DIM)).astype(np.float32)
        out.append((ids, grad_out))
    return out


def summed(ids, grad_out):
    """The lookup's gradient: rows summed in batch order, in float32."""
    dense = np.zeros((ROWS, DIM), dtype=np.float32)
    for j, r in enumerate(ids):
        dense[r] = dense[r] + grad_out[j]
    return dense


def table(seed):
    if CASES[seed - 1][0].endswith("from_zero"):
        return np.zeros((ROWS, DIM), dtype=np.float32)
    return np.random.RandomState(seed).uniform(-1.0, 1.0, size=(ROWS, DIM)).astype(np.float32)


def keras_run(make, seed):
    var = keras.Variable(table(seed))
    opt = make()
    weights = []
    for ids, grad_out in batches(seed):
        g = torch.from_numpy(summed(ids, grad_out))
        opt.apply_gradients([(g, var)])
        weights.append(keras.ops.convert_to_numpy(var).copy())
    return weights


def torch_run(make, seed, sparse, scheduler=None):
    param = torch.nn.Parameter(torch.from_numpy(table(seed).copy()))
    opt = make([param])
    sched = scheduler(opt) if scheduler else None
    weights = []
    for ids, grad_out in batches(seed):
        dense = summed(ids, grad_out)
        if sparse:
            rows = sorted(set(int(r) for r in ids))
            param.grad = torch.sparse_coo_tensor(
                torch.tensor([rows]), torch.from_numpy(dense[rows]), (ROWS, DIM)
            ).coalesce()
        else:
            param.grad = torch.from_numpy(dense)
        opt.step()
        if sched:
            sched.step()
        weights.append(param.detach().numpy().copy())
    return weights


K = keras.optimizers
O = torch.optim

# (name, embtable config, run)
CASES = [
    ("keras_sgd", "sgd preset=keras lr=0.05 momentum=0.9 nesterov=1 weight_decay=0.01",
     lambda s: keras_run(lambda: K.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=0.01), s)),
    ("keras_rmsprop_momentum", "rmsprop preset=keras lr=0.01 momentum=0.9",
     lambda s: keras_run(lambda: K.RMSprop(0.01, momentum=0.9), s)),
    ("keras_rmsprop_centered", "rmsprop preset=keras lr=0.01 centered=1",
     lambda s: keras_run(lambda: K.RMSprop(0.01, centered=True), s)),
    ("keras_adagrad", "adagrad preset=keras lr=0.05",
     lambda s: keras_run(lambda: K.Adagrad(0.05), s)),
    ("keras_adam", "adam preset=keras lr=0.01",
     lambda s: keras_run(lambda: K.Adam(0.01), s)),
    ("keras_adam_amsgrad_decay", "adam preset=keras lr=0.01 amsgrad=1 weight_decay=0.05",
     lambda s: keras_run(lambda: K.Adam(0.01, amsgrad=True, weight_decay=0.05), s)),
    # Weights that are nothing but Adam's updates (a zero table, gradients of
    # one sign): small weights, where computing the bias corrections'
    # powers in float64 instead of Keras' float32 shows.
    ("keras_adam_from_zero", "adam preset=keras lr=0.001 floor=1e-6 tol=2e-6",
     lambda s: keras_run(lambda: K.Adam(0.001), s)),
    ("keras_adam_schedule", "adam preset=keras lr=0.02 schedule=exponential:0.02:5:0.5",
     lambda s: keras_run(lambda: K.Adam(K.schedules.ExponentialDecay(0.02, 5, 0.5)), s)),
    ("keras_adamw", "adamw preset=keras lr=0.01",
     lambda s: keras_run(lambda: K.AdamW(0.01), s)),
    ("keras_ftrl", "ftrl preset=keras lr=0.1 l1_regularization_strength=0.01 "
     "l2_regularization_strength=0.02 l2_shrinkage_regularization_strength=0.03 beta=0.5",
     lambda s: keras_run(lambda: K.Ftrl(0.1, l1_regularization_strength=0.01,
                                          l2_regularization_strength=0.02,
                                          l2_shrinkage_regularization_strength=0.03,
                                          beta=0.5), s)),
    ("keras_ftrl_power", "ftrl preset=keras lr=0.1 learning_rate_power=-0.3",
     lambda s: keras_run(lambda: K.Ftrl(0.1, learning_rate_power=-0.3), s)),
    ("torch_sgd_sparse_momentum", "sgd preset=torch lr=0.1 momentum=0.9",
     lambda s: torch_run(lambda p: O.SGD(p, lr=0.1, momentum=0.9), s, sparse=True)),
    ("torch_sgd_nesterov_decay", "sgd preset=torch lr=0.1 momentum=0.9 nesterov=1 weight_decay=0.01",
     lambda s: torch_run(lambda p: O.SGD(p, lr=0.1, momentum=0.9, nesterov=True,
                                         weight_decay=0.01), s, sparse=False)),
    ("torch_sgd_steplr", "sgd preset=torch lr=0.1 schedule=steplr:0.1:5:0.5",
     lambda s: torch_run(lambda p: O.SGD(p, lr=0.1), s, sparse=False,
                         scheduler=lambda o: O.lr_scheduler.StepLR(o, 5, 0.5))),
    ("torch_rmsprop", "rmsprop preset=torch lr=0.01 weight_decay=0.01",
     lambda s: torch_run(lambda p: O.RMSprop(p, lr=0.01, weight_decay=0.01), s, sparse=False)),
    ("torch_adagrad_sparse", "adagrad preset=torch lr=0.1 lr_decay=0.1",
     lambda s: torch_run(lambda p: O.Adagrad(p, lr=0.1, lr_decay=0.1), s, sparse=True)),
    ("torch_adagrad_decay", "adagrad preset=torch lr=0.1 lr_decay=0.05 weight_decay=0.02",
     lambda s: torch_run(lambda p: O.Adagrad(p, lr=0.1, lr_decay=0.05, weight_decay=0.02), s,
                         sparse=False)),
    ("torch_adam", "adam preset=torch lr=0.01",
     lambda s: torch_run(lambda p: O.Adam(p, lr=0.01), s, sparse=False)),
    ("torch_adam_amsgrad_decay", "adam preset=torch lr=0.01 amsgrad=1 weight_decay=0.05",
     lambda s: torch_run(lambda p: O.Adam(p, lr=0.01, amsgrad=True, weight_decay=0.05), s,
                         sparse=False)),
    ("torch_sparse_adam", "adam preset=torch_sparse lr=0.01",
     lambda s: torch_run(lambda p: O.SparseAdam(p, lr=0.01), s, sparse=True)),
    ("torch_adamw", "adamw preset=torch lr=0.01",
     lambda s: torch_run(lambda p: O.AdamW(p, lr=0.01), s, sparse=False)),
]


def main():
    lines = [
        "# Written by scripts/make_optim_trajectories.py "
        f"(torch {torch.__version__}, keras {keras.__version__}, backend {keras.backend.backend()})"
    ]
    for seed, (name, config, run) in enumerate(CASES, start=1):
        weights = run(seed)
        lines.append(f"case {name} {config}")
        lines.append(f"table {ROWS} {DIM} {hexes(table(seed))}")
        for (ids, grad_out), w in zip(batches(seed), weights):
            lines.append(f"step {' '.join(str(int(r)) for r in ids)} ; {hexes(grad_out)}")
            lines.append(f"weights {hexes(w)}")
        lines.append("end")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(CASES)} cases to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
