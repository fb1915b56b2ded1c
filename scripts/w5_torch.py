#!/usr/bin/env python3
"""W5 of WORKLOADS.md with PyTorch's sparse optimizers, to set beside
embtable's `W5-adam` and `W5-adagrad` (the `workloads` example) in the same
run:

    python scripts/w5_torch.py --optimizer sparse_adam --threads 1
    cargo run --release --example workloads -- W5-adam --threads 1

One step of `torch.optim.SparseAdam(lr=0.01)` (`--optimizer sparse_adam`,
the default) or `torch.optim.Adagrad(lr=0.01)` (`--optimizer adagrad`,
WORKLOADS.md's W5 Adagrad: initial accumulator 0, eps 1e-10) on a
1,000,000 x 128 float32 table, with the gradient a `sparse=True`
`nn.Embedding` hands it for a lookup of WORKLOADS.md's 262,144
`uniform(seed=5)` ids and a dense output gradient of `values(50, ...)` in
[-0.01, 0.01): uncoalesced (both optimizers coalesce it, summing duplicate
ids, as embtable does). The gradient is made outside the timed region; the
step (coalesce included) is timed. Prints `W5-<optimizer>-torch
threads=<N> median_ms=<x>` after 3 warm-up steps and 15 timed ones
(median), as the workloads example does.
"""

import argparse
import time

import numpy as np
import torch

ROWS, DIM, BATCH = 1_000_000, 128, 262_144
GAMMA = np.uint64(0x9E3779B97F4A7C15)


def stream(seed, n):
    """SplitMix64 element i of `seed`, for i in 0..n (WORKLOADS.md)."""
    with np.errstate(over="ignore"):
        s = np.uint64(seed) + (np.arange(1, n + 1, dtype=np.uint64) * GAMMA)
        z = (s ^ (s >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(seed, n, rows):
    z = stream(seed, n)
    with np.errstate(over="ignore"):
        return (((z >> np.uint64(32)) * np.uint64(rows)) >> np.uint64(32)).astype(np.int64)


def values(seed, n, low, high):
    u = (stream(seed, n) >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))
    return np.float32(low) + np.float32(high - low) * u


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--optimizer", choices=["sparse_adam", "adagrad"], default="sparse_adam")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ids = uniform(5, BATCH, ROWS)
    assert ids[:5].tolist() == [386768, 752307, 232709, 99339, 187960], "WORKLOADS.md checksum"
    assert int(ids.sum()) == 131171209585, "WORKLOADS.md checksum"
    grad_out = torch.from_numpy(values(50, BATCH * DIM, -0.01, 0.01).reshape(BATCH, DIM))
    table = torch.nn.Parameter(
        torch.from_numpy(values(51, ROWS * DIM, -0.05, 0.05).reshape(ROWS, DIM))
    )
    if args.optimizer == "sparse_adam":
        opt = torch.optim.SparseAdam([table], lr=0.01)
        name = "W5-adam-torch"
    else:
        opt = torch.optim.Adagrad([table], lr=0.01, eps=1e-10)
        name = "W5-adagrad-torch"
    grad = torch.sparse_coo_tensor(torch.from_numpy(ids)[None, :], grad_out, (ROWS, DIM))

    def step():
        table.grad = grad
        opt.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    print(f"{name} threads={args.threads} median_ms={times[len(times) // 2]:.2f}")


if __name__ == "__main__":
    main()
