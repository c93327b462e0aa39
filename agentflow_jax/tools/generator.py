"""Generalist_Solution_Generator_Tool: one call of the frozen LLM on the query, nothing else.

It answers from the model's own knowledge, so on questions about facts the model has not seen its
answers are plausible in form and often wrong (the toy world relies on exactly that).
"""

from __future__ import annotations

from agentflow_jax.engines import Engine, GenerationRequest
from agentflow_jax.tools.base import Tool, ToolArgument, ToolMetadata

GENERALIST_METADATA = ToolMetadata(
    name="Generalist_Solution_Generator_Tool",
    description=("Asks a general-purpose language model to answer a question or carry out a text task "
                 "in one step, using only what the model already knows."),
    inputs=(ToolArgument("query", "str", "The complete question or instruction, with any context the "
                                         "model needs (it sees nothing else)."),),
    output_type="str - the model's answer as free text.",
    demo_commands=(
        ('{"query": "Summarise the main causes of the French Revolution in three sentences."}',
         "Get a short summary written from general knowledge."),
        ('{"query": "Rewrite this sentence in the passive voice: The committee approved the plan."}',
         "Perform a simple language task."),
    ),
    limitations=("No access to search, files or code execution; facts may be outdated or invented, "
                 "and arithmetic on large numbers is unreliable."),
    best_practices=("Use for reasoning, explanation, summarising or rewriting text already in the "
                    "context. Verify factual claims and exact computations with a search or code tool."),
)


class GeneralistSolutionTool(Tool):
    """Answers `query` with a single generation of the given (frozen) engine."""

    metadata = GENERALIST_METADATA

    def __init__(self, engine: Engine, *, max_new_tokens: int = 1024, temperature: float = 0.0):
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    def run(self, query: str) -> str:
        request = GenerationRequest(messages=({"role": "user", "content": query},),
                                    max_new_tokens=self.max_new_tokens, temperature=self.temperature)
        (generation,) = self.engine.generate([request])
        return generation.text.strip()
