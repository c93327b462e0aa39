"""Shape buckets: round prompt lengths, generation lengths and batch sizes up to a few sizes so
that different `generate` calls reuse the same compiled prefill and decode programs."""

from __future__ import annotations

MIN_LENGTH_BUCKET = 16
# Lengths up to this grow in powers of two; longer ones in multiples of it (bounded padding waste).
LENGTH_BUCKET_STEP = 1024


def length_bucket(length: int) -> int:
    """Padded length for `length` tokens: 16, 32, 64, ..., 1024, then multiples of 1024."""
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    if length > LENGTH_BUCKET_STEP:
        return -(-length // LENGTH_BUCKET_STEP) * LENGTH_BUCKET_STEP
    return max(MIN_LENGTH_BUCKET, 1 << (length - 1).bit_length())


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
