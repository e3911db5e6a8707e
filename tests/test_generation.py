"""Generation: the KV-cached decoder matches recomputing the whole sequence, and sampling filters."""

from __future__ import annotations

import pytest
import torch

from protoformer.generation import generate, sample_next_token
from protoformer.models import GPTModel
from protoformer.recipes import get_preset


@pytest.fixture(scope="module")
def model() -> GPTModel:
    torch.manual_seed(0)
    return get_preset("tiny").build_model().eval()


def _argmax_without_cache(model: GPTModel, prompt: list[int], steps: int) -> list[int]:
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([sequence]))  # [1, len, v], the whole sequence again
            sequence.append(int(logits[0, -1].argmax()))
    return sequence[len(prompt):]


def test_greedy_with_the_kv_cache_equals_argmax_without_it(model: GPTModel) -> None:
    prompt = list(b"def main(argv):\n    ")
    assert generate(model, prompt, 20, greedy=True) == _argmax_without_cache(model, prompt, 20)


def test_tokens_are_streamed_in_order(model: GPTModel) -> None:
    streamed: list[int] = []
    tokens = generate(model, list(b"ab"), 8, seed=3, stream=streamed.append)
    assert streamed == tokens and len(tokens) == 8


def test_a_seed_makes_sampling_reproducible(model: GPTModel) -> None:
    first = generate(model, list(b"x = "), 15, temperature=1.0, top_p=0.9, seed=11)
    assert first == generate(model, list(b"x = "), 15, temperature=1.0, top_p=0.9, seed=11)


def test_top_k_of_one_is_greedy(model: GPTModel) -> None:
    prompt = list(b"import ")
    assert generate(model, prompt, 10, top_k=1, seed=5) == generate(model, prompt, 10, greedy=True)


def test_generation_stops_at_the_maximum_sequence_length(model: GPTModel) -> None:
    prompt = [65] * (model.max_sequence_length - 3)
    assert len(generate(model, prompt, 20, greedy=True)) == 3
    assert generate(model, [65] * model.max_sequence_length, 5) == []


def test_generation_stops_after_emitting_a_stop_token(model: GPTModel) -> None:
    prompt = list(b"class ")
    free = generate(model, prompt, 12, greedy=True)  # no stop tokens: all 12
    assert len(free) == 12
    stop = free[4]
    expected = free[:free.index(stop) + 1]  # up to and including its first occurrence
    streamed: list[int] = []
    stopped = generate(model, prompt, 12, greedy=True, stop_token_ids={stop, 999_999},
                       stream=streamed.append)
    assert stopped == expected and streamed == expected
    assert generate(model, prompt, 12, greedy=True, stop_token_ids=[1000]) == free  # never chosen


def test_sampling_stops_at_a_stop_token_too(model: GPTModel) -> None:
    prompt = list(b"x = ")
    free = generate(model, prompt, 30, temperature=1.0, seed=7)
    stop = free[len(free) // 2]
    stopped = generate(model, prompt, 30, temperature=1.0, seed=7, stop_token_ids=(stop,))
    assert stopped == free[:free.index(stop) + 1]


def test_the_model_is_left_in_its_training_mode(model: GPTModel) -> None:
    model.train()
    generate(model, [1, 2, 3], 2, greedy=True)
    assert model.training
    model.eval()


@pytest.mark.parametrize(("prompt", "kwargs", "message"), [
    ([], {}, "empty"),
    ([300], {}, "outside the model's vocabulary"),
    ([-1], {}, "outside the model's vocabulary"),
    ([1], {"temperature": -1.0}, "temperature"),
    ([1], {"top_k": 0}, "top_k"),
    ([1], {"top_p": 1.5}, "top_p"),
])
def test_bad_requests_are_rejected(model: GPTModel, prompt: list[int], kwargs: dict[str, float],
                                   message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(model, prompt, 4, **kwargs)  # type: ignore[arg-type]


def test_top_k_and_top_p_keep_only_the_likeliest_tokens() -> None:
    # Probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8), top_k=3 {0, 1, 2}.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    generator = torch.Generator().manual_seed(0)
    by_p = {sample_next_token(logits, top_p=0.7, generator=generator) for _ in range(300)}
    by_k = {sample_next_token(logits, top_k=3, generator=generator) for _ in range(300)}
    everything = {sample_next_token(logits, generator=generator) for _ in range(600)}
    assert by_p == {0, 1}
    assert by_k == {0, 1, 2}
    assert everything == {0, 1, 2, 3}
    assert sample_next_token(logits, greedy=True) == 0
    assert sample_next_token(logits, temperature=0.0) == 0


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_static_graph_step_equals_the_eager_loop(preset: str) -> None:
    # cuda_graph=True on the CPU runs GraphDecoder's static-shape step eagerly: the same
    # masked full-length attention the graph replays, checked against the eager KV-cache loop.
    torch.manual_seed(0)
    net = get_preset(preset).build_model().eval()
    prompt = list(b"import os\n")
    eager = _argmax_without_cache(net, prompt, 16)
    assert generate(net, prompt, 16, greedy=True, cuda_graph=True) == eager
    sampled = dict(temperature=0.9, top_k=20, seed=5)
    assert generate(net, prompt, 16, cuda_graph=True, **sampled) == \
        generate(net, prompt, 16, cuda_graph=False, **sampled)


def test_graph_decoding_refuses_unsupported_models_or_falls_back() -> None:
    torch.manual_seed(0)
    mla = get_preset("tiny-mla").build_model().eval()
    with pytest.raises(TypeError, match="GraphDecoder supports"):
        generate(mla, list(b"ab"), 4, greedy=True, cuda_graph=True)
    # Auto (None) quietly uses the eager loop where the graph decoder does not apply.
    assert len(generate(mla, list(b"ab"), 4, greedy=True)) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_generation_equals_eager_on_gpu() -> None:
    torch.manual_seed(0)
    net = get_preset("tiny").build_model(device="cuda").eval()
    prompt = list(b"def main(argv):\n    ")
    eager = generate(net, prompt, 24, greedy=True, cuda_graph=False)
    assert generate(net, prompt, 24, greedy=True) == eager  # auto: the CUDA graph on a GPU
    sampled = dict(temperature=0.8, top_p=0.9, seed=7)
    assert generate(net, prompt, 24, cuda_graph=True, **sampled) == \
        generate(net, prompt, 24, cuda_graph=False, **sampled)
