"""The command line: what it prints, its exit status, and that it checks the arguments first.

Failures run in a subprocess, as a user meets them: stderr must be ONE line naming the problem
(no traceback unless --debug / TINYVLLM_DEBUG=1), the exit status 2 for bad arguments and 1 for
a model that cannot be loaded or a request that failed."""

import io
import os
import subprocess
import sys

import pytest
import torch

from fixtures import release_gpu_memory
from tinyvllm.entrypoints.cli import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tinyvllm(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m tinyvllm ARGS` from this tree, as a user runs it."""
    release_gpu_memory()
    full_env = {k: v for k, v in os.environ.items() if k != "TINYVLLM_DEBUG"}
    full_env.update(PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, "-m", "tinyvllm", *args], capture_output=True, text=True, timeout=300,
                          env=full_env, input=stdin, cwd=ROOT)


def test_parser_defaults():
    a = build_parser().parse_args(["generate", "hi"])
    assert a.prompts == ["hi"] and a.model is None and a.temperature == 0.0 and not a.chat
    a = build_parser().parse_args(["chat", "hi", "--max-tokens", "3", "--top-k", "5", "--top-p", "0.5",
                                   "--min-p", "0.1", "--seed", "1", "--dtype", "float32"])
    assert (a.max_tokens, a.top_k, a.top_p, a.min_p, a.seed, a.dtype) == (3, 5, 0.5, 0.1, 1, "float32")


def test_generate_main_matches_llm(tiny_llama_dir, capsys):
    from tinyvllm import LLM, SamplingParams

    rc = main(["generate", "hello", "--model", str(tiny_llama_dir), "--max-tokens", "6", "--ignore-eos",
               "--max-model-len", "64"])
    assert rc == 0
    printed = capsys.readouterr().out
    llm = LLM(model=str(tiny_llama_dir), max_model_len=64)
    want = llm.generate("hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert printed == want[0].outputs[0].text + "\n"


def test_bad_params_exit_2(tiny_llama_dir, capsys):
    assert main(["generate", "x", "--model", str(tiny_llama_dir), "--top-p", "0"]) == 2
    assert capsys.readouterr().err == "tinyvllm: error: top_p must be in (0, 1], got 0.0\n"


def bad_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return str(path)


FAILURES = [  # (arguments, exit status, words the one line must hold)
    (["generate", "x", "--max-tokens", "x"], 2, "argument --max-tokens: invalid int value: 'x'"),
    (["generate"], 2, "the following arguments are required: prompts"),
    (["generate", "x", "--dtype", "float99"], 2, "dtype must be 'auto', 'bfloat16', 'float16', 'float32'"),
    (["generate", "x", "--device", "cuda"], 2, "device is 'cuda' but no CUDA GPU is available"),
    (["generate", "x", "--model", "/no/such/model"], 2, "model '/no/such/model' is neither an existing path nor"),
    (["generate", ""], 2, "prompt 0 is empty"),
    (["generate", "x", "--temperature", "-1"], 2, "temperature must be at least 0"),
    (["generate", "x", "--model", "BAD_GGUF"], 1, "broken.gguf: corrupt or truncated GGUF file"),
    (["generate", "x", "--model", "nobody/no-such-model-here"], 1, "cannot download 'nobody/no-such-model-here'"),
    (["generate", "z " * 40, "--model", "TINY", "--max-model-len", "16"], 1, "prompt 0 failed: The prompt (length"),
]  # fmt: skip


@pytest.mark.parametrize("args, status, words", FAILURES, ids=[" ".join(a[:4])[:40] for a, _, _ in FAILURES])
def test_each_failure_is_one_line_and_an_exit_status(args, status, words, tmp_path, tiny_llama_dir):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = [{"BAD_GGUF": bad_gguf(tmp_path), "TINY": str(tiny_llama_dir)}.get(a, a) for a in args]
    r = tinyvllm(*args, env={"HF_HUB_OFFLINE": "1", "TINYVLLM_CACHE": str(tmp_path)})
    assert r.returncode == status, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinyvllm: ") and words in lines[0], r.stderr


@pytest.mark.parametrize("how", ["--debug", "TINYVLLM_DEBUG=1"])
def test_debug_shows_the_traceback(how, tmp_path):
    args, env = (["generate", "x", "--model", bad_gguf(tmp_path)], {})
    if how == "--debug":
        args.append("--debug")
    else:
        env["TINYVLLM_DEBUG"] = "1"
    r = tinyvllm(*args, env=env)
    assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr
    assert "CheckpointError: " in r.stderr and len(r.stderr.splitlines()) > 5


def test_arguments_are_checked_before_the_model_is_loaded(monkeypatch, capsys):
    from tinyvllm.entrypoints import llm

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(llm.LLM, "__init__", no_loading)
    for args in (["generate", ""], ["generate", "x", "--max-tokens", "0"], ["generate", "x", "--num-kv-blocks", "0"],
                 ["generate", "x", "--stop", ""], ["generate", "x", "--model", "/no/such"]):  # fmt: skip
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "loaded" not in err, err


def test_prompt_from_standard_input(tiny_llama_dir, monkeypatch, capsys):
    common = ["--model", str(tiny_llama_dir), "--max-tokens", "5", "--ignore-eos", "--max-model-len", "64"]
    assert main(["generate", "hello there", *common]) == 0
    want = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n"))
    assert main(["generate", "-", *common]) == 0
    assert capsys.readouterr().out == want
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["generate", "-", *common]) == 2
    assert capsys.readouterr().err == "tinyvllm: error: prompt 0 is empty (standard input was empty)\n"
    assert main(["generate", "-", "-", *common]) == 2
    assert "can be given only once" in capsys.readouterr().err


def test_version():
    from tinyvllm import __version__

    r = tinyvllm("--version")
    assert r.returncode == 0 and r.stdout.startswith(f"tinyvllm {__version__} (torch ") and "CUDA kernels" in r.stdout


def test_chat_via_python_m(tiny_llama_dir):
    """The interactive `tinyvllm chat`, fed one message on stdin, replies as `generate --chat` does."""
    r = subprocess.run(
        [sys.executable, "-m", "tinyvllm", "chat", str(tiny_llama_dir), "--max-tokens", "4", "--temperature", "0",
         "--max-model-len", "64"],
        input=b"hi\n", capture_output=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    r2 = subprocess.run(
        [sys.executable, "-m", "tinyvllm", "generate", "--chat", "hi", "--model", str(tiny_llama_dir),
         "--max-tokens", "4", "--temperature", "0", "--max-model-len", "64"],
        capture_output=True, timeout=120,
    )
    assert r2.returncode == 0 and r2.stdout == r.stdout


def test_generate_help_names_the_chat_template_and_examples(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = capsys.readouterr().out
    assert "chat template" in help_text and "--chat" in help_text and "examples:" in help_text


def test_generate_reports_an_empty_completion_and_suggests_the_template(tiny_llama_dir, capsys):
    from tinyvllm import LLM, SamplingParams

    llm = LLM(model=str(tiny_llama_dir), max_model_len=64)
    eos = llm.get_tokenizer().eos_token_ids[0]
    # a stop string that is the text of the first greedy token: the completion is empty, finish_reason "stop"
    first = llm.generate("hello", SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0].outputs[0].token_ids[0]
    assert first != eos
    rc = main(["generate", "hello", "--model", str(tiny_llama_dir), "--max-tokens", "4", "--max-model-len", "64",
               "--stop", llm.get_tokenizer().decode([first])])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out == "\n"
    assert "empty completion (finish_reason=stop)" in captured.err
    assert "has a chat template; add --chat" in captured.err
