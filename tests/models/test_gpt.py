"""GPTModel: shapes, loss, tied weights, meta-device builds, KV-cache decoding, errors, TP."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from protoformer import TransformerConfig
from protoformer.backends import get_backend
from protoformer.models import GPTModel
from protoformer.models.gpt import PositionEmbeddingType
from protoformer.parallel import ProcessGroups
from protoformer.parallel.groups import ProcessGroup
from protoformer.recipes import get_preset, gpt_layer_spec
from protoformer.transformer.inference import InferenceContext

TOL = {"atol": 1e-5, "rtol": 1e-5}
VOCAB = 64


def small_config(**overrides: object) -> TransformerConfig:
    fields: dict[str, object] = {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
        "ffn_hidden_size": 48, "normalization": "RMSNorm", "gated_linear_unit": True,
        "activation_func": F.silu, "add_bias_linear": False, "attention_dropout": 0.0,
        "hidden_dropout": 0.0, "init_method_std": 0.1,
    }
    fields.update(overrides)
    return TransformerConfig(**fields)  # type: ignore[arg-type]


def small_model(*, tied: bool = False, seed: int = 0, max_len: int = 16,
                position: PositionEmbeddingType = "rope", pg: ProcessGroups | None = None,
                parallel_output: bool = True, **overrides: object) -> GPTModel:
    config = small_config(**overrides)
    torch.manual_seed(seed)
    model = GPTModel(config, gpt_layer_spec(get_backend("local"), config), VOCAB, max_len,
                     share_embeddings_and_output_weights=tied, position_embedding_type=position,
                     pg=pg, parallel_output=parallel_output)
    return model.eval()


def final_hidden(model: GPTModel, input_ids: Tensor) -> Tensor:
    """The decoder's output [s, b, h], captured with a forward hook."""
    captured: list[Tensor] = []
    handle = model.decoder.register_forward_hook(lambda _m, _i, out: captured.append(out))
    model(input_ids)
    handle.remove()
    return captured[0]


# ---------------------------------------------------------------- logits and loss


def test_logits_have_batch_sequence_vocab_shape() -> None:
    model = small_model()
    logits = model(torch.randint(0, VOCAB, (3, 7)))
    assert logits.shape == (3, 7, VOCAB)


def test_loss_is_per_token_cross_entropy_of_the_logits() -> None:
    model = small_model()
    ids, labels = torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (2, 9))
    logits = model(ids)
    loss = model(ids, labels)
    assert loss.shape == (2, 9)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(loss, expected.view(2, 9), **TOL)


@pytest.mark.parametrize("fused_loss", [False, True])
def test_mean_loss_reduction_is_the_mean_of_the_logits_cross_entropy(fused_loss: bool) -> None:
    model = small_model(cross_entropy_loss_fusion=fused_loss)
    ids, labels = torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (2, 9))
    expected = F.cross_entropy(model(ids).reshape(-1, VOCAB), labels.reshape(-1))
    loss = model(ids, labels, loss_reduction="mean")
    assert loss.shape == ()
    torch.testing.assert_close(loss, expected, **TOL)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(ids, labels, loss_reduction="sum")  # type: ignore[arg-type]


def test_logits_are_final_hidden_times_output_weight() -> None:
    model = small_model()
    ids = torch.randint(0, VOCAB, (2, 5))
    weight = model.output_layer.weight
    assert weight is not None
    expected = torch.einsum("sbh,vh->bsv", final_hidden(model, ids), weight)
    torch.testing.assert_close(model(ids), expected, **TOL)


def test_tied_output_layer_uses_the_embedding_weight() -> None:
    tied, untied = small_model(tied=True), small_model(tied=False)
    assert tied.output_layer.weight is None
    names = {name for name, _ in tied.named_parameters()}
    assert "output_layer.weight" not in names and "embedding.weight" in names
    count = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == count + VOCAB * 32
    assert untied.output_layer.weight is not None
    assert untied.output_layer.weight.data_ptr() != untied.embedding.weight.data_ptr()

    ids = torch.randint(0, VOCAB, (2, 5))
    expected = torch.einsum("sbh,vh->bsv", final_hidden(tied, ids), tied.embedding.weight)
    torch.testing.assert_close(tied(ids), expected, **TOL)
    # Both uses of the shared weight feed its gradient.
    tied(ids, ids).sum().backward()
    assert tied.embedding.weight.grad is not None
    unused_rows = torch.ones(VOCAB, dtype=torch.bool)
    unused_rows[ids.flatten()] = False
    assert unused_rows.any()  # rows never looked up still get the output layer's gradient
    assert bool(tied.embedding.weight.grad[unused_rows].abs().sum() > 0)


