"""The config of a training run: one frozen dataclass per section, read and checked by
`read_experiment` before any compute (see `config_reader` for the rules and the error format).

Sections (experiments/configs/base.py holds the shared defaults):

  seed, workdir      the run's seed; the directory every file the run writes goes under
  mesh               device mesh axis sizes, e.g. {"fsdp": -1} ({}: one device, no mesh)
  model              the planner: a local HF directory, its tokenizer, dtypes, remat, cache slots
  engines            the frozen modules' engine and the judge's, as engine specs
  data               training and evaluation query files, queries per step
  tools              tool short names and their settings (`tools.build_toolbox`)
  rollout            loop limits and the planner's sampling (`agent.rollout.RolloutConfig`)
  rl                 Flow-GRPO (`rl.trainer.TrainerConfig`, its `loss`: `rl.loss.LossConfig`)
  optim              the optimizer (`optim.OptimConfig`)
  train              steps, checkpoints, logging, HF export
  eval               periodic held-out evaluation

Extra top-level sections (e.g. the toy world's) are allowed only when named in `extra_sections`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Mapping, Sequence

from agentflow_jax.agent.rollout import RolloutConfig, SamplingParams
from agentflow_jax.config_reader import ConfigError, check_fields, check_keys, read_section, setting
from agentflow_jax.engines import Engine, engine_from_spec
from agentflow_jax.optim import OptimConfig
from agentflow_jax.rl.rewards import LLMJudge
from agentflow_jax.rl.trainer import FROZEN_ROLES, TrainerConfig
from agentflow_jax.tools import build_toolbox
from agentflow_jax.tools.base import Toolbox

REFERENCE_ENGINE = "reference"
"""`engines.frozen` value meaning: the planner's own frozen initial weights, through its sampler."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The planner. `path`: a local HF-format Qwen2 directory (never downloaded). `tokenizer`: "" for
    the model directory's own, "qwen2.5" for the offline Qwen2.5 BPE, a directory, or a SentencePiece
    `.model` file. `param_dtype` "" = `dtype`. The samplers' KV cache: `max_cache_length` slots per
    sequence, and at most `max_cache_rows` sequences per sampler call (0: all of a call's; a larger
    call runs in consecutive parts with the same samples, `Sampler.max_rows`)."""

    path: str
    tokenizer: str = ""
    dtype: str = setting("float32", choices=("float32", "bfloat16"))
    param_dtype: str = setting("", choices=("", "float32", "bfloat16"))
    remat: bool = False
    max_cache_length: int = setting(4096, min=2)
    max_cache_rows: int = setting(0, min=0)

    def __post_init__(self):
        check_fields(self)

    @property
    def tokenizer_spec(self) -> str:
        return self.tokenizer or self.path

    @property
    def storage_dtype(self) -> str:
        return self.param_dtype or self.dtype


@dataclasses.dataclass(frozen=True)
class EnginesSection:
    """Who serves the frozen modules and the reward judge: "reference" (the planner's initial weights,
    in-process) or an engine spec ("openai:URL,MODEL", "jax:DIR", "toy:ideal,WORLD_DIR", ...).

    Attributes:
      frozen: the engine of every frozen role (FROZEN_ROLES) not named in `roles`.
      roles: per-role overrides, e.g. {"verifier": "openai:http://127.0.0.1:8001/v1,Qwen/Qwen2.5-72B-Instruct"}.
      judge: the reward judge of queries of kind "judge" ("" when there are none).
    """

    frozen: str = REFERENCE_ENGINE
    roles: Mapping[str, str] = dataclasses.field(default_factory=dict)
    judge: str = ""

    def __post_init__(self):
        unknown = sorted(set(self.roles) - set(FROZEN_ROLES))
        if unknown:
            raise ValueError(f"roles names unknown role(s) {unknown}; roles: {list(FROZEN_ROLES)}")

    def spec_of(self, role: str) -> str:
        """The engine spec serving `role`."""
        return self.roles.get(role, self.frozen)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """JSON-lines query files (see `data.pipeline`) and queries per training step."""

    train_path: str
    eval_path: str
    batch_size: int = setting(32, min=1)

    def __post_init__(self):
        check_fields(self)


@dataclasses.dataclass(frozen=True)
class ToolsSection:
    """Tool short names in toolbox order and their settings (validated by `tools.build_toolbox`)."""

    names: tuple[str, ...]
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def build(self, engine: Engine | None) -> Toolbox:
        """The toolbox, its LLM tools calling `engine` (the frozen model)."""
        return build_toolbox(self.names, engine=engine, config=self.settings)


@dataclasses.dataclass(frozen=True)
class RolloutSection:
    """Training rollouts: loop limits, the planner's sampling, the frozen modules' token budget and
    the prompt shape (memory budget, compact tool list). `planner_frequency_penalty` (the reference
    samples its planner rollouts with 1.2) shapes what the planner samples; the PPO ratio still
    compares the policy's own log-probs (`rl.loss`), so the penalty makes the rollouts slightly
    off-policy, which the `sampler_old_abs_gap` metric shows."""

    max_turns: int = setting(3, min=1)
    max_time_s: float = setting(500.0, above=0.0)
    planner_temperature: float = setting(0.7, min=0.0)
    planner_top_p: float = setting(0.99, above=0.0, max=1.0)
    planner_max_new_tokens: int = setting(2048, min=1)
    planner_frequency_penalty: float = setting(0.0, min=-2.0, max=2.0)
    frozen_max_new_tokens: int = setting(2048, min=1)
    memory_budget_chars: int = setting(12_000, min=1)
    compact_tools: bool = False

    def __post_init__(self):
        check_fields(self)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """Steps, checkpoints (every `save_every` steps, the newest `keep_checkpoints` and the best by
    held-out accuracy kept), trajectories logged per step, progress bar, HF export at the end."""

    steps: int = setting(100, min=1)
    save_every: int = setting(2, min=1)
    keep_checkpoints: int = setting(3, min=1)
    log_trajectories: int = setting(4, min=0)
    progress_bar: bool = True
    export_hf: bool = True

    def __post_init__(self):
        check_fields(self)


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Held-out evaluation every `every` steps (and before training when `at_start`) on an evenly
    spread subset of `num_queries` evaluation queries, `batch_size` at a time, with the
    evaluation loop limits and planner temperature (0: greedy)."""

    every: int = setting(2, min=1)
    at_start: bool = True
    num_queries: int = setting(30, min=1)
    batch_size: int = setting(30, min=1)
    planner_temperature: float = setting(0.0, min=0.0)
    max_turns: int = setting(10, min=1)
    max_time_s: float = setting(300.0, above=0.0)

    def __post_init__(self):
        check_fields(self)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A checked training-run config (module docstring)."""

    seed: int
    workdir: str
    mesh: Mapping[str, int]
    model: ModelSection
    engines: EnginesSection
    data: DataSection
    tools: ToolsSection
    rollout: RolloutSection
    rl: TrainerConfig
    optim: OptimConfig
    train: TrainSection
    eval: EvalSection
    source: str | None = None

    def path(self, *parts: str) -> str:
        """A path under the run's workdir (every file a run writes goes there)."""
        return os.path.join(self.workdir, *parts)

    def rollout_config(self, *, evaluation: bool = False) -> RolloutConfig:
        """Loop limits and per-module sampling (greedy frozen modules; the planner as configured, or
        at the evaluation temperature and limits)."""
        r, e = self.rollout, self.eval
        frozen = SamplingParams(max_new_tokens=r.frozen_max_new_tokens)
        temperature = e.planner_temperature if evaluation else r.planner_temperature
        planner = SamplingParams(max_new_tokens=r.planner_max_new_tokens, temperature=temperature,
                                 top_p=r.planner_top_p if temperature > 0 else 1.0,
                                 frequency_penalty=0.0 if evaluation else r.planner_frequency_penalty)
        return RolloutConfig(max_turns=e.max_turns if evaluation else r.max_turns,
                             max_time_s=e.max_time_s if evaluation else r.max_time_s,
                             planner=planner, analysis=frozen, executor=frozen, verifier=frozen, generator=frozen,
                             memory_budget_chars=r.memory_budget_chars, compact_tools=r.compact_tools)


