"""Helpers that build independent reference models with transformers (PyTorch, CPU) for parity tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers


def make_hf_model(seed: int = 0, *, dtype: torch.dtype = torch.float32, init_std: float = 0.02,
                  **config_kwargs) -> transformers.Qwen2ForCausalLM:
    """A randomly initialised transformers Qwen2ForCausalLM (eval mode)."""
    config = transformers.Qwen2Config(initializer_range=init_std, **config_kwargs)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).eval()
    # Default init leaves norms at 1 and biases at 0; randomise them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def padded_batch(rng: np.random.RandomState, vocab_size: int, lengths_and_sides: list[tuple[int, str]],
                 width: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [B, width] and mask [B, width] with rows padded on the 'left', 'right' or 'none'."""
    ids = rng.randint(0, vocab_size, size=(len(lengths_and_sides), width)).astype(np.int64)
    mask = np.zeros_like(ids)
    for row, (length, side) in enumerate(lengths_and_sides):
        if side == "left":
            mask[row, width - length:] = 1
        elif side == "right":
            mask[row, :length] = 1
        else:
            assert length == width
            mask[row] = 1
    return ids, mask


def hf_logits(model: transformers.Qwen2ForCausalLM, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reference logits [B, T, V] float32, positions counting real tokens only (as in generate)."""
    positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions))
    return out.logits.float().numpy()
