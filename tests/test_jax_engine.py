"""The in-process JAX engine inside a real rollout: exact token records and log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agentflow_jax.agent import prompts
from agentflow_jax.engines.jax_engine import JaxEngine, _runs_of_equal_length
from agentflow_jax.agent.rollout import RolloutConfig, SamplingParams, rollout_batch
from agentflow_jax.models import config as model_config, hf_io, qwen2
from agentflow_jax.models.tokenizer import SentencePieceTokenizer
from agentflow_jax.sampling import Sampler
from agentflow_jax.tools.base import Tool, ToolArgument, Toolbox, ToolMetadata


class EchoTool(Tool):
    metadata = ToolMetadata(name="Echo_Tool", description="Echoes text.",
                            inputs=(ToolArgument("text", "str", "text"),), output_type="str")

    def run(self, text):
        return text


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    toolbox = Toolbox([EchoTool()])
    texts = [prompts.build_query_analysis_prompt(f"What is {i} plus {i + 7}?", toolbox)[1]["content"]
             for i in range(40)]
    texts += ["Justification: j\nContext: c\nSub-Goal: echo\nTool Name: Echo_Tool", "Conclusion: STOP",
              "<answer>42</answer>", '{"tool_name": "Echo_Tool", "arguments": {"text": "hi"}}']
    return SentencePieceTokenizer.train(texts * 5, vocab_size=320, model_path=tmp_path_factory.mktemp("sp") / "t.model")


@pytest.fixture(scope="module")
def model(tokenizer):
    config = model_config.Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                               num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    return qwen2.init_random(config, seed=1)


def test_rollout_records_exact_tokens_and_logprobs(model, tokenizer):
    sampler = Sampler(model, max_cache_length=4096)
    planner = JaxEngine(sampler, tokenizer, seed=3)
    frozen = JaxEngine(sampler, tokenizer)
    config = RolloutConfig(max_turns=2, planner=SamplingParams(max_new_tokens=12, temperature=1.0),
                           analysis=SamplingParams(max_new_tokens=6), executor=SamplingParams(max_new_tokens=6),
                           verifier=SamplingParams(max_new_tokens=6), generator=SamplingParams(max_new_tokens=6),
                           compact_tools=True)
    trajectories = rollout_batch(["What is 3 plus 4?", "Echo hello."], n=3, planner=planner, frozen=frozen,
                                 toolbox=Toolbox([EchoTool()]), config=config)
    calls = [turn.planner for t in trajectories for turn in t.turns]
    assert len(calls) >= 6
    for call in calls:
        assert call.prompt_ids == tuple(tokenizer.encode_chat(call.messages))
        stopped = call.finish_reason == "stop"
        assert stopped == (call.token_ids[-1] in tokenizer.eos_token_ids)
        text_ids = call.token_ids[:-1] if stopped else call.token_ids
        assert tokenizer.decode(text_ids) == call.text
        assert len(call.logprobs) == len(call.token_ids) <= 12

        ids = jnp.asarray([call.prompt_ids + call.token_ids], jnp.int32)
        logits = model(ids)[0, len(call.prompt_ids) - 1:-1]  # temperature 1
        expected = jax.nn.log_softmax(logits)[jnp.arange(len(call.token_ids)), jnp.asarray(call.token_ids)]
        np.testing.assert_allclose(np.asarray(call.logprobs), np.asarray(expected), atol=1e-4)


def test_identical_requests_share_one_prefill():
    a, b = (1, 2, 3), (4, 5)
    assert _runs_of_equal_length([a, a, a, b, b, b]) == ([a, b], 3)
    assert _runs_of_equal_length([a, a, b]) == ([a, a, b], 1)
    assert _runs_of_equal_length([a, b, a, b]) == ([a, b, a, b], 1)
    assert _runs_of_equal_length([a]) == ([a], 1)


def test_groups_are_sampled_with_n(model, tokenizer, monkeypatch):
    sampler = Sampler(model, max_cache_length=2048)
    seen = []
    original = sampler.generate

    def spy(prompts, **kwargs):
        seen.append((len(prompts), kwargs["n"]))
        return original(prompts, **kwargs)

    monkeypatch.setattr(sampler, "generate", spy)
    engine = JaxEngine(sampler, tokenizer)
    from agentflow_jax.engines import GenerationRequest

    requests = [GenerationRequest(messages=({"role": "user", "content": q},), max_new_tokens=3, temperature=1.0)
                for q in ["one", "one", "two", "two"]]
    out = engine.generate(requests)
    assert seen == [(2, 2)] and len(out) == 4
    assert out[0].prompt_ids == out[1].prompt_ids != out[2].prompt_ids


def test_engine_from_spec_loads_a_directory(model, tokenizer, tmp_path):
    import shutil

    from agentflow_jax.engines import engine_from_spec

    hf_io.save_pretrained(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        engine_from_spec(f"jax:{tmp_path}")
    shutil.copy(tokenizer.model_path, tmp_path / "tokenizer.model")
    engine = engine_from_spec(f"jax:{tmp_path}", max_cache_length=512)
    assert isinstance(engine, JaxEngine) and engine.tokenizer.vocab_size == tokenizer.vocab_size
