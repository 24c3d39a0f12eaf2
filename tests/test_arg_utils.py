"""The engine's command-line flags (vLLM's spellings) shared by `serve` and `chat`, and the help of
the new subcommands."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from tinyvllm.engine.arg_utils import add_engine_args, engine_config_from_args
from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.entrypoints.cli import build_parser


def parse(*argv):
    return add_engine_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_flags_become_engine_config_fields():
    c = engine_config_from_args(parse("some/model", "--max-model-len", "512", "--max-num-seqs", "8", "--block-size", "32",
                                      "--num-gpu-blocks-override", "64", "--dtype", "float32", "--device", "cpu",
                                      "--enforce-eager", "--seed", "3", "--stream-interval", "4"))  # fmt: skip
    assert (c.model, c.max_model_len, c.max_num_seqs, c.block_size, c.num_kv_blocks, c.enforce_eager, c.seed,
            c.stream_interval) == ("some/model", 512, 8, 32, 64, True, 3, 4)  # fmt: skip
    assert engine_config_from_args(parse("--model", "m", "--device", "cpu")).model == "m"


def test_two_models_or_a_bad_value_is_a_value_error():
    with pytest.raises(ValueError, match="two models"):
        engine_config_from_args(parse("a", "--model", "b"))
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine_config_from_args(parse("--max-num-seqs", "0", "--device", "cpu"))


def test_the_command_lines_defaults_are_the_engines():
    """`serve` and `chat` with no engine flags build the EngineConfig that LLM() and EngineConfig's
    own defaults give (prefix caching on, as in vLLM V1); --no-enable-prefix-caching turns it off."""
    from_flags = engine_config_from_args(parse("some/model", "--device", "cpu"))
    assert from_flags == EngineConfig("some/model", device="cpu")
    assert from_flags.enable_prefix_caching
    assert not engine_config_from_args(parse("--no-enable-prefix-caching", "--device", "cpu")).enable_prefix_caching


def test_a_flag_this_build_lacks_is_refused_by_name(monkeypatch):
    from tinyvllm.engine import arg_utils

    flags = arg_utils._ENGINE_FLAGS + [(("--fancy-feature",), "fancy_feature", dict(action="store_true", help="x"))]
    monkeypatch.setattr(arg_utils, "_ENGINE_FLAGS", flags)
    with pytest.raises(ValueError, match="--fancy-feature is not supported by this build"):
        engine_config_from_args(parse("--fancy-feature", "--device", "cpu"))
    engine_config_from_args(parse("--device", "cpu"))  # unset: fine


@pytest.mark.parametrize("argv", [["generate"], ["chat"], ["serve"], ["bench", "serve"]])
def test_every_subcommand_help_has_examples(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    assert "examples:" in capsys.readouterr().out
