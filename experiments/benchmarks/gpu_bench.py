"""Rollouts and updates on one GPU: ours against transformers + torch in the same process.

    python experiments/benchmarks/gpu_bench.py [--out gpu_bench.json]     # the tables, < 6 minutes
    python experiments/benchmarks/gpu_bench.py --compare --profile 1,64   # also every kernel variant
    python experiments/benchmarks/gpu_bench.py --smoke                    # tiny shapes (runs on CPU)

bf16 weights and compute, random weights (N(0, 0.02), the same in both systems: transformers'
Qwen2ForCausalLM gets ours through DLPack). Imports only the model, sampling and loss modules of
agentflow_jax (no trainer, data or agent code), so it runs on an image with JAX, Flax, PyTorch and
transformers. Jobs run in the order of --plan (default: DEFAULT_PLAN); a job that would not finish
within --budget-s is skipped and reported, and one that fails is reported while the rest go on.

- ceilings: bf16 matmul (8192^3, jnp.dot and torch.mm) and device copy bandwidth (2 GiB, read +
  write bytes, jnp and torch); the larger of each pair is the ceiling.
- decode:MODEL:BATCHES: greedy, random prompts of --prompt tokens, --new-tokens new. Ours: ms per
  step = `Sampler.decode` wall time over its forward steps (median of --repeats after a compiling
  call); tok/s = batch / step time. transformers: `generate` with SDPA, step time from the
  difference of 1 + --hf-steps and 1 new tokens; token agreement = the share of the first
  1 + --hf-steps greedy tokens equal in both. The floor is the bytes a step must read (every
  weight once, except an untied embedding table; the KV slots each row uses, averaged over the
  steps) at the measured copy bandwidth; "of floor" = floor / ours.
- rollout: a batch shaped like an agent's planner calls: 8 prompts x n = 8 samples, prompts of
  128..1536 tokens (left padding), room for 2048 new tokens of which --new-tokens are decoded,
  temperature 0.7, top-p 0.99, frequency penalty 1.2 (the reference's rollout settings). Its floor
  counts only the KV slots rows use, so a decode that reads the whole padded cache shows it.
- prefill:MODEL: B x T prompts (--prefill-shapes) through `Sampler.prefill` vs transformers'
  forward (LM head on the last position); MFU = matmul FLOPs / time / the matmul ceiling.
- update: the Flow-GRPO loss + gradient (`loss.make_value_and_grad`: k3 KL, dual clip, token
  mean) of the 1.5B model, --update-rows x --update-length tokens with --update-loss-tokens
  response tokens per row, with and without remat, against torch + transformers (SDPA) with the
  LM head on loss tokens only (`flow_grpo_update`); interleaved rounds, medians; MFU as in
  `flow_grpo_update.update_flops`.
- rules (with --compare): the sampling rule over the full vocabulary per step.

--compare adds the kernel variants of `models.kernels` to the tables ("scan": the portable path;
"unrolled-masked": the unrolled decode with XLA attention over the whole cache; "tiled": the
portable training attention; "chunk1024": LM-head chunks of 1024 positions instead of 256); a
job's last field names the variants it runs ('+'-separated, or none). --profile 1,64 traces a
few decode steps at those batches (jax.profiler) and sums GPU kernel time by kind. Results go to
--out as JSON, rewritten as they come; the tables are printed as measured and again at the end.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the device

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable  # noqa: E402

import flax  # noqa: E402
import flax.nnx as nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from agentflow_jax.models import config as model_config, hf_io, kernels as kernels_lib, qwen2  # noqa: E402
from agentflow_jax.rl import loss as loss_lib  # noqa: E402
from agentflow_jax.sampling import Sampler, rules  # noqa: E402
from flow_grpo_update import make_loss_inputs, torch_policy_loss, update_flops  # noqa: E402

BF16 = jnp.bfloat16
SMOKE_CONFIG = model_config.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                                        num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
MODELS = {"1.5B": "qwen2.5-1.5b", "7B": "qwen2.5-7b"}
# The tables first (decode at the batches it names, the update), then the rest of the batch
# range, prefill and the rollout shape; what the time budget does not reach is reported as skipped.
DEFAULT_PLAN = ("ceilings;decode:1.5B:1,64,256;decode:7B:64;update;prefill:1.5B;decode:7B:1,256;rollout;"
                "decode:1.5B:16;prefill:7B;rules")
SMOKE_PLAN = "ceilings;decode:1.5B:1,4;rollout;update;prefill:1.5B;rules"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_bench.json")
    parser.add_argument("--label", default="", help="a name for this run, kept in the JSON")
    parser.add_argument("--plan", default=None,
                        help="jobs in order, ';'-separated: ceilings, decode:MODEL:BATCHES[:VARIANTS], "
                             "rollout[:VARIANTS], update[:VARIANTS], prefill:MODEL[:VARIANTS], rules (MODEL 1.5B or "
                             "7B; rollout and update use 1.5B). VARIANTS: '+'-separated names of --compare's "
                             f"variants besides ours, or none; default all). Default: {DEFAULT_PLAN}")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--hf-steps", type=int, default=24, help="decode steps timed in transformers")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prefill-shapes", default="16x512,4x2048", help="BxT prompt batches")
    parser.add_argument("--update-rows", type=int, default=8)
    parser.add_argument("--update-length", type=int, default=2048)
    parser.add_argument("--update-loss-tokens", type=int, default=512)
    parser.add_argument("--update-repeats", type=int, default=3)
    parser.add_argument("--hf-batches", default="all", help="decode batches also timed in transformers")
    parser.add_argument("--compare", action="store_true", help="also time every kernel variant")
    parser.add_argument("--profile", default="", help="decode batches (e.g. 1,64) to trace and sum kernel time by kind")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="seconds after start-up; jobs that would not finish in time are skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny model and shapes (checks the script on CPU)")
    args = parser.parse_args()
    if args.plan is None:
        args.plan = SMOKE_PLAN if args.smoke else DEFAULT_PLAN
    if args.smoke:
        args.prompt, args.new_tokens, args.hf_steps, args.repeats = 24, 12, 4, 1
        args.prefill_shapes, args.update_rows, args.update_length, args.update_loss_tokens = "2x32", 2, 64, 16
        args.update_repeats = 2
    return args


# ----------------------------------------------------------------------------------------------
# Timing, budget, results
# ----------------------------------------------------------------------------------------------


class Budget:
    """Wall-clock budget of the whole script; sections ask before starting work."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, seconds: float) -> bool:
        return self.elapsed() + seconds <= self.seconds


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of fn(), which must block until its device work is done."""
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return time.perf_counter() - start, result


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def guarded(report: "Report", section: str, run: Callable[[], Any]) -> None:
    """Runs one section; an exception is reported (and kept in the JSON) and the script goes on."""
    try:
        run()
    except Exception as error:  # noqa: BLE001 - one failing section must not lose the others' figures
        report.data.setdefault("errors", []).append({"section": section, "error": traceback.format_exc()})
        report.line(f"  {section} FAILED: {type(error).__name__}: {str(error)[:400]}")


class Report:
    """Rows of the printed tables, kept for the JSON file (rewritten after every line, so a run cut
    short keeps what it measured) and the final summary."""

    def __init__(self, args: argparse.Namespace):
        self.path = args.out
        self.data: dict[str, Any] = {"args": vars(args), "skipped": [], "summary": []}
        self.lines: list[str] = self.data["summary"]

    def line(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)
        self.save()

    def save(self) -> None:
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1, default=str)

    def skip(self, what: str) -> None:
        self.data["skipped"].append(what)
        self.line(f"  skipped (time budget): {what}")

    def add(self, section: str, row: dict) -> None:
        self.data.setdefault(section, []).append(row)


# ----------------------------------------------------------------------------------------------
# Models: ours and transformers' with the same weights
# ----------------------------------------------------------------------------------------------


def torch_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def to_torch(x: jax.Array) -> torch.Tensor:
    try:
        return torch.from_dlpack(x)
    except (TypeError, RuntimeError, BufferError):  # a platform pair without DLPack exchange
        return torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16)


def transformers_twin(model: qwen2.Qwen2ForCausalLM) -> transformers.Qwen2ForCausalLM:
    """transformers' Qwen2ForCausalLM (bf16, SDPA, on the torch device) holding our model's weights."""
    config = model.config
    hf_config = transformers.Qwen2Config(**model_config.to_hf_config(config, BF16))
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(torch_device()):
            hf = transformers.Qwen2ForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(default_dtype)
    state = nnx.state(model)
    with torch.no_grad():
        for mapping in hf_io.mappings(config):
            node = state
            for key in mapping.path:
                node = node[key]
            value = node[...]
            for i, name in enumerate(mapping.names(config)):
                hf.get_parameter(name).copy_(to_torch(mapping.to_hf(value[i] if mapping.per_layer else value, config)))
    return hf.eval()


def with_kernels(model: qwen2.Qwen2ForCausalLM, kernels: kernels_lib.Kernels | None,
                 remat: bool | None = None) -> nnx.GraphDef:
    """The model's graphdef with other kernels (and remat), same parameters."""
    copy = nnx.merge(*nnx.split(model))
    copy.kernels = kernels
    if remat is not None:
        copy.remat = remat
    return nnx.graphdef(copy)


