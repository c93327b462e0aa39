"""A corpus of outputs in the styles an off-the-shelf Qwen2.5-7B-Instruct writes for our prompts (markdown
bold, numbered fields, headings, JSON in code fences, Python-style calls, prose before and after, LaTeX
with single backslashes), for the planner, executor, verifier and generator, each parsed as intended."""

import pytest

from agentflow_jax.agent import modules
from agentflow_jax.rl import rewards
from agentflow_jax.tools.base import ToolCall
from agentflow_jax.tools.generator import GENERALIST_METADATA
from agentflow_jax.tools.python_coder import PYTHON_CODER_METADATA
from agentflow_jax.tools.web import GOOGLE_SEARCH_METADATA, WEB_RAG_METADATA, WIKIPEDIA_METADATA

TOOLS = (GENERALIST_METADATA, PYTHON_CODER_METADATA, GOOGLE_SEARCH_METADATA, WIKIPEDIA_METADATA, WEB_RAG_METADATA)
PY, WIKI, GOOGLE, WEB = ("Python_Code_Generator_Tool", "Wikipedia_RAG_Search_Tool", "Ground_Google_Search_Tool",
                         "Web_RAG_Search_Tool")

# (output, context, sub-goal, canonical tool) -- the justification is checked where given.
PLANNER = [
    ("Justification: The founding year is a fact to look up.\nContext: The city is Velmora.\n"
     "Sub-Goal: Find the year Velmora was founded.\nTool Name: Wikipedia_RAG_Search_Tool",
     "The city is Velmora.", "Find the year Velmora was founded.", WIKI),
    ("**Justification:** We need an exact product.\n**Context:** 4817 and 36.\n**Sub-Goal:** Multiply 4817 by 36.\n"
     "**Tool Name:** Python_Code_Generator_Tool", "4817 and 36.", "Multiply 4817 by 36.", PY),
    ("1. Justification: A web search finds recent news.\n2. Context: The event is the 2024 Olympics.\n"
     "3. Sub-Goal: Search for the host city of the 2024 Olympics.\n4. Tool Name: Ground_Google_Search_Tool",
     "The event is the 2024 Olympics.", "Search for the host city of the 2024 Olympics.", GOOGLE),
    ("1. **Justification**: The page holds the answer.\n2. **Context**: URL https://example.org/velmora\n"
     "3. **Sub-Goal**: Read the page and find the mayor.\n4. **Tool Name**: Web_RAG_Search_Tool",
     "URL https://example.org/velmora", "Read the page and find the mayor.", WEB),
    ("Based on the query analysis, the next step is a lookup.\n\nJustification: Wikipedia covers cities.\n"
     "Context: Velmora, a city.\nSub-Goal: Find the population of Velmora.\nTool Name: Wikipedia_RAG_Search_Tool",
     "Velmora, a city.", "Find the population of Velmora.", WIKI),
    ("Justification: Arithmetic is exact in code.\nContext: 12 and 7.\nSub-Goal: Compute 12 ** 7.\n"
     "Tool Name: Python_Code_Generator_Tool\n\nThis tool will return the exact value, which we can then verify.",
     "12 and 7.", "Compute 12 ** 7.", PY),
    ('Here is my plan:\n```json\n{\n  "justification": "Needs code.",\n  "context": "n = 20",\n'
     '  "sub_goal": "Compute the 20th Fibonacci number.",\n  "tool_name": "Python_Code_Generator_Tool"\n}\n```',
     "n = 20", "Compute the 20th Fibonacci number.", PY),
    ("### Justification\nThe query asks for a birth date.\n### Context\nThe person is Ada Lovelace.\n"
     "### Sub-Goal\nFind Ada Lovelace's birth date.\n### Tool Name\nWikipedia_RAG_Search_Tool",
     "The person is Ada Lovelace.", "Find Ada Lovelace's birth date.", WIKI),
    ("Justification: j\nContext: c\nSub-Goal: Search the web.\nTool Name: `Ground_Google_Search_Tool`",
     "c", "Search the web.", GOOGLE),
    ("Justification: j\nContext: c\nSub-Goal: Find the year.\n"
     "Tool Name: Wikipedia_RAG_Search_Tool (to look up the founding date)", "c", "Find the year.", WIKI),
    ("Justification: j\nContext: c\nSub-Goal: Solve it.\nTool Name: Python Code Generator Tool", "c", "Solve it.", PY),
    ("Justification: j\nContext: c\nSubgoal: Solve it.\nTool_name: python_code_generator_tool", "c", "Solve it.", PY),
    (r"Justification: A limit needs care." "\n" r"Context: We need $\lim_{x \to 0} \frac{\sin x}{x}$." "\n"
     r"Sub-Goal: Evaluate \(\lim_{x \to 0} \frac{\sin x}{x}\) symbolically." "\nTool Name: Python_Code_Generator_Tool",
     r"We need $\lim_{x \to 0} \frac{\sin x}{x}$.", r"Evaluate \(\lim_{x \to 0} \frac{\sin x}{x}\) symbolically.", PY),
    ('{"Justification": "General knowledge suffices.", "Context": "none", "Sub-Goal": "Answer directly.", '
     '"Tool Name": "Generalist_Solution_Generator_Tool"}\nI chose this because no lookup is needed.',
     "none", "Answer directly.", "Generalist_Solution_Generator_Tool"),
    ("- **Justification:** Need a fact.\n- **Context:** Velmora.\n- **Sub-Goal:** Find its river.\n"
     "- **Tool Name:** Wikipedia_RAG_Search_Tool", "Velmora.", "Find its river.", WIKI),
]


