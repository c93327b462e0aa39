"""Tests of agent.memory: immutability, pytree round trip, budgeted rendering, JSON round trip.

Expected strings below were worked out by hand from the format
"Step i: Tool: T\nSub-goal: G\nCommand: C\nResult: R" (header of the small turns = 49 chars) and the
marker "…[truncated N chars]" (21 chars for two-digit N, 22 for three-digit N).
"""

import random

import pytest

from agentflow_jax.agent.memory import Memory, Turn, format_command
from agentflow_jax.tools.base import ToolCall

HEADER_1 = "Step 1: Tool: A\nSub-goal: g1\nCommand: c1\nResult: "
HEADER_2 = "Step 2: Tool: B\nSub-goal: g2\nCommand: c2\nResult: "


def two_turn_memory() -> Memory:
    """Two turns whose blocks are 99 chars each (49-char header + 50-char result); full text 200 chars."""
    memory = Memory("q")
    memory = memory.add_turn(tool_name="A", sub_goal="g1", command="c1", result="r" * 50, ok=True)
    return memory.add_turn(tool_name="B", sub_goal="g2", command="c2", result="s" * 50, ok=True)


def test_headers_are_49_chars():
    assert len(HEADER_1) == 49 and len(HEADER_2) == 49


def test_updates_return_new_objects_and_leave_original_unchanged():
    empty = Memory("What is 2+2?")
    analysed = empty.with_analysis("arithmetic")
    one = analysed.add_turn(tool_name="A", sub_goal="add", command="c", result="4", ok=True)
    judged = one.with_verdict(stop=True)

    assert empty == Memory("What is 2+2?", "", ())
    assert analysed.query_analysis == "arithmetic" and analysed.turns == ()
    assert one.turns == (Turn("A", "add", "c", "4", True, None),)
    assert judged.turns == (Turn("A", "add", "c", "4", True, "STOP"),)
    assert one.turns[0].verdict is None
    assert judged.with_verdict(stop=False).turns[0].verdict == "CONTINUE"
    with pytest.raises(AttributeError):
        judged.query = "other"  # frozen


def test_with_verdict_only_touches_last_turn():
    memory = two_turn_memory().with_verdict(stop=False)
    assert [t.verdict for t in memory.turns] == [None, "CONTINUE"]


def test_with_verdict_without_turns_is_an_error():
    with pytest.raises(ValueError, match="add_turn"):
        Memory("q").with_verdict(stop=True)


def test_turn_rejects_unknown_verdict():
    with pytest.raises(ValueError, match="verdict"):
        Turn("A", "g", "c", "r", True, verdict="MAYBE")


def test_tool_call_command_is_stored_as_json_text():
    call = ToolCall("Python_Code_Generator_Tool", {"query": "4817*36"})
    memory = Memory("q").add_turn(tool_name="Python_Code_Generator_Tool", sub_goal="g", command=call,
                                  result="173412", ok=True)
    expected = '{"tool_name": "Python_Code_Generator_Tool", "arguments": {"query": "4817*36"}}'
    assert format_command(call) == expected
    assert memory.turns[0].command == expected


def test_memory_is_hashable_by_value():
    memory = two_turn_memory().with_analysis("a").with_verdict(stop=True)
    assert hash(memory) == hash(two_turn_memory().with_analysis("a").with_verdict(stop=True))


def test_render_empty_memory_is_empty():
    assert Memory("q").render(1000) == ""


def test_render_full_text_when_budget_allows():
    expected = HEADER_1 + "r" * 50 + "\n\n" + HEADER_2 + "s" * 50
    assert two_turn_memory().render(200) == expected
    assert two_turn_memory().render(10_000) == expected


def test_render_failed_turn_without_command():
    memory = Memory("q").add_turn(tool_name="X", sub_goal="g", command="", result="Error: boom", ok=False)
    assert memory.render(500) == "Step 1: Tool: X\nSub-goal: g\nCommand: (none)\nResult: Error: boom"


