"""Every entry point answers a user error (a misspelt key, a missing file, a missing model directory)
with one line on stderr and exit status 2; the traceback appears only with --verbosity=1."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "configs", "tiny_cpu.py")
PAPER = os.path.join(ROOT, "experiments", "configs", "qwen2_5_7b_flow_grpo.py")
SFT = os.path.join(ROOT, "experiments", "configs", "qwen2_5_sft.py")


def _config_file(directory, name: str, based_on: str, line: str) -> str:
    """A config file that loads a shipped one by path and changes one line."""
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(f"""\
            import importlib.util
            spec = importlib.util.spec_from_file_location("shipped", {based_on!r})
            shipped = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(shipped)

            def get_config():
                config = shipped.get_config()
                config.unlock()
                {line}
                return config
            """))
    return path


def cases(tmp):
    bad_rl = _config_file(tmp, "bad_rl.py", PAPER, "config.rl.group_sise = 4")
    bad_toy = _config_file(tmp, "bad_toy.py", TINY, "config.toy.world.num_citiess = 3")
    aime = os.path.join(tmp, "aime24.jsonl")
    with open(aime, "w", encoding="utf-8") as f:
        f.write('{"pid": "0", "query": "What is 6 * 7?", "answer": "42"}\n')
    evaluate = ["agentflow_jax.evaluate", f"--config={PAPER}:one", "--benchmark=aime24"]
    bad_sft = _config_file(tmp, "bad_sft.py", SFT, "config.batch.tokens_per_batchh = 4")
    chats = os.path.join(tmp, "chats.jsonl")
    bad_chats = os.path.join(tmp, "bad_chats.jsonl")
    with open(chats, "w", encoding="utf-8") as f:
        f.write('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n')
    with open(bad_chats, "w", encoding="utf-8") as f:
        f.write('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n{oops\n')
    sft_chat = ["agentflow_jax.sft", f"--config={SFT}:0.5b", "--config.data.format=chat",
                "--config.data.correct_only=False"]
    return {
        "evaluate, misspelt override": (evaluate + [f"--data={aime}", "--config.eval.batch_sise=4"],
                                        "names no such key: 'batch_sise'"),
        "evaluate, missing data file": (evaluate + ["--data=/nope/aime24.json"],
                                        "benchmark file '/nope/aime24.json' does not exist"),
        "evaluate, missing model directory": (evaluate + [f"--data={aime}", "--model=/nope/m"],
                                              "model directory '/nope/m' does not exist"),
        "train, misspelt override": (["agentflow_jax.train", f"--config={PAPER}", "--config.rl.group_sise=4"],
                                     "names no such key: 'group_sise'; Did you mean \"group_size\""),
        "train, misspelt key in the file": (["agentflow_jax.train", f"--config={bad_rl}"],
                                            "config.rl has unknown key 'group_sise' (did you mean 'group_size'?)"),
        "train, missing config file": (["agentflow_jax.train", "--config=/nope/config.py"],
                                       "config file '/nope/config.py' does not exist"),
        "train, missing model directory": (["agentflow_jax.train", f"--config={PAPER}:one",
                                            "--config.model.path=/nope/m"], "model directory '/nope/m' does not exist"),
        "train, a mesh larger than the machine": (["agentflow_jax.train", f"--config={PAPER}:h100x8"],
                                                  "mesh {'data': 1, 'fsdp': 8, 'tensor': 1} needs 8 devices but 1 are "
                                                  "available"),
        "train, a toy config": (["agentflow_jax.train", f"--config={TINY}"], "run python -m agentflow_jax.toy"),
        "toy, misspelt override": (["agentflow_jax.toy", f"--config={TINY}", "--config.toy.world.num_citiess=3"],
                                   "names no such key: 'num_citiess'"),
        "toy, misspelt key in the file": (["agentflow_jax.toy", f"--config={bad_toy}"],
                                          "config.toy.world has unknown key 'num_citiess'"),
        "toy, missing config file": (["agentflow_jax.toy", "--config=/nope/tiny.py"], "does not exist"),
        "sft, misspelt override": (["agentflow_jax.sft", f"--config={SFT}:0.5b", "--config.data.formt=chat"],
                                   "names no such key: 'formt'"),
        "sft, misspelt key in the file": (["agentflow_jax.sft", f"--config={bad_sft}"],
                                          "config.batch has unknown key 'tokens_per_batchh' (did you mean "
                                          "'tokens_per_batch'?)"),
        "sft, unknown model size": (["agentflow_jax.sft", f"--config={SFT}:3b"], "unknown model size '3b'"),
        "sft, missing config file": (["agentflow_jax.sft", "--config=/nope/sft.py:7b"],
                                     "config file '/nope/sft.py' does not exist"),
        "sft, missing data file": (["agentflow_jax.sft", f"--config={SFT}", "--config.data.train_path=/nope/t.jsonl"],
                                   "config.data.train_path = '/nope/t.jsonl': no such file"),
        "sft, missing model directory": ([*sft_chat, f"--config.data.train_path={chats}", "--config.model.path=/nope/m"],
                                         "model directory '/nope/m' does not exist"),
        "sft, a bad chat line": ([*sft_chat, f"--config.data.train_path={bad_chats}", f"--config.model.path={tmp}",
                                  "--config.model.tokenizer=qwen2.5"], "bad_chats.jsonl:2 is not valid JSON"),
        "solve, misspelt flag": (["agentflow_jax.solve", "--tols=python", "--model=/nope", "q"],
                                 "Unknown command line flag 'tols'"),
        "solve, missing corpus file": (["agentflow_jax.solve", "--engine=openai:http://127.0.0.1:9/v1,m",
                                        "--tools=search", "--search_corpus=/nope/c.jsonl", "q"],
                                       "corpus file '/nope/c.jsonl' does not exist"),
        "solve, missing model directory": (["agentflow_jax.solve", "--model=/nope/m", "q"],
                                           "model directory '/nope/m' does not exist"),
        "solve, unknown role": (["agentflow_jax.solve", "--engine=openai:http://127.0.0.1:9/v1,m",
                                 "--role_engine=judge=openai:http://127.0.0.1:9/v1,m", "q"],
                                "expected ROLE=SPEC with ROLE in ['analysis'"),
        "generate, misspelt flag": (["agentflow_jax.generate", "--temprature=0.5"],
                                    "Unknown command line flag 'temprature'"),
        "generate, missing tokenizer file": (["agentflow_jax.generate", "--tokenizer=/nope/t.model"],
                                             "no SentencePiece model at /nope/t.model"),
        "generate, missing model directory": (["agentflow_jax.generate", "--model=/nope/m"],
                                              "model directory '/nope/m' does not exist"),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """All cases run at once (each is a fresh Python process)."""
    tmp = str(tmp_path_factory.mktemp("cli"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    running = {name: (subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True), expected)
               for name, (args, expected) in cases(tmp).items()}
    out = {}
    for name, (process, expected) in running.items():
        stdout, stderr = process.communicate(timeout=300)
        out[name] = (process.returncode, stderr, expected)
    return out


@pytest.mark.parametrize("name", list(cases("/tmp")))
def test_user_error_is_one_line_and_status_2(results, name):
    returncode, stderr, expected = results[name]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0]


def test_verbosity_shows_the_traceback():
    result = subprocess.run([sys.executable, "-m", "agentflow_jax.train", "--config=/nope/config.py", "--verbosity=1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert result.returncode != 0 and "Traceback (most recent call last)" in result.stderr
