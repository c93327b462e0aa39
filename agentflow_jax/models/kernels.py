"""Which implementation of the model's hot paths runs on which platform: the one place that decides.

Three choices, each with a portable implementation (the CPU one, which the CPU test suite and the
CPU benchmarks measure) and one meant to pay on NVIDIA GPUs (chosen from the issue's H200 figures
of the portable paths, not yet timed on a GPU: `experiments/benchmarks/gpu_bench.py --compare`
times each against the portable one; see BUILD_NOTES.md):

  sequence_attention   whole-sequence causal attention (training, SFT, prompt prefill)
    "tiled"   `attention.causal_attention`: causal tiles with a FlashAttention-style custom VJP in XLA.
    "cudnn"   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused flash attention
              (forward and backward), rows moved to right padding around the layer stack.
    "xla"     the same call with `implementation="xla"`: the cuDNN path's code on any platform
              (tests compare it with "tiled" on CPU).
  decode_layers        the layer loop of one decode step
    "scan"    `lax.scan` over the stacked layer parameters, the cache read per layer as a scan
              slice and written once after the scan (`Qwen2ForCausalLM.forward_with_cache`).
    "unrolled" a Python loop over per-layer weights packed before the decode loop (q/k/v and
              gate/up fused into one matmul each) and a per-layer cache written in place
              (`Qwen2ForCausalLM.decode_step`): no per-layer slicing or scan bookkeeping, and one
              straight-line program per step that XLA can launch as a few CUDA graphs.
  decode_attention     attention of the unrolled decode step over its layer's cache
    "masked"  XLA softmax over every cache slot with the validity mask (`attention.cached_attention`).
    "ragged"  a Pallas (Triton) kernel that reads only the slots each row uses, [first real slot,
              write index] (`attention.ragged_decode_attention`), so long or left-padded caches
              cost what they hold.

`for_platform("cpu")` (and TPU, ROCm) keeps the portable paths; `for_platform("cuda")` picks the GPU
ones. A model resolves `Qwen2ForCausalLM.kernels` (None = `default()`, from JAX's default device at
trace time); the sampler resolves its own from the device of its parameters.
"""

from __future__ import annotations

import dataclasses

import jax

SEQUENCE_ATTENTION = ("tiled", "cudnn", "xla")
DECODE_LAYERS = ("scan", "unrolled")
DECODE_ATTENTION = ("masked", "ragged")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Implementation choices (module docstring); static, hashable.

    Attributes:
      sequence_attention: one of SEQUENCE_ATTENTION.
      decode_layers: one of DECODE_LAYERS.
      decode_attention: one of DECODE_ATTENTION (used by the unrolled decode step only).
      interpret: run Pallas kernels in interpret mode (CPU tests of the GPU kernels).
    """

    sequence_attention: str = "tiled"
    decode_layers: str = "scan"
    decode_attention: str = "masked"
    interpret: bool = False

    def __post_init__(self):
        for name, allowed in (("sequence_attention", SEQUENCE_ATTENTION), ("decode_layers", DECODE_LAYERS),
                              ("decode_attention", DECODE_ATTENTION)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Kernels.{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def replace(self, **changes) -> "Kernels":
        return dataclasses.replace(self, **changes)


PORTABLE = Kernels()
GPU = Kernels(sequence_attention="cudnn", decode_layers="unrolled", decode_attention="ragged")


def for_platform(platform: str) -> Kernels:
    """The kernels that pay on `platform` ("cpu", "cuda", "rocm", "tpu"; see `platform_of`).

    On "cuda" without Pallas' Triton backend in this JAX the decode attention stays "masked"."""
    if platform != "cuda":
        return PORTABLE
    return GPU if _pallas_triton_available() else GPU.replace(decode_attention="masked")


def _pallas_triton_available() -> bool:
    try:
        from jax.experimental.pallas import triton
    except ImportError:
        return False
    return hasattr(triton, "CompilerParams")


def platform_of(device: jax.Device) -> str:
    """"cuda" for an NVIDIA GPU (cuDNN and Triton available), else the device's platform name."""
    if device.platform == "gpu" and "rocm" not in str(getattr(device.client, "platform_version", "")).lower():
        return "cuda"
    return device.platform


def default() -> Kernels:
    """`for_platform` of JAX's default device."""
    return for_platform(platform_of(jax.devices()[0]))