def frozen_engines(experiment: Experiment) -> dict[str, Engine | None]:
    """The engine of each frozen role (None: the planner's reference weights); one engine per distinct spec.
    Shared by training and the evaluate command."""
    built: dict[str, Engine | None] = {}
    for role in FROZEN_ROLES:
        spec = experiment.engines.spec_of(role)
        if spec not in built:
            built[spec] = None if spec == REFERENCE_ENGINE else engine_from_spec(spec)
    return {role: built[experiment.engines.spec_of(role)] for role in FROZEN_ROLES}


def reward_judge(experiment: Experiment, records: Sequence[Mapping[str, Any]]) -> LLMJudge | None:
    """The LLM judge of `engines.judge`, or None when it is empty; a ConfigError when some of `records`
    are scored by kind "judge" and no judge is configured."""
    judged = sum(r.get("kind") == "judge" for r in records)
    if not experiment.engines.judge:
        if judged:
            raise ConfigError(f"{experiment.source or 'config'}: {judged} queries are scored by kind 'judge' but "
                              "config.engines.judge is empty; name the judge's engine (e.g. 'openai:URL,MODEL')")
        return None
    return LLMJudge(engine_from_spec(experiment.engines.judge))


TOP_LEVEL = ("seed", "workdir", "mesh", "model", "engines", "data", "tools", "rollout", "rl", "optim", "train",
             "eval")


