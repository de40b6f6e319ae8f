import pytest
import torch

from ownlm.basemodel import load_base
from ownlm.engine import GenerationParams, TorchEngine
from ownlm.engine.torch_engine import _held_back
from ownlm.errors import InvalidInput
from ownlm.settings import load_settings

HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def engine(tiny_base):
    return TorchEngine(load_base(load_settings(base=str(tiny_base), device="cpu")))


def test_greedy_is_deterministic_and_counts_tokens(engine):
    a = engine.stream(HELLO, GenerationParams(max_tokens=12, temperature=0))
    pieces = list(a)
    b = engine.stream(HELLO, GenerationParams(max_tokens=12, temperature=0))
    assert "".join(pieces) == b.text()
    assert a.finish_reason in ("stop", "length") and 1 <= a.completion_tokens <= 12
    assert a.prompt_tokens == len(engine.encode_chat(HELLO))


def test_random_model_runs_to_max_tokens(engine):
    s = engine.stream(HELLO, GenerationParams(max_tokens=5, temperature=1.0, seed=1))
    s.text()
    # a random model almost never emits <|im_end|> in 5 steps; either way the count is bounded
    assert s.completion_tokens <= 5 and (s.finish_reason == "length" or s.completion_tokens < 5)


def test_seed_reproduces_sampling(engine):
    p = GenerationParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42)
    assert engine.stream(HELLO, p).text() == engine.stream(HELLO, p).text()
    texts = {engine.stream(HELLO, GenerationParams(max_tokens=10, temperature=1.0, seed=s)).text() for s in range(4)}
    assert len(texts) > 1


def test_stop_string_cuts_output(engine):
    full = engine.stream(HELLO, GenerationParams(max_tokens=20, temperature=0)).text()
    if len(full) < 4:
        pytest.skip("random model produced too little text")
    stop = full[2:4]
    s = engine.stream(HELLO, GenerationParams(max_tokens=20, temperature=0, stop=[stop]))
    assert s.text() == full[: full.find(stop)] and s.finish_reason == "stop"


def test_long_prompt_is_truncated_to_context(engine):
    long = [{"role": "user", "content": "word " * 2000}]
    s = engine.stream(long, GenerationParams(max_tokens=4, temperature=0))
    s.text()
    assert s.prompt_tokens <= 512 - 4


@pytest.mark.parametrize(
    "kwargs", [{"max_tokens": 0}, {"temperature": 3}, {"top_p": 0}, {"stop": [""]}, {"stop": list("abcde")}]
)
def test_bad_params(kwargs):
    with pytest.raises(InvalidInput):
        GenerationParams(**kwargs)


def test_bad_messages(engine):
    with pytest.raises(InvalidInput, match="empty"):
        engine.stream([], GenerationParams())
    with pytest.raises(InvalidInput, match="role"):
        engine.stream([{"role": "robot", "content": "x"}], GenerationParams())


def test_held_back():
    assert _held_back("abc\ufffd", []) == 1
    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello", ["xyz"]) == 0


def test_greedy_batch_matches_one_by_one_greedy(engine):
    """Left-padded batched greedy decoding gives the answers stream() gives (prompts of different lengths)."""
    asks = [[{"role": "user", "content": q}] for q in
            ("Say hello.", "What is the capital of France, and why is it famous?", "Hi", "Count to three.")]
    alone = [engine.stream(a, GenerationParams(max_tokens=10, temperature=0)).text() for a in asks]
    assert engine.greedy_batch(asks, max_tokens=10) == alone
    assert engine.greedy_batch(asks, max_tokens=10, batch_size=3) == alone


def test_repetition_penalty_same_in_batch_and_stream_and_it_changes_the_answer(engine):
    """The penalty looks at the last REPEAT_LAST_N real tokens of each row: left padding is not history."""
    asks = [[{"role": "user", "content": q}] for q in ("Say hello.", "What is the capital of France, and why?", "Hi")]
    penalised = GenerationParams(max_tokens=24, temperature=0, repetition_penalty=1.5)
    alone = [engine.stream(a, penalised).text() for a in asks]
    assert engine.greedy_batch(asks, max_tokens=24, repetition_penalty=1.5) == alone
    plain = [engine.stream(a, GenerationParams(max_tokens=24, temperature=0)).text() for a in asks]
    assert alone != plain  # the tiny random model repeats itself; the penalty steers it off that


def test_penalize_repeats_rule():
    from ownlm.engine.torch_engine import penalize_repeats

    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = penalize_repeats(logits, [0, 1, 1], 2.0)  # each seen token once, however often it occurs
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5] and logits.tolist() == [2.0, -2.0, 1.0, 0.5]
    with pytest.raises(InvalidInput, match="repetition_penalty"):
        GenerationParams(repetition_penalty=0.5)
    with pytest.raises(InvalidInput, match="repetition_penalty"):
        GenerationParams(repetition_penalty=float("nan"))
