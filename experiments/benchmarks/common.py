"""Shared helpers of the benchmark scripts: timing and the reference benchmark model config.

Every ratio the CPU benchmarks print comes from `interleaved_seconds` (the variants take turns, round
after round, so load from other processes falls on all of them alike) and its medians, with the
load average printed before and after.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

# The ~40M-parameter Qwen2 config the issues name for throughput comparisons.
BENCH_CONFIG = dict(vocab_size=32_000, hidden_size=512, intermediate_size=1_408, num_layers=8, num_heads=8,
                    num_kv_heads=2, tie_word_embeddings=True)


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


def load_average() -> str:
    """The 1 / 5 / 15-minute load averages, e.g. "0.52/0.71/0.80" (other processes share these cores)."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """Median of each variant's times (from `interleaved_seconds`)."""
    return {key: statistics.median(values) for key, values in times.items()}


def machine_summary() -> str:
    import jax

    return f"{os.cpu_count()} CPU cores, jax {jax.__version__} on {jax.devices()[0].platform}"
