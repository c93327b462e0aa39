"""Tests of agent.prompts (prompt builders) and agent.modules (parsers, ideal-output renderers)."""

import pytest

from agentflow_jax.agent import modules, prompts
from agentflow_jax.agent.memory import Memory
from agentflow_jax.agent.modules import ExecutorCommand, GeneratorOutput, PlannerStep, VerifierDecision
from agentflow_jax.tools.base import Tool, ToolArgument, ToolCall, ToolMetadata, Toolbox

SEARCH = ToolMetadata(
    name="Wiki_Search_Tool",
    description="Searches the encyclopedia.",
    inputs=(ToolArgument("query", "str", "what to look up"), ToolArgument("top_k", "int", "passages", False)),
    output_type="str",
    demo_commands=(('{"query": "Velmora founded"}', "finds when Velmora was founded"),),
    limitations="Only encyclopedia pages.",
    best_practices="Use names.",
)
PYTHON = ToolMetadata(
    name="Python_Code_Generator_Tool",
    description="Writes and runs Python.",
    inputs=(ToolArgument("query", "str", "the computation"),),
    output_type="str",
)
TOOLS = (SEARCH, PYTHON)

SEARCH_FULL = ("Tool: Wiki_Search_Tool\n"
               "Description: Searches the encyclopedia.\n"
               "Inputs: query (str, required): what to look up; top_k (int, optional): passages\n"
               "Output: str\n"
               "Examples:\n"
               '- {"query": "Velmora founded"} -> finds when Velmora was founded\n'
               "Limitations: Only encyclopedia pages.\n"
               "Best practices: Use names.")
PYTHON_FULL = ("Tool: Python_Code_Generator_Tool\n"
               "Description: Writes and runs Python.\n"
               "Inputs: query (str, required): the computation\n"
               "Output: str")


class _EchoTool(Tool):
    def __init__(self, metadata: ToolMetadata):
        self.metadata = metadata

    def run(self, **arguments):
        return str(arguments)


# ----------------------------------------------------------------------------- toolbox rendering

def test_render_tool_full():
    assert prompts.render_tool(SEARCH) == SEARCH_FULL
    assert prompts.render_tool(PYTHON) == PYTHON_FULL


def test_render_toolbox_sorted_by_name_and_order_independent():
    assert prompts.render_toolbox(TOOLS) == PYTHON_FULL + "\n\n" + SEARCH_FULL
    assert prompts.render_toolbox((PYTHON, SEARCH)) == prompts.render_toolbox(TOOLS)


def test_render_toolbox_compact():
    assert prompts.render_toolbox(TOOLS, compact=True) == (
        "- Python_Code_Generator_Tool(query: str): Writes and runs Python.\n"
        "- Wiki_Search_Tool(query: str, top_k?: int): Searches the encyclopedia.")


def test_toolbox_object_renders_like_its_metadata():
    toolbox = Toolbox([_EchoTool(SEARCH), _EchoTool(PYTHON)], max_workers=1)
    assert prompts.render_toolbox(toolbox) == prompts.render_toolbox(TOOLS)


# ----------------------------------------------------------------------------- prompt builders

def test_planner_prompt_exact_text_for_empty_memory():
    memory = Memory("What is 4817 times 36?").with_analysis("Needs multiplication.")
    messages = prompts.build_planner_prompt(memory, TOOLS, step=1, max_steps=3, compact_tools=True)
    expected_user = (
        "Query: What is 4817 times 36?\n\n"
        "Query analysis: Needs multiplication.\n\n"
        "Tools:\n"
        "- Python_Code_Generator_Tool(query: str): Writes and runs Python.\n"
        "- Wiki_Search_Tool(query: str, top_k?: int): Searches the encyclopedia.\n\n"
        "Previous steps:\nNone yet.\n\n"
        "Plan step 1 of at most 3. Pick the one tool that best advances what is still missing; "
        "do not repeat a step that already succeeded.\n"
        "Reply with exactly these four lines, labels as written here (no numbers, no markdown), "
        "and nothing after the tool name:\n"
        "Justification: <why this tool now>\n"
        "Context: <facts from the query and previous steps that the tool needs>\n"
        "Sub-Goal: <one specific task for the tool>\n"
        "Tool Name: <one tool name copied exactly from the list above>")
    assert messages == ({"role": "system", "content": prompts.PLANNER_SYSTEM},
                        {"role": "user", "content": expected_user})