def read_experiment(config: Any, *, source: str | None = None, extra_sections: Iterable[str] = ()) -> Experiment:
    """Checks every section of a training config and returns them typed (raises ConfigError)."""
    where = f"{source}: " if source else ""
    if "toy" in config and "toy" not in extra_sections:
        raise ConfigError(f"{where}config.toy describes the CPU toy world, which builds its planner first: run "
                          f"python -m agentflow_jax.toy --config={source or '<this file>'}")
    seed, workdir, mesh = read_run_keys(config, set(TOP_LEVEL) | set(extra_sections), source=source)
    rollout = read_section(config, "rollout", RolloutSection, source=source)
    rl = read_section(config, "rl", TrainerConfig, source=source)
    rl = dataclasses.replace(rl, loss=dataclasses.replace(rl.loss, temperature=rollout.planner_temperature or 1.0))
    return Experiment(
        seed=seed, workdir=workdir, mesh=mesh,
        model=read_section(config, "model", ModelSection, source=source),
        engines=read_section(config, "engines", EnginesSection, source=source, required=False),
        data=read_section(config, "data", DataSection, source=source),
        tools=read_section(config, "tools", ToolsSection, source=source),
        rollout=rollout, rl=rl,
        optim=read_section(config, "optim", OptimConfig, source=source),
        train=read_section(config, "train", TrainSection, source=source),
        eval=read_section(config, "eval", EvalSection, source=source),
        source=source)


def read_run_keys(config: Any, top_level: Iterable[str], *, source: str | None = None
                  ) -> tuple[int, str, dict[str, int]]:
    """Checks that a run config's top-level keys are among `top_level` and returns its seed, workdir
    and mesh (axis sizes; {} = one device, no mesh). Raises ConfigError."""
    where = f"{source}: " if source else ""
    check_keys("", _top_level(config), top_level, source=source)
    for key, kind in (("seed", int), ("workdir", str)):
        if key not in config:
            raise ConfigError(f"{where}config lacks top-level key {key!r}")
        if not isinstance(config[key], kind) or isinstance(config[key], bool):
            raise ConfigError(f"{where}config.{key} = {config[key]!r}: expected {kind.__name__}")
    mesh = dict(config.get("mesh") or {})
    if any(not isinstance(size, int) or isinstance(size, bool) for size in mesh.values()):
        raise ConfigError(f"{where}config.mesh = {mesh!r}: expected axis sizes as ints, e.g. {{'fsdp': -1}}")
    return config["seed"], config["workdir"], mesh


def _top_level(config: Any) -> Mapping[str, Any]:
    return {key: None for key in (config.keys() if hasattr(config, "keys") else config)}
