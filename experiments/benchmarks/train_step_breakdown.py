"""Where the time of one Flow-GRPO update goes on XLA:CPU, by part of the model, forward and backward.

Runs the loss + gradient of `train_step_bench.py` (same config, batch and loss) under the JAX
profiler with XLA:CPU's per-thunk trace events, maps every thunk to the `op_name` of its HLO
instruction and sums the thunk times by the model's named scopes (`attention_qkv`,
`attention_core`, `attention_out`, `mlp`, `norm`, `lm_head`; the slicing and stacking of the
layer scan; the rest), split into forward and backward (`transpose(...)` in the op name).
Also prints the compiled program's temporary memory, wall time and page faults per update:
XLA:CPU maps its temporary buffer afresh on every call, so each byte of it costs a page fault.
`--torch-between` runs one transformers forward + backward of the same model and batch before each
timed call, as the interleaved rounds of `train_step_bench.py` do (and counts only our calls).

Thunks of independent ops may run concurrently on the two cores, so the sum can exceed the wall time.

    python experiments/benchmarks/train_step_breakdown.py [--remat] [--torch-between] [--batch 8 ...]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import flax.nnx as nnx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from agentflow_jax.models import config as model_config, qwen2  # noqa: E402
from agentflow_jax.rl import loss as loss_lib  # noqa: E402
from agentflow_jax.rl.batch import pack_turns  # noqa: E402
from common import BENCH_CONFIG, machine_summary  # noqa: E402
from train_step_bench import make_records  # noqa: E402

SCOPES = ("attention_qkv", "attention_core", "attention_out", "mlp", "norm", "lm_head")


def part_of(op_name: str) -> str:
    """The innermost model scope in an HLO op_name, else 'layer scan' or 'other'; + ' bwd' in the backward."""
    # a scope appears as "mlp/..." or, around a custom VJP's rule, as "jvp(mlp)/..."
    found = [(m.start(), scope) for scope in SCOPES for m in re.finditer(rf"(?<![\w]){scope}(?=[/)])", op_name)]
    if found:
        part = max(found)[1]
    elif re.search(r"while/body/.*dynamic_(update_)?(index|slice)", op_name):
        part = "layer scan"
    else:
        part = "other"
    return part + (" bwd" if "transpose(" in op_name else " fwd")


def torch_step(config: model_config.Qwen2Config, input_ids: np.ndarray) -> Callable[[], None]:
    """One transformers forward + backward (mean log-sum-exp of the logits) of the same model and batch."""
    import torch
    import transformers

    from train_step_bench import hf_config

    torch.set_num_threads(os.cpu_count())
    model = transformers.Qwen2ForCausalLM(hf_config(BENCH_CONFIG)).train()
    ids = torch.from_numpy(input_ids.astype(np.int64))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, use_cache=False).logits.logsumexp(-1).mean().backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=384)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--remat", action="store_true", help="recompute each layer in the backward pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-between", action="store_true",
                        help="a transformers forward + backward before each timed call (torch is then needed)")
    args = parser.parse_args()

    config = model_config.Qwen2Config(**BENCH_CONFIG)
    graphdef, params = nnx.split(qwen2.init_random(config, seed=0, remat=args.remat))
    loss_config = loss_lib.LossConfig()
    batch = pack_turns(make_records(args.batch, args.prompt, args.response, config.vocab_size, seed=0), pad_id=0)
    rng = np.random.default_rng(1)
    old = ((np.log(1.0 / config.vocab_size) + rng.normal(0, 0.2, batch.loss_mask.shape)) * batch.loss_mask)
    inputs = loss_lib.make_loss_inputs(batch, rng.normal(0, 1, batch.num_rows).astype(np.float32),
                                       old.astype(np.float32), old.astype(np.float32), loss_config)
    value_and_grad = loss_lib.make_value_and_grad(graphdef, loss_config)
    compiled = value_and_grad.lower(params, inputs).compile()
    op_names = {m.group(1): m.group(2) for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"',
                                                            compiled.as_text(), re.M)}
    memory = compiled.memory_analysis()

    def run() -> None:
        jax.block_until_ready(value_and_grad(params, inputs))

    between = torch_step(config, batch.input_ids) if args.torch_between else (lambda: None)
    run()
    walls, user, system, faults = [], 0.0, 0.0, 0
    for _ in range(args.repeats):
        between()
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run()
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        user, system = user + after.ru_utime - before.ru_utime, system + after.ru_stime - before.ru_stime
        faults += after.ru_minflt - before.ru_minflt

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        run()
        jax.profiler.stop_trace()
        (trace_file,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(trace_file))["traceEvents"]
    totals = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in op_names:
            totals[part_of(op_names[event["name"]])] += event["dur"] / 1e3

    print(f"machine: {machine_summary()}; model {config.num_params / 1e6:.1f}M params, float32, "
          f"remat {args.remat}, torch between calls {args.torch_between}; "
          f"batch {batch.input_ids.shape[0]} x {batch.input_ids.shape[1]} tokens "
          f"({int(batch.loss_mask.sum())} loss tokens)")
    print(f"loss + gradient: wall {np.median(walls) * 1e3:.0f} ms median of {args.repeats}; per call: "
          f"user {user / args.repeats:.2f} s, system {system / args.repeats:.2f} s, "
          f"{faults / args.repeats:,.0f} page faults; compiled temp "
          f"{memory.temp_size_in_bytes / 2**20:,.0f} MiB")
    print(f"thunk time by part (one traced call, {sum(totals.values()):.0f} ms in all):")
    for part in sorted(totals, key=lambda p: -totals[p]):
        print(f"  {part:20s} {totals[part]:8.1f} ms")


if __name__ == "__main__":
    main()