def selected(variants: dict[str, Any], names: str | None) -> dict[str, Any]:
    """"ours" and the variants named in `names` ('+'-separated; None = all, "none" = ours alone)."""
    keep = set(variants) if names is None else {"ours", *names.split("+")}
    return {name: variant for name, variant in variants.items() if name in keep}


def decode_variants(args: argparse.Namespace, platform_name: str) -> dict[str, kernels_lib.Kernels]:
    """Kernel sets timed in the decode tables: "ours" (the platform's) first; with --compare the rest.

    Off NVIDIA GPUs (the --smoke check on CPU) the GPU kernels run in their CPU forms: XLA instead
    of cuDNN attention, the Pallas kernel interpreted."""
    ours = kernels_lib.for_platform(platform_name)
    variants = {"ours": ours}
    if args.compare:
        gpu = kernels_lib.GPU if platform_name == "cuda" else kernels_lib.GPU.replace(sequence_attention="xla",
                                                                                     interpret=True)
        variants["scan"] = kernels_lib.PORTABLE
        variants["unrolled-masked"] = gpu.replace(decode_attention="masked")
        variants["unrolled-ragged"] = gpu
        variants = {name: k for i, (name, k) in enumerate(variants.items())
                    if i == 0 or k != ours}  # drop a duplicate of "ours"
    return variants


