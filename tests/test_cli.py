import subprocess
import sys

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
    r = subprocess.run(
        [sys.executable, "-m", "tinyvllm", "chat", "hi", "--model", str(tiny_llama_dir), "--max-tokens", "4",
         "--temperature", "0.8", "--seed", "1", "--max-model-len", "64"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    r2 = subprocess.run(
        [sys.executable, "-m", "tinyvllm", "generate", "--chat", "hi", "--model", str(tiny_llama_dir),
         "--max-tokens", "4", "--temperature", "0.8", "--seed", "1", "--max-model-len", "64"],
        capture_output=True, text=True, timeout=120,
    )
    assert r2.returncode == 0 and r2.stdout == r.stdout