def test_learned_absolute_and_no_position_embeddings() -> None:
    learned = small_model(position="learned_absolute")
    assert learned.position_embeddings is not None and learned.rotary_pos_emb is None
    assert learned(torch.randint(0, VOCAB, (1, 4))).shape == (1, 4, VOCAB)
    plain = small_model(position="none")
    assert plain.position_embeddings is None and plain.rotary_pos_emb is None
    assert plain(torch.randint(0, VOCAB, (1, 4))).shape == (1, 4, VOCAB)


def test_attention_mask_reaches_the_layers() -> None:
    model = small_model()
    ids = torch.randint(0, VOCAB, (1, 6))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % VOCAB
    block_first_key = torch.zeros(1, 1, 1, 6, dtype=torch.bool)
    block_first_key[..., 0] = True
    out = model(ids, attention_mask=block_first_key)
    out_changed = model(changed, attention_mask=block_first_key)
    torch.testing.assert_close(out[:, 1:], out_changed[:, 1:], **TOL)
    assert not torch.allclose(model(ids)[:, 1:], model(changed)[:, 1:])


def test_embedding_dropout_applies_only_in_training() -> None:
    model = small_model(hidden_dropout=0.5)
    ids = torch.randint(0, VOCAB, (2, 6))
    torch.testing.assert_close(model(ids), model(ids))
    model.train()
    assert not torch.allclose(model(ids), model(ids))


# ---------------------------------------------------------------- incremental decoding


def decode_in_steps(model: GPTModel, ids: Tensor, steps: list[int]) -> tuple[Tensor, InferenceContext]:
    context = InferenceContext(max_batch_size=ids.shape[0], max_sequence_length=ids.shape[1])
    outputs, start = [], 0
    with torch.no_grad():
        for size in steps:
            outputs.append(model(ids[:, start:start + size], inference_context=context))
            start += size
    return torch.cat(outputs, dim=1), context