# ----------------------------------------------------------------------------------------------
# 1. Ceilings
# ----------------------------------------------------------------------------------------------


def measure_ceilings(args: argparse.Namespace, report: Report) -> dict[str, float]:
    n, copy_elements = (512, 1 << 22) if args.smoke else (8192, 1 << 30)
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n)), BF16)
    b = jnp.asarray(rng.standard_normal((n, n)), BF16)
    matmul = jax.jit(jnp.matmul)
    copy = jax.jit(lambda x: x + 1)  # reads and writes every byte
    big = jnp.asarray(rng.standard_normal(copy_elements), BF16)
    ta, tb = to_torch(a), to_torch(b)
    tbig = to_torch(big)
    tout = torch.empty_like(tbig)
    results = {}
    for name, fn, work in [
        ("matmul_jax_tflops", lambda: matmul(a, b).block_until_ready(), 2 * n ** 3 / 1e12),
        ("matmul_torch_tflops", lambda: torch.mm(ta, tb), 2 * n ** 3 / 1e12),
        ("copy_jax_tbps", lambda: copy(big).block_until_ready(), 2 * big.nbytes / 1e12),
        ("copy_torch_tbps", lambda: tout.copy_(tbig), 2 * big.nbytes / 1e12),
    ]:
        for _ in range(3):
            timed(fn)
        results[name] = work / median_time(fn, 10)
    results["matmul_tflops"] = max(results["matmul_jax_tflops"], results["matmul_torch_tflops"])
    results["copy_tbps"] = max(results["copy_jax_tbps"], results["copy_torch_tbps"])
    report.data["ceilings"] = results
    report.line(f"ceilings: bf16 matmul {n}^3 jnp {results['matmul_jax_tflops']:.0f} / torch "
                f"{results['matmul_torch_tflops']:.0f} TFLOP/s; copy {big.nbytes >> 20} MiB jnp "
                f"{results['copy_jax_tbps']:.2f} / torch {results['copy_torch_tbps']:.2f} TB/s (read + write)")
    return results


# ----------------------------------------------------------------------------------------------
# 2-3. Decode
# ----------------------------------------------------------------------------------------------


def weight_bytes_per_step(config: model_config.Qwen2Config) -> int:
    """Bytes of bf16 weights one decode step reads (an untied embedding table: only the rows looked up)."""
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return 2 * (config.num_params - embedding)


def kv_bytes_per_slot(config: model_config.Qwen2Config) -> int:
    return 2 * 2 * config.num_layers * config.num_kv_heads * config.dim_per_head  # k and v, bf16


def floor_ms(config: model_config.Qwen2Config, prompt_lengths: list[int], steps: int, copy_tbps: float) -> float:
    """Bandwidth floor of a decode step averaged over `steps` steps: weights + the slots rows use."""
    slots = sum(prompt_lengths) + len(prompt_lengths) * (steps + 1) / 2
    return (weight_bytes_per_step(config) + kv_bytes_per_slot(config) * slots) / (copy_tbps * 1e12) * 1e3


