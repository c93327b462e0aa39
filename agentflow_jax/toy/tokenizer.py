"""The toy world's tokenizer: SentencePiece BPE trained on the corpus and the demonstrations, with
city names, tool names and digit pairs as single pieces (see `train_tokenizer`)."""

from __future__ import annotations

import collections
import random
import re
from typing import Sequence

from agentflow_jax.models.tokenizer import SENTENCEPIECE_MARKERS, SentencePieceTokenizer
from agentflow_jax.toy.config import TokenizerSection
from agentflow_jax.toy.demonstrations import Demo
from agentflow_jax.toy.world import GENERALIST_TOOL, PYTHON_TOOL, SEARCH_TOOL, World

TOOL_PIECES = (SEARCH_TOOL, PYTHON_TOOL, GENERALIST_TOOL)


def tokenizer_texts(world: World, demos: Sequence[Demo], *, max_texts: int,
                    seed: int) -> list[str]:
    """Corpus passages and distinct demonstration texts: a seeded sample of at most `max_texts`,
    taken in equal shares per (role, tool) so every prompt shape's fixed text gets merged pieces."""
    groups: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for d in demos:
        tool = re.search(r"^Tool: (\S+)$", d.messages[-1]["content"], re.MULTILINE) if d.role == "executor" else None
        key = (d.role, tool.group(1) if tool else "")
        groups[key].add(d.target)
        for m in d.messages:
            groups[key].add(m["content"])
    rng = random.Random(seed)
    share = max(1, max_texts // max(1, len(groups)))
    texts = []
    for key in sorted(groups):
        rows = sorted(groups[key])
        texts.extend(rng.sample(rows, share) if len(rows) > share else rows)
    return [r["contents"] for r in world.corpus] + texts


DIGIT_PAIRS = tuple(f"{i:02d}" for i in range(100))


def single_pieces(world: World) -> list[str]:
    """Strings that are always one token: the ChatML markers, the tool names, the city names and
    the 100 digit pairs."""
    return list(SENTENCEPIECE_MARKERS) + list(TOOL_PIECES) + [e.name for e in world.entities] + list(DIGIT_PAIRS)


def train_tokenizer(section: TokenizerSection, world: World, texts: Sequence[str], path: str) -> SentencePieceTokenizer:
    """SentencePiece BPE for the toy world.

    * City and tool names are single pieces, and numbers are digit pairs read from the left plus a
      last single digit ("94214" -> 94|21|4): a name or number is always the same few tokens,
      whatever surrounds it (what copying it from prompt to reply needs), and prompts stay short.
    * Pieces may span spaces (`split_by_whitespace=False`): the fixed prompt text (tool list,
      instructions) shrinks to a few long pieces, and prompts to ~150 tokens.
    """
    return SentencePieceTokenizer.train(
        texts, vocab_size=section.vocab_size, model_path=path, user_defined_symbols=single_pieces(world),
        split_by_whitespace=False, split_by_unicode_script=False, split_digits=True,
        max_sentencepiece_length=section.max_piece_length)