def test_planner_prompt_includes_budgeted_memory_and_full_tools():
    memory = Memory("q").add_turn(tool_name="Wiki_Search_Tool", sub_goal="find", command="c",
                                  result="z" * 300, ok=True)
    user = prompts.build_planner_prompt(memory, TOOLS, step=2, max_steps=3, memory_budget_chars=100)[1]["content"]
    assert "Previous steps:\n" + memory.render(100) + "\n\nPlan step 2 of at most 3." in user
    assert "z" * 300 not in user and "…[truncated" in user
    assert PYTHON_FULL + "\n\n" + SEARCH_FULL in user


@pytest.mark.parametrize("step, max_steps", [(0, 3), (4, 3)])
def test_planner_prompt_rejects_step_outside_range(step, max_steps):
    with pytest.raises(ValueError, match="planner step"):
        prompts.build_planner_prompt(Memory("q"), TOOLS, step=step, max_steps=max_steps)


def test_executor_prompt_exact_text():
    messages = prompts.build_executor_prompt("How old is Velmora?", "Find the founding year of Velmora.",
                                             SEARCH, "Velmora is a city.")
    expected_user = (
        "Query: How old is Velmora?\n"
        "Context: Velmora is a city.\n"
        "Sub-goal: Find the founding year of Velmora.\n\n"
        + SEARCH_FULL + "\n\n"
        "Write the call that achieves the sub-goal as one JSON object in exactly this form, with no code "
        "and no explanation:\n"
        '{"tool_name": "Wiki_Search_Tool", "arguments": {"query": "<str>", "top_k": "<int>"}}\n'
        "Give every required input and only the inputs listed; the string values must hold the whole "
        "request, with every name and number it needs.")
    assert messages == ({"role": "system", "content": prompts.EXECUTOR_SYSTEM},
                        {"role": "user", "content": expected_user})


def test_verifier_prompt_ends_with_conclusion_instruction():
    memory = Memory("q", "analysis").add_turn(tool_name="A", sub_goal="g", command="c", result="r", ok=True)
    system, user = prompts.build_verifier_prompt(memory, TOOLS, compact_tools=True)
    assert system == {"role": "system", "content": prompts.VERIFIER_SYSTEM}
    assert user["content"].startswith("Query: q\n\nQuery analysis: analysis\n\nTools:\n- Python_Code")
    assert "Steps so far:\nStep 1: Tool: A\nSub-goal: g\nCommand: c\nResult: r\n\n" in user["content"]
    assert user["content"].endswith("end with exactly one line: 'Conclusion: STOP' if the query is answered, "
                                     "or 'Conclusion: CONTINUE' if more steps are needed (STOP or CONTINUE in "
                                     "capitals, nothing after it).")


def test_generator_prompt_asks_for_answer_tags():
    system, user = prompts.build_generator_prompt(Memory("What is 2+2?"))
    assert system["content"] == prompts.GENERATOR_SYSTEM
    assert user["content"] == ("Query: What is 2+2?\n\nSteps taken:\nNone yet.\n\n"
                               "Using these results, reason briefly, then give the final answer inside "
                               "<answer></answer> and write nothing after </answer>. Keep the answer short: "
                               "a number, name or phrase (for a multiple-choice question, the option's letter).")


