"""A two-tower recommender in PyTorch with embtable's tables, on generated data.

    python python/examples/recommender.py [--epochs 4] [--threads 2] [--seed 0]

The data: 6,000 users and 8,000 items with Zipf popularity and 25 planted
topics; each user likes one or two topics and mostly picks popular items
of them. Every user's last pick is held out for the test.

The model: a user is the mean of the embeddings of their last 20 items
(``embtable.torch.EmbeddingBag``, mode "mean") plus a user-id embedding,
passed through a small MLP; an item is its own embedding
(``embtable.torch.Embedding``). The score is their dot product, trained
with an in-batch softmax (corrected for popularity). The tables are
trained by embtable's Adagrad inside the backward pass, the MLP by
``torch.optim.Adam`` in the same loop.

It prints a progress bar per epoch, then recall@10 and NDCG@10 of the held
out picks beside the most-popular baseline (recommend the most popular
items the user has not picked).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from torch import nn

import embtable
import embtable.torch as et

HISTORY = 20


def generate(seed: int, users: int = 6000, items: int = 8000, topics: int = 25, picks: int = 30):
    """Users' picks in order: (users, picks) item ids, and item popularity."""
    rng = np.random.default_rng(seed)
    topic_of = rng.integers(0, topics, size=items)
    popularity = 1.0 / np.arange(1, items + 1) ** 1.05
    popularity = popularity[rng.permutation(items)]
    members = [np.flatnonzero(topic_of == t) for t in range(topics)]
    seqs = np.empty((users, picks), dtype=np.int64)
    for u in range(users):
        liked = rng.choice(topics, size=rng.integers(1, 3), replace=False)
        pool = np.concatenate([members[t] for t in liked])
        p_topic = popularity[pool] / popularity[pool].sum()
        from_topic = rng.random(picks) < 0.85
        seqs[u] = np.where(
            from_topic,
            rng.choice(pool, size=picks, p=p_topic),
            rng.choice(items, size=picks, p=popularity / popularity.sum()),
        )
    return seqs, items


class Progress:
    """A one-line progress bar: done/total, rate, loss."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.start = total, label, time.perf_counter()

    def update(self, done: int, loss: float) -> None:
        width = 30
        filled = int(width * done / self.total)
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        print(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
              f"{rate:,.0f} batches/s loss {loss:.3f}", end="", flush=True)

    def close(self) -> None:
        print(flush=True)


class TwoTower(nn.Module):
    def __init__(self, users: int, items: int, dim: int, lr: float):
        super().__init__()
        adagrad = embtable.Adagrad.torch(lr=lr)
        self.history = et.EmbeddingBag(items, dim, mode="mean", optimizer=adagrad)
        self.user = et.Embedding(users, dim, optimizer=adagrad)
        self.item = et.Embedding(items, dim, optimizer=adagrad)
        with torch.no_grad():  # small starting vectors
            for table in (self.history, self.user, self.item):
                table.weight.mul_(0.1)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def users(self, user_ids: torch.Tensor, history: torch.Tensor, offsets: torch.Tensor):
        pooled = self.history(history, offsets) + self.user(user_ids)
        return pooled + self.mlp(pooled)


def examples(seqs: np.ndarray):
    """(user, position) of every training target: picks 1..n-2 (the last is the test)."""
    users, picks = seqs.shape
    u, t = np.meshgrid(np.arange(users), np.arange(1, picks - 1), indexing="ij")
    return u.reshape(-1), t.reshape(-1)


def histories(seqs: np.ndarray, users: np.ndarray, ends: np.ndarray):
    """The last HISTORY picks before each end, as ids + offsets."""
    starts = np.maximum(ends - HISTORY, 0)
    lengths = ends - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    # Position k of the batch's ids is pick (k - offset + start) of its user.
    cols = np.arange(lengths.sum()) - np.repeat(offsets - starts, lengths)
    ids = seqs[np.repeat(users, lengths), cols]
    return torch.from_numpy(ids), torch.from_numpy(offsets)


def evaluate(model: TwoTower, seqs: np.ndarray, popularity: np.ndarray, k: int = 10):
    users = np.arange(seqs.shape[0])
    last = seqs.shape[1] - 1
    target = seqs[:, last]
    with torch.no_grad():
        ids, offsets = histories(seqs, users, np.full(users.size, last))
        u = model.users(torch.from_numpy(users), ids, offsets)
        scores = (u @ model.item.weight.T).numpy()
    seen = seqs[:, :last]
    rows = np.repeat(users, seen.shape[1])
    scores[rows, seen.reshape(-1)] = -np.inf
    pop = np.broadcast_to(popularity, scores.shape).copy()
    pop[rows, seen.reshape(-1)] = -np.inf

    def metrics(s):
        top = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), axis=1), 1)
        hit = order == target[:, None]
        recall = hit.any(axis=1).mean()
        ndcg = (hit / np.log2(np.arange(2, k + 2))).sum(axis=1).mean()
        return recall, ndcg

    return metrics(scores), metrics(pop)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--dim", type=int, default=48)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    # The dense part is tiny: one torch thread leaves the cores to the tables
    # (and keeps torch's spinning threads out of embtable's way).
    torch.set_num_threads(1)
    embtable.set_num_threads(args.threads)
    seqs, n_items = generate(args.seed)
    counts = np.bincount(seqs[:, :-1].reshape(-1), minlength=n_items).astype(np.float64)
    popularity = counts / counts.sum()
    log_q = torch.from_numpy(np.log(popularity + 1e-9).astype(np.float32))
    model = TwoTower(seqs.shape[0], n_items, args.dim, args.lr)
    mlp_opt = torch.optim.Adam(model.mlp.parameters(), lr=1e-3)
    users, ends = examples(seqs)
    rng = np.random.default_rng(args.seed)
    steps = math.ceil(users.size / args.batch)
    print(f"{seqs.shape[0]:,} users, {n_items:,} items, {users.size:,} training picks; "
          f"embtable {embtable.__version__}, {args.threads} threads")
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(users.size)
        bar = Progress(steps, f"epoch {epoch}/{args.epochs}")
        for step in range(steps):
            batch = order[step * args.batch:(step + 1) * args.batch]
            u, e = users[batch], ends[batch]
            ids, offsets = histories(seqs, u, e)
            targets = torch.from_numpy(seqs[u, e])
            logits = model.users(torch.from_numpy(u), ids, offsets) @ model.item(targets).T
            logits = logits - log_q[targets]  # in-batch negatives come by popularity
            loss = nn.functional.cross_entropy(logits, torch.arange(len(batch)))
            mlp_opt.zero_grad()
            loss.backward()  # the three tables are updated here
            mlp_opt.step()
            if step % 20 == 0 or step == steps - 1:
                bar.update(step + 1, loss.item())
        bar.close()
    (recall, ndcg), (pop_recall, pop_ndcg) = evaluate(model, seqs, popularity)
    print(f"recall@10 {recall:.3f} (most popular {pop_recall:.3f}, "
          f"{recall / pop_recall:.1f}x); NDCG@10 {ndcg:.3f} (most popular {pop_ndcg:.3f})")
    return 0 if recall > pop_recall else 1


if __name__ == "__main__":
    sys.exit(main())
