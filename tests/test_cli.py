import subprocess
import sys

import pytest

from tinyvllm.entrypoints.cli import build_parser, main


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
    assert "top_p" in capsys.readouterr().err


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
