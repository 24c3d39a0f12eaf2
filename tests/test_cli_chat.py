"""`tinyvllm chat`: the interactive terminal chat, driven through stdin like a person at a terminal.

The oracle is ``LLM.chat`` on the same conversation: each reply must be the offline reply to the
history so far (the chat template applied to every turn), /clear must forget the history, /exit
must stop reading."""

from __future__ import annotations

import subprocess
import sys

from fixtures import release_gpu_memory
from tinyvllm import LLM, SamplingParams


def run_chat(model_dir, stdin: str) -> subprocess.CompletedProcess:
    release_gpu_memory()
    return subprocess.run(
        [sys.executable, "-m", "tinyvllm", "chat", str(model_dir), "--temperature", "0", "--max-tokens", "6",
         "--max-model-len", "128", "--system", "Be brief."],
        input=stdin.encode(), capture_output=True, timeout=180,
    )  # fmt: skip


def test_chat_keeps_history_clears_and_exits(tiny_llama_dir):
    r = run_chat(tiny_llama_dir, "hi\nhow are you?\n/clear\nhi\n/nope\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr.decode()
    llm = LLM(model=str(tiny_llama_dir), max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=6)
    system = {"role": "system", "content": "Be brief."}
    first = llm.chat([system, {"role": "user", "content": "hi"}], params, use_tqdm=False)[0].outputs[0].text
    history = [system, {"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "how are you?"}]  # fmt: skip
    second = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
    assert first and second and first != second
    # after /clear the conversation starts over, so "hi" gets the first reply again
    assert r.stdout.decode() == f"{first}\n{second}\n{first}\n"
    err = r.stderr.decode()
    assert "[conversation cleared]" in err and "unknown command /nope" in err


def test_chat_streams_the_reply_in_pieces(tiny_llama_dir):
    from tinyvllm.engine.llm_engine import LLMEngine
    from tinyvllm.entrypoints.cli_chat import ChatSession

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, s):
            self.writes.append(s)

        def flush(self):
            pass

    engine = LLMEngine.from_model(str(tiny_llama_dir), max_model_len=128)
    session = ChatSession(engine, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    out = Recorder()
    final = session.reply("hi", out)
    pieces = [w for w in out.writes if w]
    assert len(pieces) > 2, "the reply was not streamed"
    assert "".join(out.writes) == final.outputs[0].text + "\n"
    assert session.messages[-1] == {"role": "assistant", "content": final.outputs[0].text}


def test_chat_without_a_template_is_one_line_error(tmp_path, tiny_llama_dir):
    import json
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_llama_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = run_chat(model, "hi\n")
    assert r.returncode == 2 and r.stderr.decode().startswith("tinyvllm: error: this model has no chat template")


def test_chat_sampling_takes_the_flags_then_the_models_defaults_then_its_own():
    from tinyvllm.entrypoints.cli import build_parser
    from tinyvllm.entrypoints.cli_chat import chat_sampling

    args = build_parser().parse_args(["chat", "--top-k", "7"])
    p = chat_sampling(args, {"temperature": 0.6, "top_p": 0.9, "top_k": 50})  # (Llama 3.2 Instruct's file, and a top_k)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.min_p) == (0.6, 0.9, 7, 512, 0.0)
    p = chat_sampling(args, {})
    assert (p.temperature, p.top_p, p.max_tokens) == (0.7, 1.0, 512)
