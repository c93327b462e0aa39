"""Shape buckets and row blocks.

Prompt lengths, generation lengths and batch sizes are rounded up to a few sizes so that
different `generate` calls reuse the same compiled prefill and decode programs. On CPU the
programs then walk the batch in blocks of rows small enough to stay in the processor caches
(`rows_per_block`); the block sizes are functions of the bucketed shapes, so they add no compiles.
"""

from __future__ import annotations

MIN_LENGTH_BUCKET = 16
# Lengths above MIN_LENGTH_BUCKET round up to a multiple of max(MIN_LENGTH_BUCKET, p / 4), p the
# power of two below them: four buckets per doubling, padding below max(16, length / 4) tokens,
# compiles growing with log(length).
BUCKETS_PER_OCTAVE = 4
# Prompt attention runs in chunks of this many queries over the keys up to the chunk's end,
# skipping the masked upper triangle (about half the score work at long prompts).
PREFILL_QUERY_CHUNK = 128
# CPU row blocks: a prefill block holds at most this many prompt tokens (its activations and a
# query chunk's scores stay in L2/L3); a decode step's working set (weights + the block's KV
# cache) is at most this many bytes. Tuned on the rollout benchmark (see BUILD_NOTES.md).
PREFILL_BLOCK_TOKENS = 2048
DECODE_BLOCK_BYTES = 8 << 20


def length_bucket(length: int) -> int:
    """Padded length for `length` tokens: 16, 32, 48, 64, 80, 96, 112, 128, 160, ..., 256, 320, ...
    (see BUCKETS_PER_OCTAVE)."""
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    if length <= MIN_LENGTH_BUCKET:
        return MIN_LENGTH_BUCKET
    step = max(MIN_LENGTH_BUCKET, (1 << ((length - 1).bit_length() - 1)) // BUCKETS_PER_OCTAVE)
    return -(-length // step) * step


def batch_bucket(rows: int, multiple_of: int = 1) -> int:
    """Padded batch size for `rows` rows: the next power of two, rounded up to a multiple of
    `multiple_of` (the number of batch shards of the mesh)."""
    if rows < 1:
        raise ValueError(f"rows must be positive, got {rows}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be positive, got {multiple_of}")
    size = 1 << (rows - 1).bit_length()
    return -(-size // multiple_of) * multiple_of


def cache_layout(longest_prompt: int, max_new_tokens: int, max_cache_length: int) -> tuple[int, int]:
    """(prompt bucket, generated-token capacity) of a batch; their sum is the cache length.

    The capacity is the bucket of `max_new_tokens`; both shrink near `max_cache_length` (the
    prompt bucket to `max_cache_length - max_new_tokens`, never below the longest prompt) so the
    cache never exceeds it.

    Raises:
      ValueError: the longest prompt plus `max_new_tokens` does not fit in `max_cache_length`.
    """
    if longest_prompt + max_new_tokens > max_cache_length:
        raise ValueError(
            f"a prompt of {longest_prompt} tokens plus max_new_tokens={max_new_tokens} needs "
            f"{longest_prompt + max_new_tokens} cache slots but the sampler's max_cache_length is "
            f"{max_cache_length}; shorten the prompt, lower max_new_tokens, or build the Sampler with a "
            "larger max_cache_length")
    prompt_bucket = min(length_bucket(longest_prompt), max_cache_length - max_new_tokens)
    capacity = min(length_bucket(max_new_tokens), max_cache_length - prompt_bucket)
    return prompt_bucket, capacity


def rows_per_block(rows: int, row_cost: int, budget: int, multiple_of: int = 1) -> int | None:
    """Rows per block for `rows` rows split into equal blocks: the largest divisor of `rows` that
    is a multiple of `multiple_of` (the batch shards) and costs at most `budget` at `row_cost`
    per row; None when not even the smallest one fits.

    Raises:
      ValueError: `rows` is not a positive multiple of `multiple_of`.
    """
    if rows < 1 or multiple_of < 1 or rows % multiple_of:
        raise ValueError(f"rows ({rows}) must be a positive multiple of multiple_of ({multiple_of})")
    fitting = [r for r in range(multiple_of, rows + 1, multiple_of)
               if rows % r == 0 and r * row_cost <= budget]
    return fitting[-1] if fitting else None