def time_ours_decode(sampler: Sampler, prompts: list[list[int]], args: argparse.Namespace, *, new: int,
                     room: int, rule: dict, n: int = 1) -> dict[str, Any]:
    """Compile (untimed first call), then the median of --repeats timed `decode` calls on fresh prefills."""
    compile_s, first = timed(lambda: sampler.decode(sampler.prefill(prompts, n=n, max_new_tokens=room),
                                                    max_new_tokens=new, **rule))
    times = []
    for _ in range(args.repeats):
        prefilled = sampler.prefill(prompts, n=n, max_new_tokens=room)
        jax.block_until_ready((prefilled.logits, prefilled.cache))
        seconds, out = timed(lambda: sampler.decode(prefilled, max_new_tokens=new, **rule))
        times.append(seconds)
    step_ms = statistics.median(times) / (new - 1) * 1e3  # the first token comes from the prefill's logits
    return {"ms_per_step": step_ms, "first_call_s": compile_s, "tokens": first.tokens}


def time_transformers_decode(hf: transformers.Qwen2ForCausalLM, prompts: np.ndarray,
                             steps: int) -> tuple[float, np.ndarray]:
    """(ms per decode step, the first 1 + steps greedy tokens) of transformers' `generate`."""
    ids = torch.from_numpy(prompts).to(torch_device())
    mask = torch.ones_like(ids)

    def generate(new: int) -> torch.Tensor:
        with torch.no_grad():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=0, eos_token_id=None)

    generate(2)  # warm-up
    one = min(timed(lambda: generate(1))[0] for _ in range(2))
    many, out = timed(lambda: generate(1 + steps))
    return (many - one) / steps * 1e3, out[:, prompts.shape[1]:].cpu().numpy()


def decode_table(name: str, model: qwen2.Qwen2ForCausalLM, hf: transformers.Qwen2ForCausalLM, batches: list[int],
                 args: argparse.Namespace, report: Report, budget: Budget, ceilings: dict[str, float],
                 variants: dict[str, kernels_lib.Kernels]) -> None:
    config = model.config
    rng = np.random.default_rng(0)
    report.line(f"\ndecode {name}: greedy, prompt {args.prompt}, {args.new_tokens} new tokens "
                f"(transformers: {args.hf_steps} steps)")
    report.line(f"{'batch':>5} {'kernels':>16} {'ms/step':>8} {'tok/s':>9} {'HF ms/step':>10} {'HF tok/s':>9} "
                f"{'floor ms':>8} {'of floor':>8} {'same tok':>8} {'1st call s':>10}")
    samplers = {v: Sampler(model, max_cache_length=args.prompt + args.new_tokens, kernels=k)
                for v, k in variants.items()}
    for batch in batches:
        prompts = rng.integers(0, config.vocab_size, (batch, args.prompt))
        floor = floor_ms(config, [args.prompt] * batch, args.new_tokens - 1, ceilings["copy_tbps"])
        hf_ms, hf_tokens = (float("nan"), None)
        for variant, sampler in samplers.items():
            if not budget.allows(45 if variant == "ours" else 60):
                report.skip(f"decode {name} batch {batch} {variant}")
                continue
            ours = time_ours_decode(sampler, prompts.tolist(), args, new=args.new_tokens, room=args.new_tokens,
                                    rule=dict(temperature=0.0))
            if str(batch) in args.profile.split(","):
                label = f"{name} batch {batch} {variant}"
                guarded(report, f"profile {label}", lambda: profile_decode(sampler, prompts.tolist(), label, args,
                                                                           report))
            if hf_tokens is None and (args.hf_batches == "all" or str(batch) in args.hf_batches.split(",")) \
                    and budget.allows(30):
                hf_ms, hf_tokens = time_transformers_decode(hf, prompts, args.hf_steps)
            agree = float("nan")
            if hf_tokens is not None:
                agree = float(np.mean(np.asarray(ours["tokens"])[:, :hf_tokens.shape[1]] == hf_tokens))
            row = dict(model=name, batch=batch, kernels=variant, ms_per_step=ours["ms_per_step"],
                       tok_per_s=batch / ours["ms_per_step"] * 1e3, hf_ms_per_step=hf_ms,
                       hf_tok_per_s=batch / hf_ms * 1e3, floor_ms=floor, of_floor=floor / ours["ms_per_step"],
                       token_agreement=agree, first_call_s=ours["first_call_s"])
            report.add("decode", row)
            report.line(f"{batch:>5} {variant:>16} {row['ms_per_step']:8.2f} {row['tok_per_s']:9.0f} {hf_ms:10.2f} "
                        f"{row['hf_tok_per_s']:9.0f} {floor:8.2f} {row['of_floor']:8.0%} {agree:8.0%} "
                        f"{row['first_call_s']:10.1f}")
    del samplers
    gc.collect()


