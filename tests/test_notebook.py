"""The Colab notebook runs top to bottom in its short setting (AGENTFLOW_NOTEBOOK_SHORT=1), in a fresh
kernel of this interpreter with a fresh working directory, and shows what it promises: the held-out
accuracy before and after Flow-GRPO, the curves as an image, and two questions solved turn by turn."""

import os

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab", "agentflow_jax_demo.ipynb")


def cell_text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if "text" in output:
            parts.append(output["text"])
        elif "data" in output and "text/plain" in output["data"]:
            parts.append(output["data"]["text/plain"])
    return "".join(parts)


def test_the_notebook_runs_top_to_bottom_in_its_short_setting(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel imports this checkout (its working directory is a temp dir) on one CPU device.
    env = {**os.environ, "AGENTFLOW_NOTEBOOK_SHORT": "1", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=600, startup_timeout=300,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, if a cell fails

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    text = "\n".join(cell_text(cell) for cell in code)
    assert f"from {ROOT}; short setting: True" in text
    assert "held-out accuracy: warm-started planner" in text and "-> after Flow-GRPO" in text
    assert any("image/png" in output.get("data", {}) for cell in code for output in cell.get("outputs", []))
    assert "eval_accuracy/composition" in text
    solved = [cell_text(cell) for cell in code if "gold answer:" in cell_text(cell)]
    assert len(solved) == 2  # the trained toy planner, then the Qwen2.5 stand-in, with the python and search tools
    for output in solved:
        lines = output.splitlines()
        assert lines[0].startswith("Query: ") and "== Turn 1 ==" in lines and "Verdict: " in output
        assert lines[-2].startswith("Answer: ") and lines[-1].startswith("gold answer: ")
    assert (tmp_path / "runs" / "colab_demo" / "planner_hf" / "config.json").is_file()
