"""Model families (Qwen2 / Qwen2.5), checkpoint I/O and tokenizers."""
