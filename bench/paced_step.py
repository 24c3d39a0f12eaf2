"""A CPU proxy of the GPU's pace: every model step of a negligible model also waits as long as the
Llama-3.2-1B step would take on an H100, so the engine process is mostly idle (as it is while the
GPU works) and the server, its engine process and the client share the CPU as on a GPU host.

Why: on the CPU the negligible model's steps take about a millisecond, ten times shorter than a
GPU's at batch 256, so a CPU run of `bench_serve.py --host-bound` is limited by how fast requests
arrive over HTTP, not by what limits the GPU's server (row 113). Paced like the GPU, the same run
asks the question the GPU run asks: does one server process keep up with the engine?

The step's time, from the H100 rows of bench/results/README.md (decode at batch 1 about 1.17 ms,
at batch 256 about 3.3 ms of kernels; a prompt token about 4 us, the compute bound of a 1024-token
prompt being 2.6 ms):

    t = BASE_MS + PER_SEQ_MS * (sequences in the step) + PER_TOKEN_MS * (prompt tokens in the step)

The wait is a sleep (no CPU used, the interpreter lock released), after the model's own work. It
is installed in a process by :func:`install`, and in processes started with ``env()`` in their
environment by ``bench/paced_site/sitecustomize.py`` (the server and its engine process).
"""

from __future__ import annotations

import os
import time

BASE_MS, PER_SEQ_MS, PER_TOKEN_MS = 1.1, 0.0085, 0.004
ENV = "TINYVLLM_BENCH_PACED"


def step_ms(num_seqs: int, num_prompt_tokens: int) -> float:
    """The H100's time for a step of ``num_seqs`` sequences, ``num_prompt_tokens`` of its tokens
    prompt, times the environment's TINYVLLM_BENCH_PACED (default 1: a test makes steps longer)."""
    scale = float(os.environ.get(ENV) or 1)
    return scale * (BASE_MS + PER_SEQ_MS * num_seqs + PER_TOKEN_MS * num_prompt_tokens)


def install() -> None:
    """Make every model step of this process wait as long as the H100's (``step_ms``)."""
    from tinyvllm.engine.model_runner import ModelRunner

    if getattr(ModelRunner, "_paced", False):
        return
    compute = ModelRunner._compute_logits
    path = os.environ.get(ENV + "_LOG")  # (each step's time, sequences and prompt tokens, a line each)
    log = open(f"{path}.{os.getpid()}", "w", buffering=1) if path else None

    def paced(self, out, spans):  # type: ignore[no-untyped-def]
        logits = compute(self, out, spans)
        prompt = sum(n for n in out.num_scheduled_tokens if n > 1)  # (a decode row schedules one token)
        time.sleep(step_ms(len(out.seqs), prompt) / 1e3)
        if log is not None:
            log.write(f"{time.time():.6f} {len(out.seqs)} {prompt}\n")
        return logits

    ModelRunner._compute_logits = paced
    ModelRunner._paced = True


def env() -> dict[str, str]:
    """The environment that paces a child process (and its own children): this flag, and
    bench/paced_site first on PYTHONPATH so that Python imports its ``sitecustomize.py`` at start-up."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paced_site")
    return {ENV: os.environ.get(ENV) or "1", "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