def test_query_analysis_prompt_lists_tools():
    system, user = prompts.build_query_analysis_prompt("What is 2+2?", TOOLS, compact_tools=True)
    assert system["content"] == prompts.QUERY_ANALYSIS_SYSTEM
    assert user["content"].startswith("Query: What is 2+2?\n\nTools:\n- Python_Code_Generator_Tool(query: str)")


def test_prompts_are_deterministic():
    memory = Memory("q", "a").add_turn(tool_name="A", sub_goal="g", command="c", result="r", ok=True)
    build = lambda: prompts.build_planner_prompt(memory, TOOLS, step=2, max_steps=3)  # noqa: E731
    assert build() == build()


# ----------------------------------------------------------------------------- planner parsing

def test_parse_planner_labelled_fields():
    text = ("Justification: The number needs computing.\n"
            "Context: 4817 and 36.\n"
            "Sub-Goal: Multiply 4817 by 36.\n"
            "Tool Name: Python_Code_Generator_Tool")
    assert modules.parse_planner_output(text, TOOLS) == PlannerStep(
        "The number needs computing.", "4817 and 36.", "Multiply 4817 by 36.",
        "Python_Code_Generator_Tool", "Python_Code_Generator_Tool", None)


def test_parse_planner_strips_bold_and_takes_last_block():
    text = ("Draft:\nContext: old\nSub-Goal: old goal\nTool Name: Wiki_Search_Tool\n\n"
            "Final answer:\n**Justification:** Need a fact.\n**Context:** Velmora.\n"
            "**Sub-Goal:** Find the year.\n**Tool Name:** **wiki search tool**\n")
    assert modules.parse_planner_output(text, TOOLS) == PlannerStep(
        "Need a fact.", "Velmora.", "Find the year.", "Wiki_Search_Tool", "wiki search tool", None)


def test_parse_planner_ignores_text_after_tool_name_line():
    text = "Context: c\nSub goal: g\nTool_Name: PYTHON code_generator tool.\nI hope this helps!"
    step = modules.parse_planner_output(text, TOOLS)
    assert step == PlannerStep("", "c", "g", "Python_Code_Generator_Tool", "PYTHON code_generator tool", None)


def test_parse_planner_tool_name_on_next_line():
    step = modules.parse_planner_output("Context: c\nSub-Goal: g\nTool Name:\n  Wiki_Search_Tool\n", TOOLS)
    assert step.tool_name == "Wiki_Search_Tool" and step.parse_error is None


def test_parse_planner_unknown_tool_keeps_raw_name():
    step = modules.parse_planner_output("Context: c\nSub-Goal: g\nTool Name: Calculator", TOOLS)
    assert step == PlannerStep("", "c", "g", None, "Calculator", None)


def test_parse_planner_json_with_fence_and_key_variants():
    text = ('Here is my plan:\n```json\n{"Justification": "j", "Context": "c", "Sub-Goal": "g", '
            '"Tool Name": "python_code_generator_tool"}\n```')
    assert modules.parse_planner_output(text, TOOLS) == PlannerStep(
        "j", "c", "g", "Python_Code_Generator_Tool", "python_code_generator_tool", None)


def test_parse_planner_json_takes_precedence_over_labels():
    text = 'Context: x\nSub-Goal: y\nTool Name: Wiki_Search_Tool\n{"sub goal": "g", "tool_name": "Calculator"}'
    assert modules.parse_planner_output(text, TOOLS) == PlannerStep("", "", "g", None, "Calculator", None)


def test_parse_planner_json_without_planner_keys_falls_back_to_labels():
    text = 'Context: uses {"a": 1}\nSub-Goal: g\nTool Name: Wiki_Search_Tool'
    assert modules.parse_planner_output(text, TOOLS) == PlannerStep(
        "", 'uses {"a": 1}', "g", "Wiki_Search_Tool", "Wiki_Search_Tool", None)


