"""RequestOutputKind: DELTA outputs, added up with RequestOutput.add, give the CUMULATIVE outputs of
the same run step for step (text with held-back stop-string prefixes, tokens, log-probabilities,
n > 1, finish reasons); the prompt's ids come in the first delta only."""

from __future__ import annotations

import pytest

from engine_helpers import make_fake_engine
from tinyvllm import SamplingParams
from tinyvllm.outputs import RequestOutput
from tinyvllm.sampling_params import RequestOutputKind


def run(kind: RequestOutputKind, async_scheduling: bool) -> dict[str, list]:
    engine = make_fake_engine(async_scheduling=async_scheduling)
    requests = {
        "plain": ([5, 6, 7], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, output_kind=kind)),
        "stop": ([8, 9], SamplingParams(temperature=0, max_tokens=12, stop=["aO", "zz"], ignore_eos=True,
                                        output_kind=kind)),
        "n2": ([3, 4], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=6, logprobs=2, output_kind=kind)),
    }
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outputs: dict[str, list] = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_delta_outputs_add_up_to_the_cumulative_ones(async_scheduling):
    cumulative = run(RequestOutputKind.CUMULATIVE, async_scheduling)
    deltas = run(RequestOutputKind.DELTA, async_scheduling)
    for rid, outs in cumulative.items():
        assert len(deltas[rid]) == len(outs) > 1
        total = None
        for i, (d, c) in enumerate(zip(deltas[rid], outs)):
            if i > 0:
                assert d.prompt_token_ids is None and d.prompt_logprobs is None  # first delta only
            total = d if total is None else total.add(d)
            assert total.finished == c.finished
            assert total.prompt_token_ids == c.prompt_token_ids and total.prompt_logprobs == c.prompt_logprobs
            for a, b in zip(total.outputs, c.outputs, strict=True):
                assert (a.index, a.text, a.token_ids, a.finish_reason, a.stop_reason) == \
                       (b.index, b.text, b.token_ids, b.finish_reason, b.stop_reason)  # fmt: skip
                assert a.logprobs == b.logprobs and a.cumulative_logprob == b.cumulative_logprob
        assert any(len(d.outputs[0].token_ids) == 1 for d in deltas[rid][1:])  # really deltas
        # merged in one pass: the same as added up one by one (what a server does with a stream's deltas)
        assert RequestOutput.merge(deltas[rid]) == total
        assert RequestOutput.merge(deltas[rid][:3]) == deltas[rid][0].add(deltas[rid][1]).add(deltas[rid][2])
    assert cumulative["stop"][-1].outputs[0].stop_reason == "aO"  # (the stop string cut the text)


