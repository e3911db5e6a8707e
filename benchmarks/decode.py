"""Greedy decode throughput: protoformer (eager and CUDA-graph) against Hugging Face `generate`.

The same Llama-style model as `_peers.py` (bf16 weights, copied from protoformer into
`transformers.LlamaForCausalLM` with `attn_implementation="sdpa"`) decodes `--new-tokens`
tokens greedily after a random `--prompt`-token prompt, at each `--batch`:

- `hf-generate`: `model.generate(do_sample=False, min_new_tokens=max_new_tokens=n)` with its
  default dynamic KV cache;
- `protoformer-eager`: `protoformer.generation.greedy_generate` (the static-shape step of
  `GraphDecoder`, run eagerly: one model forward per token);
- `protoformer-graph`: `GraphDecoder`: the same step, each token one CUDA graph replay.

Tokens/s counts new tokens (batch * n) over the whole call, prompt prefill included; the
median of `--repeats` calls after one warm-up call. The outputs are compared by the length of
the prefix they share (bf16 greedy paths part at the first near-tie of the logits; token
identity with the eager path is tested in float32 by tests/generation/test_graph_decoder.py).

    python benchmarks/decode.py --batch 1 8 --prompt 128 --new-tokens 128
    python benchmarks/decode.py --batch 1 8 --anatomy   # kernels per step, graph step time

`--anatomy` profiles the eager static step (kernels per token and their device time, by
kernel name) and times graph replays alone (prefill excluded), instead of the comparison.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import _peers
import torch
from _peers import build_hf, build_protoformer, copy_weights, llama_1b_config
from torch import Tensor

import protoformer.backends.fused  # noqa: F401  (registers the fused backend)
from protoformer.generation import GraphDecoder, greedy_generate


def timed(fn: Callable[[], Tensor], repeats: int) -> tuple[float, Tensor]:
    out = fn()  # warm-up (and, for the graph decoder, capture)
    _peers.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        _peers.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def agreement(a: Tensor, b: Tensor) -> str:
    """Tokens the two greedy runs share before their first difference (mean over rows).

    Greedy continuations diverge for good at the first near-tie of two logits that the two
    paths round differently (a random-weight model's logits are nearly flat, so bf16 ties
    are common); the shared prefix is the meaningful comparison, not the overlap after it.
    """
    differs = (a != b).int()  # [b, n]
    first = torch.where(differs.any(dim=1), differs.argmax(dim=1),
                        torch.full_like(differs[:, 0], a.shape[1]))  # [b]
    return f"{float(first.float().mean()):.0f}/{a.shape[1]}"


def anatomy(decoder: GraphDecoder, eager: GraphDecoder, prompts: Tensor, n: int) -> None:
    """Kernels of one eager static step (count, device time) and graph replay time a token."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    batch, steps = prompts.shape[0], 4
    with torch.inference_mode():
        token = eager.prefill(prompts, n).argmax(-1)
        for _ in range(3):
            token = eager.step(token).argmax(-1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                token = eager.step(token).argmax(-1)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if str(e.device_type).endswith("CUDA")]
        count, spent = Counter[str](), Counter[str]()
        for event in kernels:
            count[event.name[:90]] += 1
            spent[event.name[:90]] += event.time_range.end - event.time_range.start
        print(f"\n### batch {batch}: {len(kernels) / steps:.0f} kernels per eager step, kernel "
              f"time {sum(spent.values()) / steps:.0f} us per step")
        for name, _ in spent.most_common():
            print(f"{count[name] / steps:6.1f}/step {spent[name] / steps:8.1f} us/step  {name}")
        token = decoder.prefill(prompts, n).argmax(-1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n - 1):
            token = decoder.step(token).argmax(-1)
        end.record()
        torch.cuda.synchronize()
        print(f"batch {batch}: graph replay + argmax {start.elapsed_time(end) / (n - 1) * 1e3:.0f} "
              "us per token", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    _peers.add_shape_arguments(parser)
    parser.add_argument("--attention-kernels", default="flash,cudnn,efficient")
    parser.add_argument("--anatomy", action="store_true",
                        help="profile the step (kernels per token) instead of comparing")
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test the script")
    args = parser.parse_args()
    _peers.DEVICE = torch.device(args.device)
    if _peers.DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("decode.py needs a CUDA GPU (or --device cpu for a smoke test)")
    card = torch.cuda.get_device_name() if _peers.DEVICE.type == "cuda" else "cpu"
    print(f"card: {card}; torch {torch.__version__}", flush=True)

    config = llama_1b_config(args)
    total = args.prompt + args.new_tokens
    torch.manual_seed(0)
    ours = build_protoformer(config, args.vocab, total, tuple(args.attention_kernels.split(",")))
    hf = build_hf(config, args.vocab, total)
    print(f"weights copied by {copy_weights(ours, hf)}", flush=True)
    ours.eval()
    hf.eval()
    n = args.new_tokens

    rows = []
    for batch in args.batch:
        prompts = torch.randint(0, args.vocab, (batch, args.prompt), device=_peers.DEVICE)

        def run_hf(prompts: Tensor = prompts) -> Tensor:
            with torch.inference_mode():
                out = hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                  max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
            return out[:, args.prompt:]

        decoder = GraphDecoder(ours, batch_size=batch, max_sequence_length=total)
        if args.anatomy and _peers.DEVICE.type == "cuda":
            anatomy(decoder, GraphDecoder(ours, batch_size=batch, max_sequence_length=total,
                                          use_cuda_graph=False), prompts, n)
            continue

        def run_graph(prompts: Tensor = prompts, decoder: GraphDecoder = decoder) -> Tensor:
            return decoder.generate(prompts, n)

        def run_eager(prompts: Tensor = prompts) -> Tensor:
            return greedy_generate(ours, prompts, n)

        t_hf, out_hf = timed(run_hf, args.repeats)
        t_eager, out_eager = timed(run_eager, args.repeats)
        t_graph, out_graph = timed(run_graph, args.repeats)
        new = batch * n
        rows.append((batch, new / t_hf, new / t_eager, new / t_graph,
                     agreement(out_graph, out_eager), agreement(out_graph, out_hf)))
        print(f"batch {batch}: hf {new / t_hf:,.0f} tok/s, eager {new / t_eager:,.0f}, graph "
              f"{new / t_graph:,.0f}; agreement graph/eager {rows[-1][4]}, graph/hf "
              f"{rows[-1][5]}", flush=True)
        del decoder

    print(f"\n## {card}, bf16, prompt {args.prompt}, {n} new tokens, vocab {args.vocab}\n")
    print("| batch | HF generate tok/s | protoformer eager tok/s | protoformer CUDA graph tok/s "
          "| graph / HF | shared prefix graph/eager | shared prefix graph/HF |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch, hf_tps, eager_tps, graph_tps, same_eager, same_hf in rows:
        print(f"| {batch} | {hf_tps:,.0f} | {eager_tps:,.0f} | {graph_tps:,.0f} | "
              f"{graph_tps / hf_tps:.1f}x | {same_eager} | {same_hf} |")


if __name__ == "__main__":
    main()