def test_render_does_not_show_verdicts_or_reprs():
    text = two_turn_memory().with_verdict(stop=True).render(1000)
    assert "STOP" not in text and "Turn(" not in text and "{'" not in text


def test_render_shortens_oldest_result_first():
    # excess 20: remove 41 chars from result 1 (41 - len(marker 21) = 20 saved).
    expected = HEADER_1 + "r" * 9 + "…[truncated 41 chars]" + "\n\n" + HEADER_2 + "s" * 50
    assert two_turn_memory().render(180) == expected


def test_render_then_shortens_newer_results():
    # Result 1 fully cut (saves 29, total 171), then 21 more from result 2: remove 42 chars.
    expected = (HEADER_1 + "…[truncated 50 chars]" + "\n\n"
                + HEADER_2 + "s" * 8 + "…[truncated 42 chars]")
    assert two_turn_memory().render(150) == expected


def test_render_drops_oldest_step_when_headers_do_not_fit():
    # Both steps at minimum need 142 chars; without step 1 the note (16) + full step 2 (99) fit.
    expected = "[Step 1 omitted]\n\n" + HEADER_2 + "s" * 50
    assert two_turn_memory().render(140) == expected


def test_render_drops_all_steps_then_gives_empty_text():
    assert two_turn_memory().render(60) == "[Steps 1-2 omitted]"
    assert two_turn_memory().render(18) == ""
    assert two_turn_memory().render(0) == ""


def test_render_marker_with_three_digit_count():
    # Excess 95 needs 117 removed chars: 117 - len("…[truncated 117 chars]") = 117 - 22 = 95.
    memory = Memory("q").add_turn(tool_name="A", sub_goal="g1", command="c1", result="x" * 200, ok=True)
    assert memory.render(154) == HEADER_1 + "x" * 83 + "…[truncated 117 chars]"


def test_render_keeps_result_shorter_than_marker():
    memory = Memory("q").add_turn(tool_name="A", sub_goal="g1", command="c1", result="tiny", ok=True)
    assert memory.render(len(HEADER_1) + 4) == HEADER_1 + "tiny"
    # "tiny" cannot shrink (its marker is 20 chars), so one char less drops the step.
    assert memory.render(len(HEADER_1) + 3) == "[Step 1 omitted]"


def test_render_never_exceeds_random_budgets_and_cuts_oldest_first():
    rng = random.Random(0)
    memory = Memory("q")
    for i in range(1, 5):
        memory = memory.add_turn(tool_name=f"T{i}", sub_goal=f"goal {i}", command=f"cmd {i}",
                                 result=f"result {i} " * rng.randint(5, 60), ok=True)
    full_length = len(memory.render(10**6))
    for budget in [rng.randint(0, full_length + 20) for _ in range(300)]:
        text = memory.render(budget)
        assert len(text) <= budget
        assert text == memory.render(budget)  # deterministic
        blocks = text.split("\n\n")
        truncated = ["…[truncated" in b for b in blocks if b.startswith("Step")]
        # Once a result is shortened, every older (kept) result is shortened too.
        assert truncated == sorted(truncated, reverse=True)
        if budget >= full_length:
            assert "…[truncated" not in text and "omitted" not in text


def test_json_round_trip():
    memory = two_turn_memory().with_analysis("needs two facts ünïcode").with_verdict(stop=False)
    text = memory.to_json()
    assert Memory.from_json(text) == memory
    assert memory.to_dict()["turns"][1] == {"tool_name": "B", "sub_goal": "g2", "command": "c2",
                                            "result": "s" * 50, "ok": True, "verdict": "CONTINUE"}


def test_from_json_names_missing_keys():
    with pytest.raises(ValueError, match="expected keys query"):
        Memory.from_json('{"turns": []}')
    with pytest.raises(ValueError, match="not a serialised Memory"):
        Memory.from_json('{"query": "q", "turns": [{"tool_name": "A"}]}')