@pytest.mark.parametrize("text, problem", [
    ("I will search for it.", "no 'Tool Name:' field"),
    ("", "no 'Tool Name:' field"),
    ("Context: c\nTool Name: Wiki_Search_Tool", "no 'Sub-Goal:' field before 'Tool Name:'"),
    ("Sub-Goal: g\nTool Name: Wiki_Search_Tool", "no 'Context:' field before 'Sub-Goal:'"),
    ('{"sub_goal": "g"}', "no 'Tool Name:' field"),
])
def test_parse_planner_unparsable_sets_parse_error(text, problem):
    step = modules.parse_planner_output(text, TOOLS)
    assert step == PlannerStep("", "", "", None, "", step.parse_error)
    assert step.parse_error == (f"unparsable planner output ({problem}); expected 'Justification: … Context: … "
                                "Sub-Goal: … Tool Name: …' or a JSON object with sub_goal and tool_name")


def test_parse_planner_empty_tool_name_is_an_error():
    step = modules.parse_planner_output("Context: c\nSub-Goal: g\nTool Name:   ", TOOLS)
    assert step == PlannerStep("", "c", "g", None, "", "the Tool Name field is empty")


def test_parse_planner_matches_against_toolbox():
    toolbox = Toolbox([_EchoTool(SEARCH), _EchoTool(PYTHON)], max_workers=1)
    step = modules.parse_planner_output("Context: c\nSub-Goal: g\nTool Name: WIKI SEARCH TOOL", toolbox)
    assert step.tool_name == "Wiki_Search_Tool"


def test_planner_render_parse_round_trip():
    step = PlannerStep("Need the year.", "Velmora is a city.\nIt is old.", "Find when Velmora was founded.",
                       "Wiki_Search_Tool", "Wiki_Search_Tool", None)
    rendered = modules.render_planner_output(step)
    assert rendered == ("Justification: Need the year.\nContext: Velmora is a city.\nIt is old.\n"
                        "Sub-Goal: Find when Velmora was founded.\nTool Name: Wiki_Search_Tool")
    assert modules.parse_planner_output(rendered, TOOLS) == step


def test_render_planner_output_of_unknown_tool_writes_raw_name():
    step = PlannerStep("j", "c", "g", None, "Calculator", None)
    assert modules.render_planner_output(step).endswith("\nTool Name: Calculator")
    assert modules.parse_planner_output(modules.render_planner_output(step), TOOLS) == step


# ----------------------------------------------------------------------------- executor parsing

def test_parse_executor_plain_json():
    text = '{"tool_name": "Wiki_Search_Tool", "arguments": {"query": "Velmora"}}'
    expected = ExecutorCommand(ToolCall("Wiki_Search_Tool", {"query": "Velmora"}))
    assert modules.parse_executor_output(text) == expected


def test_parse_executor_fenced_with_prose_and_braces_in_strings():
    text = ('Sure! I will compute it.\n```json\n{"tool_name": "Python_Code_Generator_Tool", '
            '"arguments": {"query": "print({1: 2})"}}\n```\nThis prints a dict {like this}.')
    command = modules.parse_executor_output(text)
    assert command == ExecutorCommand(ToolCall("Python_Code_Generator_Tool", {"query": "print({1: 2})"}))


def test_parse_executor_takes_last_call_object():
    text = ('{"tool_name": "Wiki_Search_Tool", "arguments": {"query": "first"}}\n'
            'Better:\n{"tool_name": "Wiki_Search_Tool", "arguments": {"query": "second"}}\n{"note": 1}')
    assert modules.parse_executor_output(text).tool_call == ToolCall("Wiki_Search_Tool", {"query": "second"})


def test_parse_executor_expected_tool_fills_missing_name_and_canonicalises():
    assert modules.parse_executor_output('{"arguments": {"query": "x"}}', expected_tool="Wiki_Search_Tool") == \
        ExecutorCommand(ToolCall("Wiki_Search_Tool", {"query": "x"}))
    command = modules.parse_executor_output('{"Tool Name": "wiki search tool", "arguments": {}}',
                                            expected_tool="Wiki_Search_Tool")
    assert command == ExecutorCommand(ToolCall("Wiki_Search_Tool", {}))


