"""`T5Model`: relative position buckets against a closed form, cached decoding against the full
forward, padding against unpadded inputs, the loss against cross-entropy of the logits, bad
input, and tensor parallelism against one process. Logit parity with Hugging Face's T5 is in
`tests/interop/test_hf_t5.py`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from protoformer import TransformerConfig
from protoformer.backends import get_backend
from protoformer.generation import generate_seq2seq
from protoformer.models import T5Model
from protoformer.parallel import ProcessGroups
from protoformer.recipes import gpt_layer_spec, t5_decoder_layer_spec, t5_encoder_layer_spec
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.relative_position import (
    RelativePositionEmbedding,
    relative_position_bucket,
)

VOCAB = 64
TOL = {"atol": 1e-5, "rtol": 1e-5}


def make_config(**overrides: object) -> TransformerConfig:
    fields: dict[str, object] = {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "kv_channels": 12,
        "ffn_hidden_size": 48, "normalization": "RMSNorm", "add_bias_linear": False,
        "gated_linear_unit": True, "softmax_scale": 1.0, "attention_dropout": 0.0,
        "hidden_dropout": 0.0, "init_method_std": 0.2,
    }
    fields.update(overrides)
    return TransformerConfig(**fields)  # type: ignore[arg-type]


def make_model(config: TransformerConfig | None = None, *, seed: int = 0,
               pg: ProcessGroups | None = None, sequence_parallel: bool = False,
               **kwargs: object) -> T5Model:
    config = config or make_config(sequence_parallel=sequence_parallel)
    encoder_config = make_config(num_layers=3, sequence_parallel=sequence_parallel)
    backend = get_backend("local")
    torch.manual_seed(seed)
    options: dict[str, object] = {"relative_attention_num_buckets": 8,
                                  "relative_attention_max_distance": 16}
    options.update(kwargs)
    return T5Model(config, t5_encoder_layer_spec(backend, encoder_config),
                   t5_decoder_layer_spec(backend, config), VOCAB, 64,
                   encoder_config=encoder_config, pg=pg, **options).eval()  # type: ignore[arg-type]


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ relative position buckets


def closed_form_bucket(distance: int, *, bidirectional: bool, num_buckets: int,
                       max_distance: int) -> int:
    """Raffel et al.'s bucketing written out for one signed distance `key - query`."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if distance > 0:
            bucket = num_buckets
        n = abs(distance)
    else:
        n = max(-distance, 0)
    exact = num_buckets // 2
    if n < exact:
        return bucket + n
    scaled = math.log(n / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    return bucket + min(exact + int(scaled), num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 16), (10, 50)])
def test_buckets_match_the_closed_form(bidirectional: bool, num_buckets: int,
                                       max_distance: int) -> None:
    distances = torch.arange(-300, 301)
    got = relative_position_bucket(distances, bidirectional=bidirectional,
                                   num_buckets=num_buckets, max_distance=max_distance)
    expected = [closed_form_bucket(int(d), bidirectional=bidirectional, num_buckets=num_buckets,
                                   max_distance=max_distance) for d in distances]
    assert got.tolist() == expected
    assert int(got.min()) >= 0 and int(got.max()) < num_buckets


def test_relative_bias_is_the_table_row_of_each_pair() -> None:
    config = make_config()
    table = RelativePositionEmbedding(config, bidirectional=False, num_buckets=8, max_distance=16)
    bias = table(3, 7, offset=4)  # queries at 4..6, keys at 0..6
    assert bias.shape == (1, config.num_attention_heads, 3, 7)
    for i in range(3):
        for j in range(7):
            bucket = closed_form_bucket(j - (i + 4), bidirectional=False, num_buckets=8,
                                        max_distance=16)
            torch.testing.assert_close(bias[0, :, i, j], table.weight[bucket])


def test_relative_embedding_rejects_sizes_without_log_buckets() -> None:
    with pytest.raises(ValueError, match="num_buckets=2"):
        RelativePositionEmbedding(make_config(), bidirectional=True, num_buckets=2)


# ------------------------------------------------------------------ the model


def test_loss_is_the_cross_entropy_of_the_logits() -> None:
    model = make_model()
    enc, dec, labels = ids(2, 9, 1), ids(2, 6, 2), ids(2, 6, 3)
    logits = model(enc, dec)
    assert logits.shape == (2, 6, VOCAB)
    loss = model(enc, dec, labels)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1),
                               reduction="none").view(2, 6)
    torch.testing.assert_close(loss, expected, **TOL)