@pytest.mark.parametrize("text, context, sub_goal, tool", PLANNER)
def test_planner_outputs(text, context, sub_goal, tool):
    step = modules.parse_planner_output(text, TOOLS)
    assert step.parse_error is None
    assert (step.context, step.sub_goal, step.tool_name) == (context, sub_goal, tool)


def test_planner_unknown_tool_is_kept_raw():
    step = modules.parse_planner_output("Justification: j\nContext: c\nSub-Goal: g\nTool Name: Calculator_Tool", TOOLS)
    assert (step.tool_name, step.raw_tool_name, step.parse_error) == (None, "Calculator_Tool", None)


LATEX = r"Compute \lim_{n \to \infty} \left(1 + \frac{1}{n}\right)^n and \sqrt{2} \cdot 3"
# (output, planner's tool, expected call)
EXECUTOR = [
    ('{"tool_name": "Python_Code_Generator_Tool", "arguments": {"query": "Compute 4817 * 36."}}', PY,
     ToolCall(PY, {"query": "Compute 4817 * 36."})),
    ('Sure! Here is the call:\n```json\n{"tool_name": "Wikipedia_RAG_Search_Tool", "arguments": {"query": '
     '"Velmora founding year"}}\n```\nThis searches Wikipedia for the founding year.', WIKI,
     ToolCall(WIKI, {"query": "Velmora founding year"})),
    ('```json\n{"tool_name": "Python_Code_Generator_Tool", "arguments": {"query": "' + LATEX + '"}}\n```', PY,
     ToolCall(PY, {"query": LATEX})),
    ("{'tool_name': 'Ground_Google_Search_Tool', 'arguments': {'query': '2024 Olympics host city'}}", GOOGLE,
     ToolCall(GOOGLE, {"query": "2024 Olympics host city"})),
    ('```python\nexecution = tool.execute(query="Find the 20th Fibonacci number")\n```', PY,
     ToolCall(PY, {"query": "Find the 20th Fibonacci number"})),
    ("Wikipedia_RAG_Search_Tool(query='Ada Lovelace birth date')", WIKI,
     ToolCall(WIKI, {"query": "Ada Lovelace birth date"})),
    ('{"tool_name": "Wikipedia_RAG_Search_Tool", "query": "Velmora population"}', WIKI,
     ToolCall(WIKI, {"query": "Velmora population"})),
    ('{"query": "What is the capital of Australia?"}', "Generalist_Solution_Generator_Tool",
     ToolCall("Generalist_Solution_Generator_Tool", {"query": "What is the capital of Australia?"})),
    ('{"tool_name": "Ground_Google_Search_Tool", "arguments": "{\\"query\\": \\"tallest building 2023\\"}"}', GOOGLE,
     ToolCall(GOOGLE, {"query": "tallest building 2023"})),
    ('First draft: {"tool_name": "Python_Code_Generator_Tool", "arguments": {"query": "2+2"}}\n'
     'Corrected:\n{"tool_name": "Python_Code_Generator_Tool", "arguments": {"query": "Compute 2 ** 10."}}', PY,
     ToolCall(PY, {"query": "Compute 2 ** 10."})),
    ('{"tool_name": "python code generator tool", "arguments": {"query": "Sum 1..100"}}', PY,
     ToolCall(PY, {"query": "Sum 1..100"})),
    ('```\n{"tool_name": "Web_RAG_Search_Tool", "arguments": {"query": "Who is the mayor?", '
     '"url": "https://example.org/velmora"}}\n```', WEB,
     ToolCall(WEB, {"query": "Who is the mayor?", "url": "https://example.org/velmora"})),
    ('{"tool_name": "Python_Code_Generator_Tool", "arguments": {"query": "Print the primes below 20,\\n'
     'one per line, using a loop {i for i in range(20)}."}}', PY,
     ToolCall(PY, {"query": "Print the primes below 20,\none per line, using a loop {i for i in range(20)}."})),
]


