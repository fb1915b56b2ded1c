"""Shared helpers: the dense one-hot formulation every result is compared with."""

import os

# Keras picks its backend at import; the Keras tests need torch's.
os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest


def onehot(ids, rows):
    """The one-hot matrix of a flat batch of ids: (len(ids), rows), float64."""
    ids = np.asarray(ids).reshape(-1)
    m = np.zeros((ids.size, rows))
    m[np.arange(ids.size), ids] = 1.0
    return m


def bag_matrix(offsets, n, weights=None, mode="sum"):
    """B with B[b, j] the coefficient of id j in bag b (CSR offsets with the
    total), so that pooled = B @ onehot(ids) @ W for every mode but max."""
    weights = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    b = np.zeros((len(offsets) - 1, n))
    for bag, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        w = weights[start:end]
        d = {"sum": 1.0, "mean": w.sum(), "sqrtn": np.sqrt((w * w).sum())}[mode]
        if d != 0:
            b[bag, start:end] = w / d
    return b


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped test fails: every test must run (CI installs everything)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped, which this suite does not allow: {report.longrepr}"