def rollout_table(model: qwen2.Qwen2ForCausalLM, args: argparse.Namespace, report: Report, budget: Budget,
                  ceilings: dict[str, float], variants: dict[str, kernels_lib.Kernels]) -> None:
    """8 prompts x n = 8 samples of mixed prompt lengths, room for 2048 tokens, 256 decoded, sampled."""
    config = model.config
    prompts_n, n = (2, 2) if args.smoke else (8, 8)
    longest, room, new = (40, 24, args.new_tokens) if args.smoke else (1536, 2048, args.new_tokens)
    rng = np.random.default_rng(1)
    lengths = np.linspace(longest // 12, longest, prompts_n).astype(int).tolist()
    prompts = [rng.integers(0, config.vocab_size, length).tolist() for length in lengths]
    rule = dict(temperature=0.7, top_p=0.99, frequency_penalty=1.2, seed=0)
    floor = floor_ms(config, [length for length in lengths for _ in range(n)], new - 1, ceilings["copy_tbps"])
    cache = max(lengths) + room
    report.line(f"\nrollout {'smoke' if args.smoke else '1.5B'}: {prompts_n} prompts x n {n}, prompts "
                f"{min(lengths)}..{max(lengths)} tokens, cache ~{cache} slots, {new} decoded, T 0.7, top-p 0.99, "
                f"frequency penalty 1.2")
    report.line(f"{'kernels':>16} {'ms/step':>8} {'tok/s':>9} {'floor ms':>8} {'of floor':>8} {'1st call s':>10}")
    for variant, kernels in variants.items():
        if not budget.allows(60):
            report.skip(f"rollout {variant}")
            continue
        sampler = Sampler(model, max_cache_length=cache + 64, kernels=kernels)
        ours = time_ours_decode(sampler, prompts, args, new=new, room=room, rule=rule, n=n)
        rows = prompts_n * n
        row = dict(kernels=variant, rows=rows, ms_per_step=ours["ms_per_step"],
                   tok_per_s=rows / ours["ms_per_step"] * 1e3, floor_ms=floor, of_floor=floor / ours["ms_per_step"],
                   first_call_s=ours["first_call_s"])
        report.add("rollout", row)
        report.line(f"{variant:>16} {row['ms_per_step']:8.2f} {row['tok_per_s']:9.0f} {floor:8.2f} "
                    f"{row['of_floor']:8.0%} {row['first_call_s']:10.1f}")


# ----------------------------------------------------------------------------------------------
# 4. Prefill
# ----------------------------------------------------------------------------------------------


def prefill_flops(config: model_config.Qwen2Config, batch: int, length: int) -> float:
    head = config.vocab_size * config.hidden_size
    decoder = config.num_params - head * (1 if config.tie_word_embeddings else 2)
    attention = 2.0 * config.num_layers * batch * length ** 2 * config.num_heads * config.dim_per_head
    return 2.0 * decoder * batch * length + 2.0 * head * batch + attention


def prefill_table(name: str, model: qwen2.Qwen2ForCausalLM, hf: transformers.Qwen2ForCausalLM,
                  args: argparse.Namespace, report: Report, budget: Budget, ceilings: dict[str, float],
                  variants: dict[str, kernels_lib.Kernels]) -> None:
    config = model.config
    rng = np.random.default_rng(2)
    report.line(f"\nprefill {name}: MFU against the bf16 matmul ceiling {ceilings['matmul_tflops']:.0f} TFLOP/s")
    report.line(f"{'shape':>9} {'kernels':>16} {'ms':>8} {'MFU':>6} {'HF ms':>8} {'HF MFU':>6} {'1st call s':>10}")
    for shape in args.prefill_shapes.split(","):
        batch, length = map(int, shape.split("x"))
        prompts = rng.integers(0, config.vocab_size, (batch, length))
        flops = prefill_flops(config, batch, length)
        ids = torch.from_numpy(prompts).to(torch_device())

        def hf_prefill():
            with torch.no_grad():
                hidden = hf.model(input_ids=ids, use_cache=False).last_hidden_state
                return hf.lm_head(hidden[:, -1])

        hf_prefill()
        hf_s = median_time(hf_prefill, 3)
        for variant, kernels in variants.items():
            if not budget.allows(40):
                report.skip(f"prefill {name} {shape} {variant}")
                continue
            sampler = Sampler(model, max_cache_length=length + 16, kernels=kernels)

            def run():
                prefilled = sampler.prefill(prompts.tolist(), max_new_tokens=16)
                return jax.block_until_ready((prefilled.logits, prefilled.cache))

            first_s, _ = timed(run)
            seconds = median_time(run, 3)
            row = dict(model=name, batch=batch, length=length, kernels=variant, ms=seconds * 1e3,
                       mfu=flops / seconds / (ceilings["matmul_tflops"] * 1e12), hf_ms=hf_s * 1e3,
                       hf_mfu=flops / hf_s / (ceilings["matmul_tflops"] * 1e12), first_call_s=first_s)
            report.add("prefill", row)
            report.line(f"{shape:>9} {variant:>16} {row['ms']:8.1f} {row['mfu']:6.0%} {row['hf_ms']:8.1f} "
                        f"{row['hf_mfu']:6.0%} {first_s:10.1f}")


# ----------------------------------------------------------------------------------------------
# 5. Update
# ----------------------------------------------------------------------------------------------


def update_variants(args: argparse.Namespace, platform_name: str) -> dict[str, tuple]:
    """(kernels, remat, loss config) of each update timed: ours and remat; with --compare the tiled
    training attention and LM-head chunks of 1024 positions (default 256)."""
    ours, loss_config = kernels_lib.for_platform(platform_name), loss_lib.LossConfig()
    variants = {"ours": (ours, False, loss_config), "remat": (ours, True, loss_config)}
    if args.compare:
        if ours.sequence_attention != "tiled":
            variants["tiled"] = (ours.replace(sequence_attention="tiled"), False, loss_config)
        variants["chunk1024"] = (ours, False, dataclasses.replace(loss_config, logits_chunk_size=1024))
    return variants


def prefill_variants(args: argparse.Namespace, platform_name: str) -> dict[str, kernels_lib.Kernels]:
    ours = kernels_lib.for_platform(platform_name)
    variants = {"ours": ours}
    if args.compare and ours.sequence_attention != "tiled":
        variants["tiled"] = ours.replace(sequence_attention="tiled")
    return variants


def update_table(model: qwen2.Qwen2ForCausalLM, hf: transformers.Qwen2ForCausalLM, args: argparse.Namespace,
                 report: Report, budget: Budget, ceilings: dict[str, float], variants: dict[str, tuple]) -> None:
    config = model.config
    prompt = args.update_length - args.update_loss_tokens
    loss_config = loss_lib.LossConfig()
    graphdef, params = nnx.split(model)
    inputs, arrays = make_loss_inputs(graphdef, params, config, batch=args.update_rows, prompt=prompt,
                                      response=args.update_loss_tokens, loss_config=loss_config)
    rows, length = inputs.input_ids.shape
    loss_tokens = int(np.sum(arrays["loss_mask"]))
    fns, first_call, loss_value = {}, {}, float("nan")
    for variant, (kernels, remat, config_v) in variants.items():
        if not budget.allows(60):
            report.skip(f"update {variant}")
            continue
        value_and_grad = loss_lib.make_value_and_grad(with_kernels(model, kernels, remat), config_v)
        fns[variant] = lambda f=value_and_grad: jax.block_until_ready(f(params, inputs))
        first_call[variant], ((loss_value, _), _) = timed(fns[variant])
    t_in = {key: torch.from_numpy(value).to(torch_device()) for key, value in arrays.items()}
    hf.train()

    def torch_update():
        hf.zero_grad(set_to_none=True)
        loss, _ = torch_policy_loss(hf, t_in, loss_config, loss_positions_only=True)
        loss.backward()
        return float(loss.detach())

    torch_loss = torch_update()
    fns["torch (LM head on loss tokens)"] = torch_update
    times = {name: [] for name in fns}
    for _ in range(args.update_repeats):  # interleaved rounds
        for name, fn in fns.items():
            times[name].append(timed(fn)[0])
    hf.eval()
    hf.zero_grad(set_to_none=True)
    torch_median = statistics.median(times["torch (LM head on loss tokens)"])
    flops = update_flops(config, rows, length, loss_tokens)
    report.line(f"\nupdate {config.num_params / 1e9:.2f}B: {rows} rows x {length} tokens, {loss_tokens} loss tokens; "
                f"Flow-GRPO loss + gradient, bf16; {args.update_repeats} interleaved rounds, medians; "
                f"{flops / 1e12:.0f} TFLOP")
    report.line(f"{'':34s} {'ms':>8} {'MFU':>6} {'vs torch':>8} {'1st call s':>10}")
    for name, ts in times.items():
        seconds = statistics.median(ts)
        row = dict(variant=name, ms=seconds * 1e3, mfu=flops / seconds / (ceilings["matmul_tflops"] * 1e12),
                   vs_torch=torch_median / seconds, first_call_s=first_call.get(name, float("nan")))
        report.add("update", row)
        report.line(f"{name:34s} {row['ms']:8.0f} {row['mfu']:6.0%} {row['vs_torch']:7.2f}x "
                    f"{row['first_call_s']:10.1f}")
    report.data["update_loss_check"] = {"ours": float(loss_value), "torch": torch_loss}
    report.line(f"loss: ours {float(loss_value):.5f}, torch {torch_loss:.5f} (bf16)")


# ----------------------------------------------------------------------------------------------
# Sampling rules over the full vocabulary; profiles
# ----------------------------------------------------------------------------------------------


def rules_table(args: argparse.Namespace, report: Report, budget: Budget) -> None:
    vocab = SMOKE_CONFIG.vocab_size if args.smoke else 151_936
    report.line(f"\nsampling rule per step (choose_tokens over {vocab} logits)")
    report.line(f"{'batch':>5} {'rule':>30} {'ms':>8}")
    settings = {"greedy": dict(temperature=0.0), "T 0.7, top-p 0.99": dict(temperature=0.7, top_p=0.99),
                "T 0.7, top-p 0.99, penalty 1.2": dict(temperature=0.7, top_p=0.99, frequency_penalty=1.2)}
    for batch in (1, 256):
        logits = jax.random.normal(jax.random.key(0), (batch, vocab)) * 3.0
        uniforms = jax.random.uniform(jax.random.key(1), (batch,))
        counts = jax.random.randint(jax.random.key(2), (batch, vocab), 0, 2) * (jnp.arange(vocab) < 512)
        for name, setting in settings.items():
            if not budget.allows(10):
                report.skip(f"rules {batch} {name}")
                continue
            rule = rules.sampling_rule(**setting)
            fn = jax.jit(rules.choose_tokens)
            run = lambda: jax.block_until_ready(fn(logits, rule, uniforms, counts))  # noqa: E731
            run()
            ms = median_time(run, 20) * 1e3
            report.add("rules", dict(batch=batch, rule=name, ms=ms))
            report.line(f"{batch:>5} {name:>30} {ms:8.3f}")


KIND_PATTERNS = [("matmul", ("gemm", "cublas", "cutlass", "nvjet", "sm90_", "xmma", "triton_dot")),
                 ("attention (Pallas)", ("ragged_decode_attention",)),
                 ("copy / slice", ("copy", "memcpy", "slice", "dynamic_update")),
                 ("reduction fusion", ("reduce", "reduction")),
                 ("other fusion", ("fusion", "loop_", "input_", "triton"))]


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KIND_PATTERNS if any(key in lowered for key in keys)), "other")