def test_parse_executor_rejects_other_tool_than_planned():
    command = modules.parse_executor_output('{"tool_name": "Python_Code_Generator_Tool", "arguments": {}}',
                                            expected_tool="Wiki_Search_Tool")
    assert command == ExecutorCommand(
        None, "the call names tool 'Python_Code_Generator_Tool' but the planner chose 'Wiki_Search_Tool'")


EXPECTED_SHAPE = '; expected one JSON object {"tool_name": ..., "arguments": {...}}'


@pytest.mark.parametrize("text, problem", [
    ("I would search for Velmora.", "no JSON object found"),
    ('["Wiki_Search_Tool", "Velmora"]', "no JSON object found"),
    ('"just a string"', "no JSON object found"),
    ('{"tool_name": "Wiki_Search_Tool", "arguments": {"query": "unterminated"', "no JSON object found"),
    ('{"tool_name": "Wiki_Search_Tool"}', "the JSON object has no 'arguments'"),
    ('{"query": "Velmora"}', "the JSON object has no 'arguments'"),  # arguments alone need the planner's tool
    ('{"tool_name": "Wiki_Search_Tool", "arguments": ["Velmora"]}', "'arguments' must be a JSON object, got list"),
    ('{"arguments": {"query": "x"}}', "'tool_name' is missing or not a non-empty string"),
    ('{"tool_name": 7, "arguments": {}}', "'tool_name' is missing or not a non-empty string"),
])
def test_parse_executor_errors(text, problem):
    assert modules.parse_executor_output(text) == ExecutorCommand(None, problem + EXPECTED_SHAPE)


def test_executor_render_parse_round_trip():
    call = ToolCall("Python_Code_Generator_Tool", {"query": "Compute 4817 * 36.", "flags": [1, "a"]})
    rendered = modules.render_executor_output(call)
    assert rendered == ('{"tool_name": "Python_Code_Generator_Tool", '
                        '"arguments": {"query": "Compute 4817 * 36.", "flags": [1, "a"]}}')
    assert modules.parse_executor_output(rendered) == ExecutorCommand(call)


# ----------------------------------------------------------------------------- verifier parsing

@pytest.mark.parametrize("text, stop, reasoning", [
    ("The result answers it.\nConclusion: STOP", True, "The result answers it."),
    ("Missing the second year.\nConclusion: CONTINUE", False, "Missing the second year."),
    ("**Conclusion:** **stop**", True, ""),
    ('Done.\nconclusion: "Stop".', True, "Done."),
    ("Conclusion: CONTINUE\nOn reflection it is answered.\nConclusion: STOP", True,
     "Conclusion: CONTINUE\nOn reflection it is answered."),
])
def test_parse_verifier_last_conclusion(text, stop, reasoning):
    assert modules.parse_verifier_output(text) == VerifierDecision(stop, reasoning, None)


@pytest.mark.parametrize("text", ["I think we should stop now.", "", "Conclusion: maybe"])
def test_parse_verifier_without_conclusion_continues(text):
    decision = modules.parse_verifier_output(text)
    assert decision == VerifierDecision(False, text.strip(),
                                        "no 'Conclusion: STOP' or 'Conclusion: CONTINUE' found; continuing")


@pytest.mark.parametrize("reasoning, stop, rendered", [
    ("All parts answered.", True, "All parts answered.\nConclusion: STOP"),
    ("", False, "Conclusion: CONTINUE"),
])
def test_verifier_render_parse_round_trip(reasoning, stop, rendered):
    assert modules.render_verifier_output(reasoning, stop) == rendered
    assert modules.parse_verifier_output(rendered) == VerifierDecision(stop, reasoning, None)


