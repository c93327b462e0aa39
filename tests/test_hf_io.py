"""HF checkpoint export/import round trips and clear errors on bad checkpoints."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
import jax.numpy as jnp
import flax.nnx as nnx
import safetensors.numpy

from agentflow_jax.models import hf_io
from hf_reference import hf_logits, make_hf_model, padded_batch

KWARGS = dict(vocab_size=90, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rope_theta=20_000.0, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = make_hf_model(seed=3, **KWARGS)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return model, path


def _params(model):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 6_000])
def test_export_loads_in_transformers_with_same_logits(hf_dir, tmp_path, max_shard_bytes):
    hf, path = hf_dir
    ours = hf_io.load_pretrained(path)
    hf_io.save_pretrained(ours, tmp_path / "out", max_shard_bytes=max_shard_bytes)
    files = sorted(os.listdir(tmp_path / "out"))
    if max_shard_bytes < 2**20:
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    else:
        assert files == ["config.json", "model.safetensors"]
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = padded_batch(np.random.RandomState(0), KWARGS["vocab_size"], [(6, "left"), (8, "none")], 8)
    np.testing.assert_array_equal(hf_logits(reloaded, ids, mask), hf_logits(hf, ids, mask))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_import_export_import_is_bit_exact(hf_dir, tmp_path, dtype):
    _, path = hf_dir
    first = hf_io.load_pretrained(path, dtype=dtype)
    hf_io.save_pretrained(first, tmp_path / "a", max_shard_bytes=10_000)
    second = hf_io.load_pretrained(tmp_path / "a", dtype=dtype)
    a, b = _params(first), _params(second)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_export_casts_to_requested_dtype(hf_dir, tmp_path):
    _, path = hf_dir
    hf_io.save_pretrained(hf_io.load_pretrained(path), tmp_path / "bf16", dtype=jnp.bfloat16)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    ref = make_hf_model(seed=3, **KWARGS)
    ref.load_state_dict(hf_dir[0].state_dict())
    ref = ref.to(torch.bfloat16)
    for (n1, p1), (n2, p2) in zip(reloaded.state_dict().items(), ref.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_tied_checkpoint_ignores_redundant_head(tmp_path):
    kwargs = dict(KWARGS, tie_word_embeddings=True)
    hf = make_hf_model(seed=4, **kwargs)
    hf.save_pretrained(tmp_path / "tied")
    tensors = safetensors.numpy.load_file(tmp_path / "tied" / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    safetensors.numpy.save_file(tensors, tmp_path / "tied" / "model.safetensors", metadata={"format": "pt"})
    model = hf_io.load_pretrained(tmp_path / "tied")
    assert model.lm_head is None
    ids, mask = padded_batch(np.random.RandomState(1), kwargs["vocab_size"], [(5, "none")], 5)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids, jnp.int32))), hf_logits(hf, ids, mask), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_io.load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_io.load_pretrained(tmp_path / "empty")


def test_no_weights(hf_dir, tmp_path):
    d = _copy(hf_dir[1], tmp_path / "noweights")
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(hf_io.ModelFilesError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        hf_io.load_pretrained(d)


def test_llama_checkpoint_is_rejected(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="model_type='llama'.*Qwen2"):
        hf_io.load_pretrained(tmp_path / "llama")


def test_truncated_safetensors(hf_dir, tmp_path):
    d = _copy(hf_dir[1], tmp_path / "trunc")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(hf_io.ModelFilesError, match=r"tensor '.*' ends at byte .*truncated"):
        hf_io.load_pretrained(d)
    (d / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(hf_io.ModelFilesError, match="too short"):
        hf_io.load_pretrained(d)


def test_shape_mismatch_names_tensor(hf_dir, tmp_path):
    d = _copy(hf_dir[1], tmp_path / "shape")
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 64
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf_io.ModelFilesError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(48, 32\).*\(64, 32\)"):
        hf_io.load_pretrained(d)


def test_unknown_and_missing_tensors(hf_dir, tmp_path):
    d = _copy(hf_dir[1], tmp_path / "extra")
    tensors = safetensors.numpy.load_file(d / "model.safetensors")
    extra = dict(tensors, **{"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)})
    safetensors.numpy.save_file(extra, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf_io.ModelFilesError, match="does not use.*q_norm"):
        hf_io.load_pretrained(d)
    fewer = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    safetensors.numpy.save_file(fewer, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf_io.ModelFilesError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_io.load_pretrained(d)


def test_index_pointing_to_missing_shard(hf_dir, tmp_path):
    ours = hf_io.load_pretrained(hf_dir[1])
    hf_io.save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=6_000)
    victim = sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / "sharded" / victim)
    with pytest.raises(hf_io.ModelFilesError, match=f"do not exist.*{victim}"):
        hf_io.load_pretrained(tmp_path / "sharded")
