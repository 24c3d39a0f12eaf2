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
        ({"n": 0}, "n"),
        ({"n": 2, "temperature": 0}, "n"),  # greedy: one completion (vLLM)
        ({"best_of": 3}, "best_of"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
        ({"logit_bias": {3: "big"}}, "logit_bias"),
        ({"logit_bias": [(3, 1.0)]}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
        ({"bad_words": [""]}, "bad_words"),
        ({"bad_words": ["ok", 3]}, "bad_words"),
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
        ({"n": 1.5}, "n must be an int, got float 1.5"),
        ({"logprobs": 1.0}, "logprobs must be an int or None, got float 1.0"),
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


def test_new_fields_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.logprobs is None and p.prompt_logprobs is None and p.logit_bias is None
    assert p.allowed_token_ids is None and p.bad_words is None and p.bad_words_token_ids is None
    # boundaries are valid (vLLM's closed ranges)
    SamplingParams(presence_penalty=-2, frequency_penalty=2.0, repetition_penalty=0.01, logprobs=0, prompt_logprobs=0)
    assert SamplingParams(n=4, seed=3).n == 4
    # logit_bias: string keys (JSON) become ints, biases are clamped to [-100, 100] (OpenAI, vLLM)
    assert SamplingParams(logit_bias={"7": 250, 3: -1000.0, 4: 0.5}).logit_bias == {7: 100.0, 3: -100.0, 4: 0.5}
    assert SamplingParams(allowed_token_ids=(3, 1)).allowed_token_ids == [3, 1]
    assert SamplingParams(bad_words="foo").bad_words == ["foo"]


def test_clone_is_deep():
    p = SamplingParams(logit_bias={1: 1.0}, allowed_token_ids=[1, 2], stop=["x"], seed=5, n=2)
    q = p.clone()
    assert q == p and q.logit_bias is not p.logit_bias and q.allowed_token_ids is not p.allowed_token_ids
    q.allowed_token_ids.append(9)
    assert p.allowed_token_ids == [1, 2]


def test_output_kind_is_cumulative_delta_or_final_only():
    from tinyvllm.sampling_params import RequestOutputKind

    assert SamplingParams().output_kind == RequestOutputKind.CUMULATIVE
    assert SamplingParams(output_kind=1).output_kind is RequestOutputKind.DELTA
    assert SamplingParams(output_kind=2).output_kind is RequestOutputKind.FINAL_ONLY
    for bad in (3, -1, True, "final"):
        with pytest.raises(ValueError, match="output_kind"):
            SamplingParams(output_kind=bad)
