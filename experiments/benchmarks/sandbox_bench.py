"""Overhead of the Python sandbox on a trivial snippet (print(1)): one call at a time and 16 at once.

Baselines measured in the same run, interleaved with the sandbox:
  bare      `python -I -c "print(1)"` in a subprocess: no isolation at all, the floor of any runner
            that starts an interpreter per call;
  two_pythons  the bare call plus `python -I -S` importing what the bootstrap imports: the floor of
            this design (a bootstrap interpreter + the code's interpreter), without any layer.
The sandbox runs with require="full" (every layer). Every process starts in a session of its own,
as the sandbox's bootstrap does: with autogroup scheduling (sched_autogroup_enabled=1) a session
is also a CPU share of its own, which matters when other jobs load the machine. Prints medians per
call and the ratio to the bare baseline, and the load average before and after.

    python experiments/benchmarks/sandbox_bench.py [--rounds 5 --calls 10 --concurrency 16]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

from agentflow_jax.tools import sandbox

_BOOT_IMPORTS = "import ctypes, json, os, resource, select, signal, stat, sys, time"


def bare() -> None:
    done = subprocess.run([sys.executable, "-I", "-c", "print(1)"], capture_output=True, start_new_session=True)
    assert done.stdout == b"1\n"


def two_pythons() -> None:
    subprocess.run([sys.executable, "-I", "-S", "-c", _BOOT_IMPORTS], check=True, start_new_session=True)
    bare()


def sandboxed() -> None:
    result = sandbox.run_python("print(1)")
    assert result.stdout == "1\n" and result.isolation == sandbox.LAYERS, result


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="sequential calls per round and mode")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    print(f"machine: {os.cpu_count()} CPU cores, {platform.machine()}, kernel {platform.release()}, "
          f"Python {platform.python_version()}, uid {os.geteuid()}")
    print("load average before:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(sandbox.check_isolation("full")["summary"])
    modes = {"bare": bare, "two_pythons": two_pythons, "sandbox": sandboxed}
    sequential = {name: [] for name in modes}
    latency = {name: [] for name in modes}
    per_call = {name: [] for name in modes}
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        for fn in modes.values():  # warm-up: caches, probe, page cache
            fn()
            list(pool.map(lambda _: fn(), range(args.concurrency)))
        for _ in range(args.rounds):
            for name, fn in modes.items():
                sequential[name] += [timed(fn) for _ in range(args.calls)]
                start = time.perf_counter()
                latency[name] += list(pool.map(lambda _: timed(fn), range(args.concurrency)))
                per_call[name].append((time.perf_counter() - start) / args.concurrency)
    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    print(f"\nmedians over {args.rounds} rounds ({args.calls} sequential calls and {args.concurrency} "
          "concurrent calls per round and mode):")
    print(f"{'mode':12} {'one call (ms)':>14} {f'{args.concurrency} at once: latency':>26} "
          f"{'wall/call (ms)':>15}  ratio to bare (one / latency / wall)")
    for name in modes:
        ratios = [ms(d[name]) / ms(d["bare"]) for d in (sequential, latency, per_call)]
        print(f"{name:12} {ms(sequential[name]):14.1f} {ms(latency[name]):26.1f} {ms(per_call[name]):15.1f}  "
              + " / ".join(f"{r:.2f}x" for r in ratios))
    print("load average after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