def profile_decode(sampler: Sampler, prompts: list[list[int]], label: str, args: argparse.Namespace,
                   report: Report) -> None:
    """Traces up to 16 decode steps of a compiled sampler (jax.profiler) and sums GPU kernel time by kind.

    XLA runs without command buffers while profiling, so gaps between kernels are larger than in
    the timed runs; the kernel times themselves are what this answers."""
    from jax.profiler import ProfileData

    steps = min(16, args.new_tokens)
    prefilled = sampler.prefill(prompts, max_new_tokens=args.new_tokens)
    jax.block_until_ready(prefilled.logits)
    directory = tempfile.mkdtemp(prefix="gpu_bench_trace_")
    with jax.profiler.trace(directory):
        wall, _ = timed(lambda: sampler.decode(prefilled, max_new_tokens=steps, temperature=0.0))
    files = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
    by_kind, by_name, intervals = {}, {}, []
    for plane in (ProfileData.from_file(files[0]).planes if files else []):
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                if event.duration_ns > 0:
                    intervals.append((event.start_ns, event.start_ns + event.duration_ns))
                    ms = event.duration_ns / 1e6 / (steps - 1)
                    by_kind[kernel_kind(event.name)] = by_kind.get(kernel_kind(event.name), 0.0) + ms
                    by_name[event.name] = by_name.get(event.name, 0.0) + ms
    busy, end = 0.0, -1.0
    for start, stop in sorted(intervals):  # the union of kernel intervals
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    row = dict(label=label, wall_ms_per_step=wall * 1e3 / (steps - 1), busy_ms_per_step=busy / 1e6 / (steps - 1),
               kernels_per_step=len(intervals) / (steps - 1), by_kind=by_kind,
               top_kernels=sorted(by_name.items(), key=lambda item: -item[1])[:25])
    report.add("profile", row)
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in sorted(by_kind.items(), key=lambda item: -item[1]))
    report.line(f"  profile {label}: {steps} steps traced, wall {row['wall_ms_per_step']:.2f} ms/step, GPU busy "
                f"{row['busy_ms_per_step']:.2f}, {row['kernels_per_step']:.0f} kernels/step; ms/step by kind: {kinds}")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


