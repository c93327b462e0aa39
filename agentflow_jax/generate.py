"""Sample chat completions from a local Qwen2 checkpoint (or, by default, a tiny random one).

    python -m agentflow_jax.generate                                   # tiny random model, offline
    python -m agentflow_jax.generate --model=/models/Qwen2.5-0.5B-Instruct --prompt="What is 17*23?" \\
        --n=4 --temperature=0.7 --max_new_tokens=128

Prints each sample with its finish reason, and the sampler's throughput. With no --model the
weights are random (the text is gibberish): the default only shows the whole path, offline
Qwen2.5 tokenizer -> ChatML -> bucketed prefill -> group sampling -> decode, on any CPU.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
from absl import app, flags

from agentflow_jax import cli
from agentflow_jax.models import config as model_config
from agentflow_jax.models import hf_io, qwen2
from agentflow_jax.models.tokenizer import load_tokenizer
from agentflow_jax.sampling import Sampler

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Local HF-format Qwen2 directory; default: a tiny random model.")
flags.DEFINE_string("tokenizer", None, "Tokenizer spec (default: the model directory, or 'qwen2.5').")
flags.DEFINE_string("prompt", "Write one sentence about planning with tools.", "The user message.")
flags.DEFINE_integer("n", 4, "Samples of the prompt (one prefill, shared cache).")
flags.DEFINE_float("temperature", 0.7, "0 = greedy.")
flags.DEFINE_float("top_p", 0.99, "Nucleus mass.")
flags.DEFINE_integer("max_new_tokens", 48, "Tokens per sample at most.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")

# Small enough for any laptop; the Qwen2.5 vocabulary keeps the real tokenizer usable.
TINY_RANDOM = model_config.Qwen2Config(vocab_size=151_936, hidden_size=64, intermediate_size=128, num_layers=2,
                                num_heads=4, num_kv_heads=2, tie_word_embeddings=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass the text with --prompt")
    dtype = jnp.dtype(FLAGS.dtype)
    if FLAGS.model:
        model = hf_io.load_pretrained(FLAGS.model, dtype=dtype)
        tokenizer = load_tokenizer(FLAGS.tokenizer or FLAGS.model)
    else:
        print("no --model given: sampling from a tiny random Qwen2 (the text will be gibberish)")
        model = qwen2.init_random(TINY_RANDOM, dtype=dtype)
        tokenizer = load_tokenizer(FLAGS.tokenizer or "qwen2.5")
    prompt = tokenizer.encode_chat([{"role": "user", "content": FLAGS.prompt}])
    sampler = Sampler(model, max_cache_length=len(prompt) + FLAGS.max_new_tokens + 16)
    start = time.perf_counter()
    out = sampler.generate([prompt], max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                           top_p=FLAGS.top_p, n=FLAGS.n, stop_token_ids=tokenizer.eos_token_ids, seed=FLAGS.seed)
    seconds = time.perf_counter() - start
    for i, (tokens, reason) in enumerate(zip(out.tokens, out.finish_reason)):
        text_ids = tokens[:-1] if reason == "stop" else tokens
        print(f"--- sample {i} ({len(tokens)} tokens, {reason}) ---\n{tokenizer.decode(text_ids)}")
    generated = sum(map(len, out.tokens))
    print(f"{generated} tokens in {seconds:.2f} s (first call includes compilation) "
          f"from a {len(prompt)}-token prompt")


if __name__ == "__main__":
    cli.run(main)