# ----------------------------------------------------------------------------- generator parsing

@pytest.mark.parametrize("text, expected", [
    ("4817 * 36 = 173412.\n<answer>173412</answer>", GeneratorOutput("173412", "4817 * 36 = 173412.")),
    ("<answer>1</answer> no, wait <ANSWER> 2 </Answer> done", GeneratorOutput("2", "<answer>1</answer> no, wait")),
    ("Year found.\n<answer>1642", GeneratorOutput("1642", "Year found.")),
    ("<answer></answer>", GeneratorOutput("", "")),
    ("I do not know.", GeneratorOutput(None, "I do not know.")),
])
def test_parse_generator_last_answer(text, expected):
    assert modules.parse_generator_output(text) == expected
    assert modules.extract_answer(text) == expected.answer


def test_generator_render_parse_round_trip():
    rendered = modules.render_generator_output("Velmora was founded in 1642.", "1642")
    assert rendered == "Velmora was founded in 1642.\n<answer>1642</answer>"
    assert modules.parse_generator_output(rendered) == GeneratorOutput("1642", "Velmora was founded in 1642.")


# ----------------------------------------------------------------------------- query analysis

def test_query_analysis_parse_and_render():
    assert modules.parse_query_analysis("  Needs a lookup.\n") == "Needs a lookup."
    assert modules.parse_query_analysis("") == ""
    assert modules.render_query_analysis_output("Needs a lookup.\n") == "Needs a lookup."


# ----------------------------------------------------------------------------- behaviour found by review

def test_executor_json_with_single_backslash_latex_keeps_the_text_as_written():
    # What 7B models write: LaTeX with single backslashes inside a JSON string. \f and \t are JSON
    # escapes (form feed, tab) and \l, \s, \c are invalid ones; the text must survive as written.
    latex = r"Compute \lim_{x \to 0} \frac{\sin x}{x} + \sqrt{2} \cdot 3 \times 4, \neq \beta \left( \right) \(x\)"
    text = 'Here is the call:\n```json\n{"tool_name": "Python_Code_Generator_Tool", "arguments": {"query": "' + latex + '"}}\n```'
    command = modules.parse_executor_output(text, expected_tool="Python_Code_Generator_Tool")
    assert command == ExecutorCommand(ToolCall("Python_Code_Generator_Tool", {"query": latex}))


@pytest.mark.parametrize("json_text, value", [
    (r'"line 1\nline 2"', "line 1\nline 2"),            # a real newline escape before an ordinary word
    (r'"tab\there"', "tab\there"),                      # \there is not LaTeX: a tab, then "here"
    (r'"quote \" and \\frac and \/ and \u00e9"', 'quote " and \\frac and / and é'),
    (r'"\neq \nu \right \times \text{m} \theta"', r"\neq \nu \right \times \text{m} \theta"),
    (r'"\frac{a}{b} \beta \bmod \u2 \, \;"', r"\frac{a}{b} \beta \bmod \u2 \, \;"),
])
def test_json_strings_keep_real_escapes_and_literal_latex(json_text, value):
    text = '{"tool_name": "T", "arguments": {"query": ' + json_text + '}}'
    assert modules.parse_executor_output(text).tool_call.arguments == {"query": value}


@pytest.mark.parametrize("text, stop", [
    ("Conclusion: The query is fully answered, STOP.", True),
    ("All parts are known.\nConclusion: The memory answers the query; STOP", True),
    ("Conclusion: Information is still missing, so CONTINUE.", False),
    ("Conclusion: CONTINUE. We should not stop yet.", False),
    ("**Conclusion:**\n**STOP**", True),
    ("### Conclusion\nThe year is still unknown. CONTINUE", False),
])
def test_verifier_conclusion_written_in_a_sentence(text, stop):
    decision = modules.parse_verifier_output(text)
    assert decision.stop is stop and decision.parse_error is None