class Models:
    """Our models and their transformers twins, built on first use and kept (both fit on one GPU)."""

    def __init__(self, args: argparse.Namespace, report: Report, budget: Budget):
        self.args, self.report, self.budget = args, report, budget
        self.built: dict[str, tuple[qwen2.Qwen2ForCausalLM, transformers.Qwen2ForCausalLM]] = {}

    def get(self, name: str) -> tuple[qwen2.Qwen2ForCausalLM, transformers.Qwen2ForCausalLM]:
        if name not in self.built:
            config = SMOKE_CONFIG if self.args.smoke else model_config.preset(MODELS[name])
            load_s, model = timed(lambda: qwen2.init_random(config, dtype=BF16, param_dtype=BF16))
            self.built[name] = model, transformers_twin(model)
            self.report.line(f"\n{name}: {config.num_params / 1e9:.2f}B parameters; ours and transformers' built at "
                             f"{self.budget.elapsed():.0f} s (ours in {load_s:.1f} s)")
        return self.built[name]


def run_job(job: str, models: Models, args: argparse.Namespace, report: Report, budget: Budget,
            ceilings: dict[str, float], variants: dict[str, kernels_lib.Kernels], platform_name: str) -> None:
    kind, *rest = job.split(":")
    if kind == "ceilings":
        ceilings.update(measure_ceilings(args, report))
    elif kind == "decode":
        name, batches, *names = rest
        model, hf = models.get(name)
        decode_table(name, model, hf, [int(b) for b in batches.split(",")], args, report, budget, ceilings,
                     selected(variants, names[0] if names else None))
    elif kind == "rollout":
        rollout_table(models.get("1.5B")[0], args, report, budget, ceilings,
                      selected(variants, rest[0] if rest else None))
    elif kind == "update":
        update_table(*models.get("1.5B"), args, report, budget, ceilings,
                     selected(update_variants(args, platform_name), rest[0] if rest else None))
    elif kind == "prefill":
        name, *names = rest
        prefill_table(name, *models.get(name), args, report, budget, ceilings,
                      selected(prefill_variants(args, platform_name), names[0] if names else None))
    elif kind == "rules":
        if args.compare:
            rules_table(args, report, budget)
    else:
        raise ValueError(f"unknown job {job!r}")