@pytest.mark.parametrize("text, tool, call", EXECUTOR)
def test_executor_outputs(text, tool, call):
    assert modules.parse_executor_output(text, expected_tool=tool) == modules.ExecutorCommand(call)


VERIFIER = [
    ("The memory gives Velmora's founding year, 1642, which answers the query.\nConclusion: STOP", True),
    ("The population is still unknown.\n\n**Conclusion:** CONTINUE", False),
    ("Conclusion: The query is fully answered, STOP.", True),
    ("### Analysis\nStep 1 found only the first city.\n### Conclusion\nThe second year is missing. CONTINUE", False),
    ("1. The query asks for a product.\n2. Step 1 printed 173412.\n3. Nothing else is asked.\n\nConclusion: **STOP**",
     True),
    ("The search failed.\nConclusion: 'CONTINUE'", False),
    ("Conclusion: CONTINUE. We cannot stop until both years are known.", False),
    ("All parts of the query are answered by step 2.\n\n**STOP**", True),
    ("Everything needed is in the memory.\nConclusion: Stop", True),
    ("Conclusion: CONTINUE\nOn second thought, step 2 gives the year.\nConclusion: STOP", True),
    ("We should not stop yet: the unit is unclear.\n**Conclusion**: CONTINUE", False),
]


@pytest.mark.parametrize("text, stop", VERIFIER)
def test_verifier_outputs(text, stop):
    decision = modules.parse_verifier_output(text)
    assert decision.parse_error is None and decision.stop is stop


# (output, gold, scorer kind, the text scored)
GENERATOR = [
    ("4817 * 36 = 173412.\n<answer>173412</answer>", "173412", "math", "173412"),
    ("The limit evaluates to e.\n<answer>\\boxed{e}</answer>", "e", "math", "\\boxed{e}"),
    ("**Answer:** The total is 1,250 dollars.", "1250", "math", "1250"),
    ("The second option matches the symptoms.\n<answer>(B)</answer>", "B", "choice", "(B)"),
    ("Velmora is on the coast.\n<answer>\n  Paris \n</answer>", "Paris", "exact", "Paris"),
    ("<ANSWER>Shakespeare</ANSWER>", "William Shakespeare; Shakespeare", "exact", "Shakespeare"),
    ("Velmora was founded in 1642.\n<answer>1642", "1642", "math", "1642"),
    ("<answer>1641</answer> Wait, step 2 says 1642.\n<answer>1642</answer>", "1642", "math", "1642"),
    ("So the probability is $\\boxed{\\frac{1}{2}}$.", "0.5", "math", "\\frac{1}{2}"),
    ("Using all four numbers:\n<answer>(1+1+1)×8 = 24</answer>", "1 1 1 8", "game24", "(1+1+1)×8 = 24"),
    ("The best choice is C because the others contradict the lab values.\nFinal answer: C", "C", "choice",
     "Final answer: C"),
]


@pytest.mark.parametrize("text, gold, kind, scored", GENERATOR)
def test_generator_outputs(text, gold, kind, scored):
    answer = modules.parse_generator_output(text).answer
    text_scored = answer if answer is not None else rewards.answer_from_reply(text, kind)
    assert text_scored == scored
    assert rewards.score_answer(text_scored, gold, kind) == 1.0


def test_the_corpus_is_large_enough():
    assert len(PLANNER) + len(EXECUTOR) + len(VERIFIER) + len(GENERATOR) >= 40