@pytest.mark.parametrize("position_embedding_type", ["relative", "rope", "none"])
def test_cached_decoding_equals_the_full_forward(position_embedding_type: str) -> None:
    model = make_model(position_embedding_type=position_embedding_type)
    enc, dec = ids(2, 11, 4), ids(2, 7, 5)
    padding = torch.zeros(2, 11, dtype=torch.bool)
    padding[1, 8:] = True
    with torch.no_grad():
        full = model(enc, dec, encoder_padding_mask=padding)
        memory = model.encode(enc, encoder_padding_mask=padding)
        context = InferenceContext(max_batch_size=2, max_sequence_length=7)
        pieces = [model.decode(dec[:, a:b], memory, encoder_padding_mask=padding,
                               inference_context=context) for a, b in ((0, 3), (3, 4), (4, 7))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)
    assert context.sequence_len_offset == 7
    assert set(context.key_value_memory_dict) == {1, 2, -1, -2}  # self- and cross-attention


def test_encoder_padding_is_invisible() -> None:
    """A padded batch row gives the logits of the same sequence run alone without padding."""
    model = make_model()
    short, dec = ids(1, 6, 6), ids(1, 5, 7)
    padded = torch.cat([short, ids(1, 4, 8)], dim=1)  # 4 padding tokens of arbitrary ids
    padding = torch.zeros(1, 10, dtype=torch.bool)
    padding[0, 6:] = True
    with torch.no_grad():
        alone = model(short, dec)
        masked = model(padded, dec, encoder_padding_mask=padding)
        unmasked = model(padded, dec)
    torch.testing.assert_close(masked, alone, **TOL)
    assert not torch.allclose(unmasked, alone, atol=1e-3)  # the mask is what hides them


def test_relative_bias_changes_the_output_and_scaling_is_applied() -> None:
    model = make_model()
    enc, dec = ids(1, 8, 9), ids(1, 5, 10)
    with torch.no_grad():
        before = model(enc, dec)
        assert model.decoder_relative_pos_emb is not None
        model.decoder_relative_pos_emb.weight.add_(1.0)  # a constant shift: softmax ignores it
        torch.testing.assert_close(model(enc, dec), before, **TOL)
        model.decoder_relative_pos_emb.weight[0].add_(3.0)  # one bucket only: it matters
        assert not torch.allclose(model(enc, dec), before, atol=1e-3)
    scaled = make_model(scale_decoder_outputs=True)
    with torch.no_grad():
        memory = scaled.encode(enc)
        hidden = scaled.decoder(scaled._embed("decoder_input_ids", dec),  # pyright: ignore[reportPrivateUsage]
                                not_none_bias(scaled, 5), context=memory)
        expected = (hidden * 32 ** -0.5).transpose(0, 1) @ scaled.embedding.weight.T
    torch.testing.assert_close(scaled(enc, dec), expected, **TOL)


def not_none_bias(model: T5Model, length: int) -> torch.Tensor:
    assert model.decoder_relative_pos_emb is not None
    return model.decoder_relative_pos_emb(length, length)


def test_untied_output_layer_has_its_own_weight() -> None:
    model = make_model(share_embeddings_and_output_weights=False)
    assert model.output_layer.weight is not None
    assert model.output_layer.weight.data_ptr() != model.embedding.weight.data_ptr()
    tied = make_model()
    assert tied.output_layer.weight is None
    assert "output_layer.weight" not in tied.state_dict()


def test_generate_seq2seq_greedy_equals_argmax_without_cache() -> None:
    model = make_model(seed=3)
    source = ids(1, 9, 11)[0]
    got = generate_seq2seq(model, source, 8, greedy=True)
    tokens = [0]
    with torch.no_grad():
        for _ in range(8):
            logits = model(source[None], torch.tensor([tokens]))
            tokens.append(int(logits[0, -1].argmax()))
    assert got == tokens[1:]
    stop = got[-1]
    assert generate_seq2seq(model, source, 8, greedy=True,
                            stop_token_ids={stop}) == got[:got.index(stop) + 1]


def test_the_fused_backend_fills_the_same_slots_with_the_same_numbers() -> None:
    """On the CPU the fused builders fall back to PyTorch: the same logits as the local ones."""
    fused = get_backend("fused")
    config, encoder_config = make_config(), make_config(num_layers=3)
    model = T5Model(config, t5_encoder_layer_spec(fused, encoder_config),
                    t5_decoder_layer_spec(fused, config), VOCAB, 64,
                    encoder_config=encoder_config, relative_attention_num_buckets=8,
                    relative_attention_max_distance=16).eval()
    local = make_model()
    model.load_state_dict(local.state_dict())
    assert type(model.decoder.layers[0].cross_attention.core_attention).__name__ == "FusedSDPAttention"
    enc, dec = ids(2, 9, 20), ids(2, 5, 21)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    with torch.no_grad():
        torch.testing.assert_close(model(enc, dec, encoder_padding_mask=padding),
                                   local(enc, dec, encoder_padding_mask=padding), **TOL)