def main() -> None:
    args = parse_args()
    budget = Budget(args.budget_s)
    report = Report(args)
    device = jax.devices()[0]
    platform_name = kernels_lib.platform_of(device)
    report.data["environment"] = dict(
        date=datetime.date.today().isoformat(), device=device.device_kind, platform=platform_name,
        jax=jax.__version__, flax=flax.__version__, torch=torch.__version__, transformers=transformers.__version__,
        python=platform.python_version(), xla_flags=os.environ.get("XLA_FLAGS", ""),
        torch_device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    report.line(f"{report.data['environment']}")
    if args.smoke:
        torch.set_num_threads(os.cpu_count())
    ceilings = {"matmul_tflops": float("nan"), "copy_tbps": float("nan")}
    variants = decode_variants(args, platform_name)
    report.line("kernels: " + "; ".join(f"{name} = {k}" for name, k in variants.items()))
    models = Models(args, report, budget)
    for job in args.plan.split(";"):
        if not budget.allows(20):
            report.skip(job)
            continue
        guarded(report, job, lambda: run_job(job, models, args, report, budget, ceilings, variants, platform_name))
    report.data["elapsed_s"] = budget.elapsed()
    report.save()
    print("\n==== summary ====")
    print("\n".join(line for line in report.lines if not line.startswith("{")))
    print(f"total {budget.elapsed():.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
