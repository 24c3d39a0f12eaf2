"""tinyvllm: a small, fast, readable LLM inference engine.

    from tinyvllm import LLM, SamplingParams
    llm = LLM()                      # SmolLM2-135M-Instruct by default
    out = llm.generate("Hello", SamplingParams(max_tokens=16))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name: str):
    # Imported lazily so that `import tinyvllm.ops` stays light.
    if name == "LLM":
        from tinyvllm.entrypoints.llm import LLM

        return LLM
    if name == "SamplingParams":
        from tinyvllm.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput", "Logprob"):
        from tinyvllm import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'tinyvllm' has no attribute {name!r}")
