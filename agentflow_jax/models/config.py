"""Qwen2 / Qwen2.5 architecture hyper-parameters: the config, named presets, and the translation
to and from a transformers `config.json`.

    config = preset("qwen2.5-7b")                 # the paper's backbone
    config = from_hf_config("/models/Qwen2.5-7B-Instruct")
    json.dump(to_hf_config(config, jnp.bfloat16), f)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

DType = Any


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Architecture hyper-parameters of a Qwen2-family model (names follow the paper's models)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Qwen2Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); "
                             "set head_dim explicitly")
        if self.dim_per_head % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.dim_per_head}")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def num_params(self) -> int:
        """Exact parameter count (embedding counted once when tied)."""
        d, f, h, k, dh = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.dim_per_head
        attn = d * h * dh + h * dh + 2 * (d * k * dh + k * dh) + h * dh * d
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * layer + d + head

    def replace(self, **changes) -> "Qwen2Config":
        return dataclasses.replace(self, **changes)


def _qwen25(hidden, inter, layers, heads, kv, tied, vocab) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, tie_word_embeddings=tied)


PRESETS: dict[str, Qwen2Config] = {
    "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, True, 151_936),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, True, 151_936),
    "qwen2.5-3b": _qwen25(2048, 11008, 36, 16, 2, True, 151_936),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4, False, 152_064),
    "qwen2.5-14b": _qwen25(5120, 13824, 48, 40, 8, False, 152_064),
    "qwen2.5-32b": _qwen25(5120, 27648, 64, 40, 8, False, 152_064),
}


def preset(name: str) -> Qwen2Config:
    """A named preset, e.g. "qwen2.5-7b" (the paper's backbone)."""
    key = name.lower().replace("_", "-").replace("-instruct", "")
    if key not in PRESETS:
        raise KeyError(f"unknown Qwen2 preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[key]


def from_hf_config(config: Mapping[str, Any] | str | os.PathLike) -> Qwen2Config:
    """Builds a Qwen2Config from a transformers `config.json` (a dict, the file, or its directory).

    Accepts both the transformers 4.x (`rope_theta`) and 5.x (`rope_parameters`) spellings.
    Raises ValueError for other architectures and for features this port does not implement
    (sliding-window attention, rope scaling).
    """
    if not isinstance(config, Mapping):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path!r}: expected a Hugging Face model directory")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    model_type = config.get("model_type")
    if model_type != "qwen2":
        archs = config.get("architectures")
        raise ValueError(f"config has model_type={model_type!r} (architectures={archs}); this loader reads Qwen2 / "
                         "Qwen2.5 checkpoints (model_type 'qwen2', Qwen2ForCausalLM) only")
    if config.get("use_sliding_window"):
        raise ValueError("config enables sliding-window attention (use_sliding_window=true); not supported")
    rope = dict(config.get("rope_parameters") or {})
    rope_scaling = config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_scaling or rope_type != "default":
        raise ValueError(f"rope scaling {rope_scaling or rope} is not supported (only the default RoPE)")
    theta = rope.get("rope_theta", config.get("rope_theta", 1_000_000.0))
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim")
    if head_dim == config["hidden_size"] // heads:
        head_dim = None
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers") if k not in config]
    if missing:
        raise ValueError(f"config.json lacks required keys {missing}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported (Qwen2 uses silu)")
    return Qwen2Config(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads", heads),
        head_dim=head_dim,
        rope_theta=float(theta),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
    )


_ENDOFTEXT_ID, _IM_END_ID = 151643, 151645


def to_hf_config(config: Qwen2Config, dtype: DType = jnp.float32) -> dict[str, Any]:
    """The `config.json` dict transformers needs to build `Qwen2ForCausalLM` for this config."""
    dtype_name = jnp.dtype(dtype).name
    hf = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    if config.vocab_size > _IM_END_ID:  # Qwen vocabulary: record its special ids as the originals do
        hf.update(bos_token_id=_ENDOFTEXT_ID, eos_token_id=_IM_END_ID)
    if config.head_dim is not None:
        hf["head_dim"] = config.head_dim
    return hf
