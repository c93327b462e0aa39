"""Hugging Face checkpoint I/O for Qwen2: safetensors <-> the NNX state (layers stacked).

Reading memory-maps each `*.safetensors` file (single file or sharded with
`model.safetensors.index.json`), converts one parameter at a time on the host (transpose HF's
[out, in] weights, reshape heads, stack layers, cast), and places it straight into its target
sharding when a mesh is given -- the whole model is never assembled on one device. Only the
shards a process owns are transferred (`jax.make_array_from_callback`).

The safetensors reader is our own small header parser over `numpy.memmap`, because the
`safetensors` package's numpy `safe_open` cannot return bfloat16 tensors; writing uses
`safetensors.numpy.save_file`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Callable

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from agentflow_jax import sharding
from agentflow_jax.errors import UserError
from agentflow_jax.models import qwen2
from agentflow_jax.models.config import Qwen2Config, from_hf_config, to_hf_config

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
# Buffers some checkpoints carry that are recomputed here.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ModelFilesError(UserError, ValueError):
    """A checkpoint directory or file is missing, corrupt or does not fit the model."""


# ----------------------------------------------------------------------------------------------
# Reading safetensors
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _read_header(path: str) -> dict[str, _TensorInfo]:
    """Parses one safetensors header and checks every tensor lies inside the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelFilesError(f"{path}: file is {size} bytes, too short to be safetensors (truncated?)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise ModelFilesError(f"{path}: header claims {header_len} bytes but the file has {size} (truncated?)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFilesError(f"{path}: unreadable safetensors header ({e})") from e
    data_start = 8 + header_len
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in _ST_DTYPES:
            raise ModelFilesError(f"{path}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
        begin, end = meta["data_offsets"]
        dtype, shape = _ST_DTYPES[meta["dtype"]], tuple(meta["shape"])
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise ModelFilesError(f"{path}: tensor {name!r} byte range does not match shape {shape} {dtype}")
        if data_start + end > size:
            raise ModelFilesError(f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has only "
                                  f"{size} bytes (truncated or partially downloaded file)")
        infos[name] = _TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
    return infos


class SafetensorsReader:
    """All tensors of a checkpoint directory, memory-mapped on demand."""

    def __init__(self, directory: str):
        self.directory = directory
        self.tensors: dict[str, _TensorInfo] = {}
        for path in self._weight_files(directory):
            for name, info in _read_header(path).items():
                if name in self.tensors:
                    raise ModelFilesError(f"tensor {name!r} appears in both {self.tensors[name].file} and {path}")
                self.tensors[name] = info
        self._maps: dict[str, np.memmap] = {}

    @staticmethod
    def _weight_files(directory: str) -> list[str]:
        index_path = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelFilesError(f"{index_path}: no 'weight_map' object")
            files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
            missing = [p for p in files if not os.path.isfile(p)]
            if missing:
                raise ModelFilesError(f"{index_path} lists files that do not exist: {missing}")
            return files
        files = sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".safetensors"))
        if not files:
            other = [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth", ".gguf"))]
            hint = (f" (found {other}: re-save with transformers' save_pretrained(safe_serialization=True))"
                    if other else "")
            raise ModelFilesError(f"no *.safetensors weights in {directory}{hint}")
        return files

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped numpy array."""
        info = self.tensors[name]
        if info.file not in self._maps:
            self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        raw = self._maps[info.file][info.start:info.end]
        return raw.view(info.dtype).reshape(info.shape)


# ----------------------------------------------------------------------------------------------
# Name and layout mapping
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Mapping:
    """One NNX parameter <-> one HF tensor name (per layer when `per_layer`).

    `hf_shape(config)` is the HF tensor shape; `to_ours` / `to_hf` convert one (layer's) array.
    """

    path: tuple[str, ...]
    hf_name: str
    hf_shape: Callable[[Qwen2Config], tuple[int, ...]]
    to_ours: Callable[[np.ndarray, Qwen2Config], np.ndarray]
    to_hf: Callable[[np.ndarray, Qwen2Config], np.ndarray]
    per_layer: bool = True

    def names(self, config: Qwen2Config) -> list[str]:
        if not self.per_layer:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in range(config.num_layers)]


def _identity(x, c):
    del c
    return x


def _transpose(x, c):
    del c
    return x.T


def _in_heads_out(heads: Callable[[Qwen2Config], int]):
    """HF [heads*dh, D] <-> ours [D, heads, dh]."""
    return (lambda x, c: x.T.reshape(c.hidden_size, heads(c), c.dim_per_head),
            lambda x, c: x.reshape(c.hidden_size, -1).T)


def _bias_heads(heads: Callable[[Qwen2Config], int]):
    """HF [heads*dh] <-> ours [heads, dh]."""
    return (lambda x, c: x.reshape(heads(c), c.dim_per_head), lambda x, c: x.reshape(-1))


def _layer_mappings() -> list[_Mapping]:
    h = lambda c: c.num_heads  # noqa: E731
    k = lambda c: c.num_kv_heads  # noqa: E731
    pre = "model.layers.{i}."
    d = lambda c: c.hidden_size  # noqa: E731
    maps = [
        _Mapping(("layers", "input_norm", "scale"), pre + "input_layernorm.weight",
                 lambda c: (d(c),), _identity, _identity),
        _Mapping(("layers", "post_attn_norm", "scale"), pre + "post_attention_layernorm.weight",
                 lambda c: (d(c),), _identity, _identity),
        _Mapping(("layers", "attn", "o_kernel"), pre + "self_attn.o_proj.weight",
                 lambda c: (d(c), h(c) * c.dim_per_head),
                 lambda x, c: x.T.reshape(h(c), c.dim_per_head, d(c)),
                 lambda x, c: x.reshape(-1, d(c)).T),
    ]
    for proj, heads in (("q", h), ("k", k), ("v", k)):
        maps.append(_Mapping(("layers", "attn", f"{proj}_kernel"), pre + f"self_attn.{proj}_proj.weight",
                             lambda c, heads=heads: (heads(c) * c.dim_per_head, d(c)), *_in_heads_out(heads)))
        maps.append(_Mapping(("layers", "attn", f"{proj}_bias"), pre + f"self_attn.{proj}_proj.bias",
                             lambda c, heads=heads: (heads(c) * c.dim_per_head,), *_bias_heads(heads)))
    for proj, shape in (("gate", lambda c: (c.intermediate_size, d(c))),
                        ("up", lambda c: (c.intermediate_size, d(c))),
                        ("down", lambda c: (d(c), c.intermediate_size))):
        maps.append(_Mapping(("layers", "mlp", f"{proj}_kernel"), pre + f"mlp.{proj}_proj.weight",
                             shape, _transpose, _transpose))
    return maps


def mappings(config: Qwen2Config) -> list[_Mapping]:
    """Every parameter of a model with this config, in HF checkpoint order."""
    maps = [_Mapping(("embed_tokens",), "model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size),
                     _identity, _identity, per_layer=False)]
    maps += _layer_mappings()
    maps.append(_Mapping(("final_norm", "scale"), "model.norm.weight", lambda c: (c.hidden_size,),
                         _identity, _identity, per_layer=False))
    if not config.tie_word_embeddings:
        maps.append(_Mapping(("lm_head",), "lm_head.weight", lambda c: (c.vocab_size, c.hidden_size),
                             _transpose, _transpose, per_layer=False))
    return maps


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------


def _check_names(reader: SafetensorsReader, config: Qwen2Config) -> None:
    expected = {name for m in mappings(config) for name in m.names(config)}
    present = set(reader.tensors)
    ignorable = {n for n in present if n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        ignorable.add("lm_head.weight")  # some exporters write the tied head too
    missing = sorted(expected - present)
    unknown = sorted(present - expected - ignorable)
    if missing:
        raise ModelFilesError(f"{reader.directory}: checkpoint lacks {len(missing)} tensor(s) the config needs, "
                              f"e.g. {missing[:5]} (does config.json match the weights?)")
    if unknown:
        raise ModelFilesError(f"{reader.directory}: checkpoint has {len(unknown)} tensor(s) a Qwen2 model with this "
                              f"config does not use, e.g. {unknown[:5]}")


def _host_array(reader: SafetensorsReader, mapping: _Mapping, config: Qwen2Config,
                dtype: np.dtype) -> np.ndarray:
    """One parameter in our layout and `dtype`, assembled on the host (layers stacked)."""
    expected_shape = mapping.hf_shape(config)
    parts = []
    for name in mapping.names(config):
        tensor = reader.get(name)
        if tensor.shape != expected_shape:
            raise ModelFilesError(f"tensor {name!r} has shape {tensor.shape} but the config implies "
                                  f"{expected_shape} (file {reader.tensors[name].file})")
        parts.append(mapping.to_ours(tensor, config).astype(dtype))
    return np.stack(parts) if mapping.per_layer else parts[0]


def _get_variable(state: nnx.State, path: tuple[str, ...]) -> nnx.Variable:
    node = state
    for key in path:
        node = node[key]
    return node


def load_pretrained(path: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = None,
                    mesh: jax.sharding.Mesh | None = None, rules: sharding.Rules | str | None = None,
                    remat: bool = False) -> qwen2.Qwen2ForCausalLM:
    """Loads a local Hugging Face Qwen2 directory (config.json + *.safetensors).

    Args:
      path: the directory (weights load only from local directories, never a hub).
      dtype: compute dtype; param_dtype defaults to it.
      mesh: when given, every parameter is placed straight into its sharding on this mesh
        (according to `rules`, default `sharding.TRAINING_RULES`), never assembled on one device.
      remat: recompute each layer in the backward pass.
    Raises:
      FileNotFoundError: no such directory; ModelFilesError: missing, corrupt or mismatched files.
    """
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model directory {directory!r} does not exist (weights load only from local dirs)")
    config = from_hf_config(directory)
    reader = SafetensorsReader(directory)
    _check_names(reader, config)
    param_dtype = np.dtype(param_dtype or dtype)
    model = qwen2.abstract_model(config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    state = nnx.state(model)
    for mapping in mappings(config):
        var = _get_variable(state, mapping.path)
        host = _host_array(reader, mapping, config, param_dtype)
        if host.shape != var.get_value().shape:  # a bug in a mapping, not in the user's files
            raise AssertionError(f"{mapping.path}: mapped shape {host.shape} != model shape {var.get_value().shape}")
        var.set_value(_place(host, var, mesh, rules))
    nnx.update(model, state)
    return model


def _place(host: np.ndarray, var: nnx.Variable, mesh, rules) -> jax.Array:
    if mesh is None:
        return jax.device_put(host)
    spec = sharding.partition_spec(host.shape, var.logical_axes, mesh, rules)
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec), lambda index: host[index])


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _hf_tensors(model: qwen2.Qwen2ForCausalLM, dtype: np.dtype | None
                ) -> list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]:
    """(name, shape, dtype, lazy getter) for every HF tensor, in checkpoint order.

    Getters fetch a parameter to the host once and keep only the most recent one, so writing
    tensors in order holds one parameter (all its layers) in host memory at a time.
    """
    config, state = model.config, nnx.state(model)
    last: dict[int, np.ndarray] = {}

    def fetch(var: nnx.Variable) -> np.ndarray:
        if id(var) not in last:
            last.clear()
            last[id(var)] = _to_host(var.get_value())
        return last[id(var)]

    entries = []
    for mapping in mappings(config):
        var = _get_variable(state, mapping.path)
        out_dtype = dtype or np.dtype(var.get_value().dtype)
        for i, name in enumerate(mapping.names(config)):
            def getter(mapping=mapping, var=var, i=i, out_dtype=out_dtype) -> np.ndarray:
                whole = fetch(var)
                arr = whole[i] if mapping.per_layer else whole
                return np.ascontiguousarray(mapping.to_hf(arr, config).astype(out_dtype))
            entries.append((name, mapping.hf_shape(config), out_dtype, getter))
    return entries


def save_pretrained(model: qwen2.Qwen2ForCausalLM, path: str | os.PathLike, *, dtype: Any = None,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `config.json` and safetensors (sharded above `max_shard_bytes`, as transformers does,
    with an index) that transformers' `Qwen2ForCausalLM.from_pretrained` loads.

    In a multi-process run every process must call this (arrays are gathered); process 0 writes.
    """
    directory = os.fspath(path)
    np_dtype = np.dtype(dtype) if dtype is not None else None
    tensors = _hf_tensors(model, np_dtype)
    shards: list[list[tuple]] = [[]]
    shard_bytes = 0
    for entry in tensors:
        nbytes = int(np.prod(entry[1])) * entry[2].itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += nbytes
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(directory, exist_ok=True)
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {name: getter() for name, _, _, getter in shard}
        total += sum(a.nbytes for a in arrays.values())
        weight_map.update({name: filename for name in arrays})
        if writer:
            safetensors.numpy.save_file(arrays, os.path.join(directory, filename), metadata={"format": "pt"})
    if not writer:
        return
    if len(shards) > 1:
        with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    saved_dtype = np_dtype or np.dtype(_get_variable(nnx.state(model), ("embed_tokens",)).get_value().dtype)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(to_hf_config(model.config, saved_dtype), f, indent=2)