def test_an_output_survives_its_wire_form_and_the_engine_builds_the_same_one():
    """RequestOutput.to_wire / from_wire (what an engine process sends) keep every field; the
    engine's wire outputs (``wire_outputs``, prompt text in the first delta only) rebuild to its
    objects."""
    from tinyvllm.engine.request_state import RequestState
    from tinyvllm.engine.sequence import Sequence
    from tinyvllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput

    out = RequestOutput("r", "hi", [1, 2], [CompletionOutput(0, "a", [3], -0.5, [{3: Logprob(-0.5, 1, "a")}], "stop", 3)],
                        True, None, [None, {2: Logprob(-1.0, 2, "b")}], RequestMetrics(1.0, 2.0, 1.1, 1.5, 0.1, 2.0, 4), 4)
    assert RequestOutput.from_wire(out.to_wire()) == out
    params = SamplingParams(max_tokens=4, output_kind=RequestOutputKind.DELTA)
    seq = Sequence("r", [1, 2], params)
    state = RequestState("r", "hi", [1, 2], params, seqs=[seq], logprobs=[None], cumulative_logprobs=[None])
    seq.token_ids.append(7)
    seq.output_text = "x"
    first = RequestOutput.from_wire(state.wire_output(prompt_once=True))
    seq.token_ids.append(8)
    seq.output_text = "xy"
    later_wire = state.wire_output(prompt_once=True)
    assert first.prompt == "hi" and first.outputs[0].token_ids == [7] and first.prompt_token_ids == [1, 2]
    later = RequestOutput.from_wire(later_wire)
    assert later.prompt is None and later.prompt_token_ids is None
    assert later.outputs[0].token_ids == [8] and later.outputs[0].text == "y"
    assert later_wire == ("r", [8], "y")  # a running plain stream's delta travels short
    # its last delta (finished), or one with log-probabilities, travels whole
    seq.token_ids.append(9)
    seq.output_text, seq.finish_reason = "xyz", "length"
    last = RequestOutput.from_wire(state.wire_output(prompt_once=True))
    assert last.finished and last.outputs[0].finish_reason == "length" and last.metrics is not None
    assert (first.add(later).add(last).outputs[0].text, first.add(later).add(last).outputs[0].token_ids) == ("xyz", [7, 8, 9])
    scored = SamplingParams(max_tokens=4, logprobs=1, output_kind=RequestOutputKind.DELTA)
    seq2 = Sequence("s", [1, 2], scored, token_ids=[1, 2, 7])
    state2 = RequestState("s", "hi", [1, 2], scored, seqs=[seq2], logprobs=[[{7: Logprob(-0.1, 1, "a")}]],
                          cumulative_logprobs=[-0.1])  # fmt: skip
    state2.wire_output(prompt_once=True)
    seq2.token_ids.append(8)
    state2.logprobs[0].append({8: Logprob(-0.2, 1, "b")})
    assert len(state2.wire_output(prompt_once=True)) == 9


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE])
def test_stream_interval_sends_the_first_then_every_nth_step_then_the_last(kind, async_scheduling):
    """EngineConfig.stream_interval = 4 (vLLM's --stream-interval): a streaming request's outputs
    come at its first token, then every 4 tokens, and at its end; added up they are the outputs
    of interval 1, token for token and character for character (a stop string still cuts)."""
    def run_with(interval: int) -> dict[str, list]:
        engine = make_fake_engine(async_scheduling=async_scheduling, stream_interval=interval)
        engine.add_request("plain", [5, 6, 7], SamplingParams(temperature=0, max_tokens=11, ignore_eos=True,
                                                              output_kind=kind))  # fmt: skip
        engine.add_request("stop", [8, 9], SamplingParams(temperature=0, max_tokens=12, stop=["aO", "zz"],
                                                          ignore_eos=True, output_kind=kind))  # fmt: skip
        outputs: dict[str, list] = {"plain": [], "stop": []}
        while engine.has_unfinished_requests():
            for out in engine.step():
                outputs[out.request_id].append(out)
        return outputs

    every, fourth = run_with(1), run_with(4)
    plain = [len(o.outputs[0].token_ids) for o in fourth["plain"]]
    if kind == RequestOutputKind.DELTA:
        assert plain == [1, 4, 4, 2]
    else:
        assert plain == [1, 5, 9, 11]
    def whole(outs: list) -> tuple[str, list[int]]:  # what a client has at the end
        if kind == RequestOutputKind.CUMULATIVE:
            return outs[-1].outputs[0].text, outs[-1].outputs[0].token_ids
        return "".join(o.outputs[0].text for o in outs), [t for o in outs for t in o.outputs[0].token_ids]

    for rid in every:
        assert len(fourth[rid]) < len(every[rid])
        assert whole(fourth[rid]) == whole(every[rid])
        assert fourth[rid][-1].finished and fourth[rid][-1].outputs[0].finish_reason == every[rid][-1].outputs[0].finish_reason
    assert fourth["stop"][-1].outputs[0].stop_reason == "aO"


def test_stream_interval_below_one_is_refused():
    from tinyvllm.engine.engine_config import EngineConfig

    with pytest.raises(ValueError, match="stream_interval"):
        EngineConfig(device="cpu", stream_interval=0)


def test_add_extends_each_completion_and_keeps_index_order():
    """RequestOutput.add: each completion of the delta extends its own (text, ids, log-probabilities,
    the newest finish), one the delta lacks is kept as it was, one first seen in the delta joins in
    index order; neither operand changes."""
    from tinyvllm.outputs import CompletionOutput, RequestOutput

    total = RequestOutput("r", "p", [1], [CompletionOutput(0, "ab", [3, 4], -1.0, [{3: 0.1}, {4: 0.2}]),
                                          CompletionOutput(2, "x", [9])])  # fmt: skip
    delta = RequestOutput("r", None, None, [CompletionOutput(1, "new", [7]),
                                            CompletionOutput(0, "c", [5], -1.5, [{5: 0.3}], "length")], True)  # fmt: skip
    merged = total.add(delta)
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in merged.outputs] == \
        [(0, "abc", [3, 4, 5], "length"), (1, "new", [7], None), (2, "x", [9], None)]  # fmt: skip
    assert merged.outputs[0].logprobs == [{3: 0.1}, {4: 0.2}, {5: 0.3}] and merged.outputs[0].cumulative_logprob == -1.5
    assert merged.finished and merged.prompt_token_ids == [1] and merged.prompt == "p"
    assert total.outputs[0].token_ids == [3, 4] and len(total.outputs) == 2  # (unchanged)