def test_meta_build_then_init_weights_runs() -> None:
    with torch.device("meta"):
        model = make_model(position_embedding_type="rope")
    model.to_empty(device="cpu")
    model.init_weights()
    out = model(ids(1, 5, 12), ids(1, 4, 13))
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ bad input


def test_bad_specs_and_configs_are_refused() -> None:
    backend, config = get_backend("local"), make_config()
    encoder, decoder = t5_encoder_layer_spec(backend, config), t5_decoder_layer_spec(backend, config)
    with pytest.raises(ValueError, match="no cross_attention"):
        T5Model(config, encoder, gpt_layer_spec(backend, config), VOCAB, 32)
    with pytest.raises(ValueError, match="encoder has no memory"):
        T5Model(config, decoder, decoder, VOCAB, 32)
    with pytest.raises(ValueError, match="hidden_size"):
        T5Model(config, encoder, decoder, VOCAB, 32,
                encoder_config=make_config(hidden_size=48, kv_channels=12))
    with pytest.raises(ValueError, match="set it the same in both"):
        T5Model(make_config(sequence_parallel=True), encoder, decoder, VOCAB, 32,
                encoder_config=config)
    with pytest.raises(ValueError, match="position_embedding_type"):
        T5Model(config, encoder, decoder, VOCAB, 32,
                position_embedding_type="learned")  # type: ignore[arg-type]


def test_bad_inputs_get_clear_errors() -> None:
    model = make_model()
    enc, dec = ids(2, 5, 14), ids(2, 4, 15)
    with pytest.raises(ValueError, match="boolean tensor"):
        model(enc, dec, encoder_padding_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"expected \[2, 5\]"):
        model(enc, dec, encoder_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_sequence_length=64"):
        model(ids(1, 65, 16), dec[:1])
    with pytest.raises(ValueError, match="vocab_size"):
        model(enc, dec + VOCAB)
    with pytest.raises(ValueError, match="labels of shape"):
        model(enc, dec, dec[:, :2])
    with pytest.raises(ValueError, match="encoder_output has shape"):
        model.decode(dec, torch.zeros(5, 3, 32))


# ------------------------------------------------------------------ tensor parallelism (gloo)


def _check_tensor_parallel(rank: int, world_size: int, sequence_parallel: bool) -> None:
    from protoformer.parallel.grads import finalize_model_grads

    del rank
    pg = ProcessGroups.from_torchrun(tp=world_size)
    single = make_model(seed=5).train()
    split = make_model(seed=5, pg=pg, sequence_parallel=sequence_parallel).train()
    enc, dec, labels = ids(2, 10, 17), ids(2, 6, 18), ids(2, 6, 19)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[0, 7:] = True
    torch.testing.assert_close(split(enc, dec, encoder_padding_mask=padding),
                               single(enc, dec, encoder_padding_mask=padding), **TOL)
    loss_single = single(enc, dec, labels, encoder_padding_mask=padding)
    loss_split = split(enc, dec, labels, encoder_padding_mask=padding)
    torch.testing.assert_close(loss_split, loss_single, **TOL)
    loss_single.sum().backward()
    loss_split.sum().backward()
    finalize_model_grads(split, pg)  # sums the sequence-parallel norms' partial gradients
    if sequence_parallel:
        with pytest.raises(ValueError, match="sequence parallelism cannot split"):
            split(enc[:, :9], dec)
        with pytest.raises(ValueError, match="incremental decoding"):
            split.decode(dec, split.encode(enc), inference_context=InferenceContext(2, 8))
    heads = single.config.num_attention_heads // world_size
    # A bias-table gradient sums over every (query, key) pair of every layer: float32 rounding
    # of the split model's different reduction order reaches ~2e-5 there (seen on a 16-core host).
    grad_tol = {"atol": 1e-4, "rtol": 1e-4}
    for name in ("encoder_relative_pos_emb", "decoder_relative_pos_emb"):
        full, part = getattr(single, name).weight, getattr(split, name).weight
        start = pg.tp_rank * heads
        torch.testing.assert_close(part.grad, full.grad[:, start:start + heads], **grad_tol)
    for name in ("encoder.final_layernorm.weight", "decoder.layers.1.pre_cross_attn_layernorm.weight"):
        torch.testing.assert_close(dict(split.named_parameters())[name].grad,
                                   dict(single.named_parameters())[name].grad, **grad_tol)


@pytest.mark.slow  # spawns two processes (gloo)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp-sp"])
def test_tensor_parallel_matches_single_process(sequence_parallel: bool) -> None:
    from tests.parallel.dist_utils import run_distributed

    run_distributed(_check_tensor_parallel, 2, sequence_parallel)
