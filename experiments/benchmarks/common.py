"""Shared helpers of the benchmark scripts: timing and the reference benchmark model config."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

# The ~40M-parameter Qwen2 config the issues name for throughput comparisons.
BENCH_CONFIG = dict(vocab_size=32_000, hidden_size=512, intermediate_size=1_408, num_layers=8, num_heads=8,
                    num_kv_heads=2, tie_word_embeddings=True)


def median_seconds(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() over `repeats` runs after `warmup` runs (fn must block until done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each fn() (which must block until done) over `repeats` rounds, after one untimed call."""
    for fn in fns.values():
        fn()
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


def machine_summary() -> str:
    import jax

    return f"{os.cpu_count()} CPU cores, jax {jax.__version__} on {jax.devices()[0].platform}"
