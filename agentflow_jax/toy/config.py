"""The toy world's own config sections, all under `config.toy` (the rest of a toy config is an
ordinary training config, read by `experiment.read_experiment`):

  toy.world          the generated world (`toy.world.WorldConfig`)
  toy.demos          oracle demonstrations and how often the planner's are corrupted
  toy.tokenizer      the SentencePiece tokenizer trained on the world
  toy.architecture   the tiny Qwen2 trained from scratch, and its initialisation scale
  toy.warm_start     supervised training of the planner (and optionally the frozen roles), its report

The warm start writes under `<workdir>/warm_start` (`WarmStartPaths`); the training sections must
point there (model path, tokenizer, query files, search corpus), which `read_toy` checks.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from agentflow_jax.config_reader import ConfigError, as_dict, check_fields, check_keys, read_mapping, setting
from agentflow_jax.experiment import REFERENCE_ENGINE, Experiment
from agentflow_jax.models.config import Qwen2Config
from agentflow_jax.optim import OptimConfig
from agentflow_jax.supervised import check_batching
from agentflow_jax.toy.frozen import ROLES
from agentflow_jax.toy.world import WorldConfig


@dataclasses.dataclass(frozen=True)
class DemosSection:
    """Oracle demonstrations. `first_step` / `later_steps`: P(the planner demonstration picks the
    generalist) at step 1 / steps 2+, for (plain, tempting) phrasings; `passes` over the training
    questions; `role_limits`: demonstrations per role used for SFT (-1: all); `heldout_questions`
    replayed for the report (never trained on)."""

    first_step: tuple[float, float] = (0.15, 0.8)
    later_steps: tuple[float, float] = (0.1, 0.5)
    corruption_seed: int = 0
    passes: int = setting(1, min=1)
    role_limits: Mapping[str, int] = dataclasses.field(default_factory=dict)
    heldout_questions: int = setting(150, min=0)

    def __post_init__(self):
        check_fields(self)
        unknown = sorted(set(self.role_limits) - set(ROLES))
        if unknown:
            raise ValueError(f"role_limits names unknown role(s) {unknown}; roles: {list(ROLES)}")
        if not all(0 <= p <= 1 for p in self.first_step + self.later_steps):
            raise ValueError(f"first_step and later_steps are probabilities, got {self.first_step}, {self.later_steps}")


@dataclasses.dataclass(frozen=True)
class TokenizerSection:
    """SentencePiece BPE: vocabulary size, longest piece, training texts sampled, sampling seed."""

    vocab_size: int = setting(2560, min=300)
    max_piece_length: int = setting(32, min=1)
    max_texts: int = setting(4000, min=1)
    seed: int = 0

    def __post_init__(self):
        check_fields(self)


@dataclasses.dataclass(frozen=True)
class ArchitectureSection:
    """A tiny Qwen2 (vocabulary = the tokenizer's). `head_dim` 0 = hidden_size // num_heads. Qwen's
    N(0, 0.02) initialisation is for width ~3584: `init_embed_std` and `init_attn_scale` rescale it
    (`toy.warm_start.scale_init`)."""

    hidden_size: int = setting(128, min=1)
    intermediate_size: int = setting(384, min=1)
    num_layers: int = setting(4, min=1)
    num_heads: int = setting(4, min=1)
    num_kv_heads: int = setting(2, min=1)
    head_dim: int = setting(0, min=0)
    tie_word_embeddings: bool = True
    rope_theta: float = setting(10000.0, above=0.0)
    rms_norm_eps: float = setting(1e-6, above=0.0)
    init_embed_std: float = setting(0.1, above=0.0)
    init_attn_scale: float = setting(2.0, above=0.0)

    def __post_init__(self):
        check_fields(self)

    def model_config(self, vocab_size: int, max_positions: int) -> Qwen2Config:
        return Qwen2Config(vocab_size=vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                           num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim or None,
                           rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
                           tie_word_embeddings=self.tie_word_embeddings, max_position_embeddings=max_positions)


@dataclasses.dataclass(frozen=True)
class WarmStartSection:
    """Supervised warm start: the roles trained (default the planner; every role when the frozen
    modules are the warm-started model itself), optimizer steps and settings, batching (length
    buckets, tokens per batch), LM-head chunk, seed, log interval, and the report: held-out
    demonstrations decoded per role, samples per planner prompt at T = 1, held-out questions for
    the whole agent, batch size."""

    roles: tuple[str, ...] = ("planner",)
    steps: int = setting(160, min=0)
    optim: OptimConfig = OptimConfig(learning_rate=3e-3, b2=0.98, warmup_steps=30, schedule="cosine",
                                     end_lr_fraction=0.05)
    tokens_per_batch: int = setting(3072, min=1)
    length_buckets: tuple[int, ...] = (128, 160, 192, 256)
    chunk_size: int = setting(512, min=1)
    seed: int = 0
    log_every: int = setting(25, min=1)
    eval_per_role: int = setting(64, min=0)
    eval_sampled_n: int = setting(4, min=0)
    eval_agent_questions: int = setting(150, min=0)
    eval_batch_size: int = setting(64, min=1)

    def __post_init__(self):
        check_fields(self)
        unknown = sorted(set(self.roles) - set(ROLES))
        if unknown or not self.roles:
            raise ValueError(f"roles must name roles among {list(ROLES)}, got {list(self.roles)}")
        check_batching(self.length_buckets, self.tokens_per_batch)


@dataclasses.dataclass(frozen=True)
class WarmStartPaths:
    """Where the warm start writes, under `<workdir>/warm_start`."""

    root: str

    @property
    def world(self) -> str:
        return os.path.join(self.root, "world")

    @property
    def corpus(self) -> str:
        return os.path.join(self.world, "corpus.jsonl")

    @property
    def demos_train(self) -> str:
        return os.path.join(self.root, "demos_train.jsonl")

    @property
    def demos_heldout(self) -> str:
        return os.path.join(self.root, "demos_heldout.jsonl")

    @property
    def tokenizer(self) -> str:
        return os.path.join(self.root, "tokenizer.model")

    @property
    def model(self) -> str:
        return os.path.join(self.root, "model")

    @property
    def manifest(self) -> str:
        return os.path.join(self.root, "warm_start.json")

    @property
    def report(self) -> str:
        return os.path.join(self.root, "warm_start_report.json")

    def queries(self, split: str) -> str:
        return os.path.join(self.world, f"{split}_queries.jsonl")


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """The toy sections, and the training run they feed."""

    world: WorldConfig
    demos: DemosSection
    tokenizer: TokenizerSection
    architecture: ArchitectureSection
    warm_start: WarmStartSection
    experiment: Experiment

    @property
    def paths(self) -> WarmStartPaths:
        return WarmStartPaths(self.experiment.path("warm_start"))

    @property
    def frozen_is_the_model(self) -> bool:
        """Whether the warm-started model itself serves the frozen roles (else the ideal engine)."""
        return self.experiment.engines.frozen == REFERENCE_ENGINE


_SECTIONS = {"world": WorldConfig, "demos": DemosSection, "tokenizer": TokenizerSection,
             "architecture": ArchitectureSection, "warm_start": WarmStartSection}


def read_toy(config: Any, experiment: Experiment) -> ToyConfig:
    """Checks `config.toy` and that the training sections read what the warm start writes."""
    source = experiment.source
    where = f"{source}: " if source else ""
    if "toy" not in config:
        raise ConfigError(f"{where}config lacks section 'toy' (keys {sorted(_SECTIONS)}); "
                          "see experiments/configs/tiny_cpu.py")
    toy = as_dict(config["toy"])
    check_keys("toy", toy, _SECTIONS, source=source)
    sections = {}
    for name, cls in _SECTIONS.items():
        if name not in toy:
            raise ConfigError(f"{where}config.toy lacks section {name!r}")
        sections[name] = read_mapping(as_dict(toy[name]), cls, path=f"toy.{name}", source=source)
    result = ToyConfig(**sections, experiment=experiment)
    _check_wiring(result, where)
    return result


def _check_wiring(toy: ToyConfig, where: str) -> None:
    """The training sections must read the warm start's files, and an all-model agent needs all roles."""
    paths, e = toy.paths, toy.experiment
    expected = {"model.path": (e.model.path, paths.model), "model.tokenizer": (e.model.tokenizer, paths.tokenizer),
                "data.train_path": (e.data.train_path, paths.queries("train")),
                "data.eval_path": (e.data.eval_path, paths.queries("heldout")),
                "tools.settings.search.corpus_path": (dict(e.tools.settings.get("search") or {}).get("corpus_path"),
                                                      paths.corpus)}
    for key, (value, wanted) in expected.items():
        if value is None or os.path.normpath(value) != os.path.normpath(wanted):
            raise ConfigError(f"{where}config.{key} = {value!r}: a toy config reads the warm start's files; "
                              f"set it to {wanted!r} (derived from config.workdir)")
    untrained = sorted(set(ROLES) - set(toy.warm_start.roles))
    if toy.frozen_is_the_model and untrained:
        raise ConfigError(f"{where}config.engines.frozen = {REFERENCE_ENGINE!r} makes the warm-started model serve "
                          f"every role, but config.toy.warm_start.roles leaves {untrained} untrained; train all "
                          f"of {list(ROLES)} or name the ideal engine ('toy:ideal,<world dir>')")
