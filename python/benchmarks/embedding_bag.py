"""One training step of an embedding-bag model, torch against embtable, in
one Python process.

    python python/benchmarks/embedding_bag.py [--rounds 5] [--workloads W4 W5] [--threads 1 2]

torch: ``nn.EmbeddingBag(sparse=True)`` + ``torch.optim.Adagrad`` (lr 0.01,
eps 1e-10). embtable: ``embtable.torch.EmbeddingBag`` with
``embtable.Adagrad.torch(lr=0.01, epsilon=1e-10)``, the update fused into
the backward pass. Both start from the same 1,000,000 x 128 table.

Workloads (WORKLOADS.md's sizes and index generators, reproduced here):

- W4: 16,384 bags of 32 ids (2-D input), uniform(seed=4), mode "sum".
- W5: 262,144 ids, uniform(seed=5), one id per bag (2-D input of width 1,
  mode "sum"): W5's lookup and its Adagrad step, through the bag module.

Each step is timed in two parts: forward (``out = bag(ids)``) and backward
plus update (torch: ``zero_grad``, ``out.backward(g)``, ``opt.step()``;
embtable: ``out.backward(g)``, which updates the table). ``g`` is a fixed
gradient, uniform in [-0.01, 0.01). The systems alternate in rounds (a
warm-up step each, then ``--repeats`` timed steps per round), at 1 and 2
threads (``torch.set_num_threads`` and ``embtable.set_num_threads``), and
the medians over all rounds are reported, with the forward's CPU time
(the process's user + system time over the call, all threads: under load
it moves less than wall time; torch's OpenMP threads may spin and add to
theirs). The Python boundary is the part
of embtable's step spent outside its native calls (``_embtable``'s own
clock around every call that releases the GIL), as a share of the step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

import embtable
import embtable.torch as et
from embtable import _embtable

ROWS, DIM = 1_000_000, 128
LR, EPS = 0.01, 1e-10


def splitmix(seed: int, n: int) -> np.ndarray:
    """WORKLOADS.md's SplitMix64 stream, elements 0..n-1 (uint64, wrapping)."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        s = np.uint64(seed) + i * np.uint64(0x9E3779B97F4A7C15)
        z = (s ^ (s >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(seed: int, n: int, rows: int) -> np.ndarray:
    z = splitmix(seed, n)
    with np.errstate(over="ignore"):
        return (((z >> np.uint64(32)) * np.uint64(rows)) >> np.uint64(32)).astype(np.int64)


WORKLOADS = {
    # name: (seed, bags, ids per bag, checksum of the indices)
    "W4": (4, 16_384, 32, 262_097_025_798),
    "W5": (5, 262_144, 1, 131_171_209_585),
}


def make_inputs(name: str):
    seed, bags, per_bag, checksum = WORKLOADS[name]
    ids = uniform(seed, bags * per_bag, ROWS)
    assert int(ids.sum()) == checksum, f"{name}: index generator does not match WORKLOADS.md"
    grad = np.random.default_rng(0).uniform(-0.01, 0.01, (bags, DIM)).astype(np.float32)
    return torch.from_numpy(ids.reshape(bags, per_bag)), torch.from_numpy(grad)


class TorchStep:
    name = "torch"

    def __init__(self, weight: torch.Tensor):
        self.bag = nn.EmbeddingBag.from_pretrained(weight.clone(), freeze=False, mode="sum",
                                                   sparse=True)
        self.opt = torch.optim.Adagrad(self.bag.parameters(), lr=LR, eps=EPS)

    def forward(self, ids):
        return self.bag(ids)

    def backward(self, out, grad):
        self.opt.zero_grad(set_to_none=True)
        out.backward(grad)
        self.opt.step()


class EmbtableStep:
    name = "embtable"

    def __init__(self, weight: torch.Tensor):
        self.bag = et.EmbeddingBag.from_pretrained(
            weight, freeze=False, mode="sum", optimizer=embtable.Adagrad.torch(lr=LR, epsilon=EPS)
        )

    def forward(self, ids):
        return self.bag(ids)

    def backward(self, out, grad):
        out.backward(grad)


def timed(fn, *args):
    native = _embtable.native_seconds()
    cpu = time.process_time()
    start = time.perf_counter()
    result = fn(*args)
    wall = time.perf_counter() - start
    return result, wall, _embtable.native_seconds() - native, time.process_time() - cpu


def run(name: str, threads: int, rounds: int, repeats: int, weight: torch.Tensor):
    torch.set_num_threads(threads)
    embtable.set_num_threads(threads)
    ids, grad = make_inputs(name)
    systems = [TorchStep(weight), EmbtableStep(weight)]
    times = {s.name: {"forward": [], "backward": [], "native": [], "step": [], "forward_cpu": []}
             for s in systems}
    for s in systems:  # warm-up: first-touch of the state, caches
        s.backward(s.forward(ids), grad)
    for _ in range(rounds):
        for s in systems:
            for _ in range(repeats):
                out, fwd, nat_f, cpu_f = timed(s.forward, ids)
                _, bwd, nat_b, _ = timed(s.backward, out, grad)
                t = times[s.name]
                t["forward"].append(fwd)
                t["forward_cpu"].append(cpu_f)
                t["backward"].append(bwd)
                t["step"].append(fwd + bwd)
                t["native"].append(nat_f + nat_b)
    med = {k: {m: statistics.median(v) for m, v in d.items() if v} for k, d in times.items()}
    steps = times["embtable"]["step"]
    boundary = statistics.median(
        (w - n) / w for w, n in zip(steps, times["embtable"]["native"])
    )
    return med, boundary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["W4", "W5"], choices=sorted(WORKLOADS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    weight = torch.from_numpy(
        np.random.default_rng(1).uniform(-0.05, 0.05, (ROWS, DIM)).astype(np.float32)
    )
    print(f"torch {torch.__version__}, embtable {embtable.__version__}, "
          f"{args.rounds} rounds x {args.repeats} steps, medians in ms")
    print("| workload | threads | torch fwd | embtable fwd | fwd speedup | fwd CPU torch / embtable "
          "| torch bwd+upd | embtable bwd+upd | bwd+upd speedup | Python boundary |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.workloads:
        for threads in args.threads:
            med, boundary = run(name, threads, args.rounds, args.repeats, weight)
            t, e = med["torch"], med["embtable"]
            print(
                f"| {name} | {threads} | {t['forward'] * 1e3:.1f} | {e['forward'] * 1e3:.1f} "
                f"| {t['forward'] / e['forward']:.2f}x "
                f"| {t['forward_cpu'] * 1e3:.1f} / {e['forward_cpu'] * 1e3:.1f} "
                f"({t['forward_cpu'] / e['forward_cpu']:.2f}x) | {t['backward'] * 1e3:.1f} "
                f"| {e['backward'] * 1e3:.1f} | {t['backward'] / e['backward']:.1f}x "
                f"| {boundary * 100:.1f} % |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
