"""Shared pytest configuration: markers and the tiny-model fixtures."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "smollm2: tests that load the real SmolLM2-135M-Instruct weights (select with -m smollm2)"
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from engine_helpers import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
