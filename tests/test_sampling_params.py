import pytest

from tinyvllm import SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"n": 2}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 1}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_invalid_field_is_named(kwargs, field):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert str(e.value).startswith(field), str(e.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stop": 5}, "stop must be a string or a list of strings, got int 5"),
        ({"temperature": "hot"}, "temperature must be a number, got str 'hot'"),
        ({"max_tokens": 2.5}, "max_tokens must be an int or None, got float 2.5"),
        ({"top_k": 1.5}, "top_k must be an int, got float 1.5"),
        ({"seed": "x"}, "seed must be an int or None, got str 'x'"),
        ({"stop_token_ids": 7}, "stop_token_ids must be a list of ints, got int 7"),
        ({"ignore_eos": "yes"}, "ignore_eos must be True or False, got str 'yes'"),
    ],
)
def test_wrong_type_is_a_type_error_naming_field_and_type(kwargs, message):
    with pytest.raises(TypeError) as e:
        SamplingParams(**kwargs)
    assert str(e.value) == message


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == (1, 1.0, 1.0, 0, 0.0, 16, 0)
    assert p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos and p.seed is None
    # top_k: 0, -1 and None all mean "off" (vLLM's current rule), stored as 0.
    for off in (0, -1, None):
        assert SamplingParams(top_k=off).top_k == 0
    assert SamplingParams(top_k=1).top_k == 1
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_set == {3, 4}
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(min_tokens=4, max_tokens=4).min_tokens == 4
    SamplingParams(top_p=1.0, min_p=1.0, temperature=0.0)