@pytest.mark.parametrize("position", ["rope", "learned_absolute"])
def test_kv_cache_decoding_equals_full_forward(position: PositionEmbeddingType) -> None:
    model = small_model(position=position)
    ids = torch.randint(0, VOCAB, (2, 10))
    stepped, context = decode_in_steps(model, ids, [4, 1, 1, 3, 1])
    torch.testing.assert_close(stepped, model(ids), **TOL)
    assert context.sequence_len_offset == 10


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "tiny-mla"])
def test_presets_decode_with_cache_like_full_forward(name: str) -> None:
    torch.manual_seed(0)
    model = get_preset(name).build_model().eval()
    ids = torch.randint(0, 256, (2, 9))
    stepped, _ = decode_in_steps(model, ids, [5, 1, 1, 1, 1])
    torch.testing.assert_close(stepped, model(ids), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- meta device and init


def llama_params(*, vocab: int, hidden: int, layers: int, heads: int, groups: int, ffn: int) -> int:
    head_dim = hidden // heads
    attention = hidden * heads * head_dim + 2 * hidden * groups * head_dim + heads * head_dim * hidden
    per_layer = attention + 3 * hidden * ffn + 2 * hidden  # q/k/v/o, SwiGLU, two RMSNorms
    return 2 * vocab * hidden + hidden + layers * per_layer  # untied embedding/output, final norm


def test_llama3_70b_builds_on_meta_without_storage_and_counts_parameters() -> None:
    model = get_preset("llama3-70b").build_model(device="meta")
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert all(b.device.type == "meta" for b in model.buffers())
    total = sum(p.numel() for p in params)
    assert total == llama_params(vocab=128256, hidden=8192, layers=80, heads=64, groups=8,
                                 ffn=28672)
    assert abs(total - 70.55e9) < 0.01e9


def test_meta_build_with_torch_device_context_allocates_nothing() -> None:
    config = small_config()
    with torch.device("meta"):
        model = GPTModel(config, gpt_layer_spec(get_backend("local"), config), VOCAB, 16)
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_init_weights_after_to_empty_restores_a_working_model() -> None:
    reference = small_model(seed=1)
    config = small_config()
    with torch.device("meta"):
        model = GPTModel(config, gpt_layer_spec(get_backend("local"), config), VOCAB, 16)
    model.to_empty(device="cpu")
    model.init_weights()
    named = dict(model.named_parameters())
    torch.testing.assert_close(named["decoder.final_layernorm.weight"], torch.ones(32))
    embedding_std = named["embedding.weight"].std().item()
    assert 0.08 < embedding_std < 0.12  # init_method_std = 0.1
    proj_std = named["decoder.layers.0.self_attention.linear_proj.weight"].std().item()
    assert proj_std < 0.07  # residual-output linears: 0.1 / sqrt(2 * num_layers) = 0.05
    # The rotary table (a non-persistent buffer) is recomputed: with the reference's weights
    # the model computes the reference's logits.
    model.load_state_dict(reference.state_dict())
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    torch.testing.assert_close(model(ids), reference(ids), **TOL)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.zeros(5, dtype=torch.long), "must be 2-D"),
        (torch.zeros(1, 5), "integer token ids"),
        (torch.full((1, 5), VOCAB), r"\[0, vocab_size=64\)"),
        (torch.full((1, 5), -1), r"\[0, vocab_size=64\)"),
        (torch.zeros(1, 17, dtype=torch.long), "beyond max_sequence_length=16"),
    ],
    ids=["1-d", "float", "too-large-id", "negative-id", "too-long"],
)
def test_bad_input_ids_raise_clear_errors(ids: Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_model()(ids)


def test_decoding_past_max_sequence_length_raises() -> None:
    model = small_model(max_len=8)
    context = InferenceContext(max_batch_size=1, max_sequence_length=32)
    model(torch.zeros(1, 6, dtype=torch.long), inference_context=context)
    with pytest.raises(ValueError, match="at offset 6"):
        model(torch.zeros(1, 3, dtype=torch.long), inference_context=context)


def test_labels_must_match_input_ids() -> None:
    with pytest.raises(ValueError, match="labels of shape"):
        small_model()(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


def test_constructor_rejects_bad_sizes_and_position_type() -> None:
    config = small_config()
    spec = gpt_layer_spec(get_backend("local"), config)
    with pytest.raises(ValueError, match="vocab_size=0"):
        GPTModel(config, spec, 0, 16)
    with pytest.raises(ValueError, match="position_embedding_type='alibi'"):
        GPTModel(config, spec, VOCAB, 16, position_embedding_type="alibi")  # type: ignore[arg-type]


# ---------------------------------------------------------------- tensor parallelism


def _check_tensor_parallel(rank: int, world_size: int) -> None:
    group = dist.new_group(list(range(world_size)))
    assert isinstance(group, ProcessGroup)
    pg = ProcessGroups(tp=group)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(ids, -1, dims=1)
    for tied in (False, True):
        for parallel_output in (True, False):
            single = small_model(tied=tied)
            split = small_model(tied=tied, pg=pg, parallel_output=parallel_output)
            torch.testing.assert_close(split(ids), single(ids), **TOL)
            loss_single, loss_split = single(ids, labels), split(ids, labels)
            torch.testing.assert_close(loss_split, loss_single, **TOL)
            loss_single.mean().backward()
            loss_split.mean().backward()
            shard = VOCAB // world_size
            expected = single.embedding.weight.grad
            got = split.embedding.weight.grad
            assert expected is not None and got is not None
            torch.testing.assert_close(got, expected[rank * shard:(rank + 1) * shard], **TOL)
    # Sequence parallelism: activations between the layers' parallel regions are split over
    # the sequence; the model's outputs are unchanged.
    single = small_model()
    split = small_model(pg=pg, sequence_parallel=True)
    torch.testing.assert_close(split(ids), single(ids), **TOL)
    torch.testing.assert_close(split(ids, labels), single(ids, labels), **TOL)


@pytest.mark.slow  # spawns two processes (gloo)
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_tensor_parallel_model_matches_single_process() -> None:
    from tests.parallel.dist_utils import run_distributed

    run_distributed(_check_tensor_parallel, 2)


@pytest.mark.parametrize("name", ["tiny", "tiny-mla"])
def test_meta_build_then_init_weights_recomputes_rotary_tables(name: str) -> None:
    preset = get_preset(name)
    torch.manual_seed(0)
    reference = preset.build_model().eval()
    model = preset.build_model(device="meta")
    model.to_empty(device="cpu")
    model.init_weights()
    model.load_state_dict(reference.state_dict())  # the rotary buffers are not in it
    model.eval()
    ids = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(model(ids), reference(ids), **TOL)


def test_backward_dw_completes_deferred_weight_gradients() -> None:
    import dataclasses

    from protoformer.backends import get_backend
    from protoformer.models import GPTModel
    from protoformer.recipes import get_preset, gpt_layer_spec

    preset = get_preset("tiny")
    base = dataclasses.replace(preset.config(), hidden_dropout=0.0, attention_dropout=0.0)
    ids = torch.randint(0, preset.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for delay in (False, True):
        config = dataclasses.replace(base, delay_wgrad_compute=delay)
        torch.manual_seed(0)
        model = GPTModel(config, gpt_layer_spec(get_backend("local"), config), preset.vocab_size,
                         32)
        model(ids, labels=ids).mean().backward()
        if delay:
            untouched = model.decoder.layers[0].mlp.linear_fc1.weight.grad
            assert untouched is None  # deferred: backward computed only the input gradients
            model.backward_dw()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    plain, deferred = grads
    assert plain.keys() == deferred.keys()
    for name in plain:
        torch.testing.assert_close(deferred[name], plain[name], rtol=0, atol=1e-6, msg=name)
