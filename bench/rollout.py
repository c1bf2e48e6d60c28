"""Rollout throughput: our vLLM engine against transformers `generate`, side by side in one run.

    python bench/rollout.py [--prompts 8] [--n 8] [--tokens 64] [--prompt-len 24] [--repeats 3]

Both generate `n` samples for each of `prompts` random-token prompts from the same random tiny_moe
checkpoint (fp32, CPU), at temperature 1 with top-p 1, exactly `tokens` new tokens per sample (EOS
ignored on both sides, so both do the same work). transformers gets the whole batch in one call with
its KV cache. Each repeat times one vLLM call and one transformers call back to back; the medians are
compared. Before timing, one warm-up call each, and a check that vLLM's sampled-token logprobs match
transformers' teacher-forced ones (a fast but wrong engine would not count).

Last line: RATIO rollout_vs_hf=<vLLM tokens/s / transformers tokens/s>   (goal >= 1.8)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, quiet_vllm  # noqa: E402


def _prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(2, vocab, (count, length), generator=gen).tolist()


def _time_vllm(engine, prompts, n, sampling) -> tuple[float, int]:
    start = time.perf_counter()
    groups = engine.generate(prompts, n, sampling)
    seconds = time.perf_counter() - start
    return seconds, sum(len(s.token_ids) for g in groups for s in g)


def _time_hf(model, prompts, n, tokens) -> tuple[float, int]:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
            num_return_sequences=n, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0,
        )
    seconds = time.perf_counter() - start
    return seconds, (out.shape[1] - ids.shape[1]) * out.shape[0]


def _check_logprobs(engine, model, prompts, sampling) -> float:
    """Max |vLLM sampled-token logprob - transformers teacher-forced logprob| over a few samples."""
    worst = 0.0
    for prompt, group in zip(prompts[:2], engine.generate(prompts[:2], 2, sampling), strict=True):
        for s in group:
            ids = torch.tensor([prompt + s.token_ids])
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].float().log_softmax(-1)
            ref = logp.gather(1, ids[0, 1:, None])[len(prompt) - 1:, 0]
            worst = max(worst, float((ref - torch.tensor(s.logprobs)).abs().max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    quiet_vllm()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from r1_megatron.config.loader import load_card
    from r1_megatron.config.schema import RolloutConfig
    from r1_megatron.model.random_hf import make_hf_checkpoint
    from r1_megatron.rollout.engine import SamplingParams
    from r1_megatron.rollout.vllm_engine import VLLMEngine

    hf_logging.set_verbosity_error()  # the MTP layer's tensors are unknown to transformers' model
    card = load_card("tiny_moe")
    with tempfile.TemporaryDirectory() as tmp:
        make_hf_checkpoint(card, Path(tmp), seed=0)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        engine = VLLMEngine(tmp, RolloutConfig(max_model_len=args.prompt_len + args.tokens + 8))
        try:
            prompts = _prompts(args.prompts, args.prompt_len, card.vocab_size)
            sampling = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=args.tokens,
                                      stop_on_eos=False, seed=0)
            _time_vllm(engine, prompts, args.n, sampling)
            _time_hf(model, prompts, args.n, args.tokens)
            err = _check_logprobs(engine, model, prompts, sampling)
            print(f"check: vLLM sampled-token logprobs vs transformers teacher forcing, max |diff| {err:.2e}")
            if err > 1e-3:
                print("vLLM logprobs disagree with transformers: not timing a wrong engine", file=sys.stderr)
                return 1
            rates: dict[str, list[float]] = {"vllm": [], "hf": []}
            for r in range(args.repeats):
                for name, (sec, toks) in (("vllm", _time_vllm(engine, prompts, args.n, sampling)),
                                          ("hf", _time_hf(model, prompts, args.n, args.tokens))):
                    rates[name].append(toks / sec)
                    print(f"repeat {r}: {name:4s} {toks} tokens in {sec:.3f} s = {toks / sec:,.0f} tok/s")
        finally:
            engine.close()
    vllm_rate, hf_rate = statistics.median(rates["vllm"]), statistics.median(rates["hf"])
    print(f"shape: {args.prompts} prompts x n={args.n} x {args.tokens} tokens, prompt length "
          f"{args.prompt_len}, tiny_moe fp32 on CPU; torch threads {torch.get_num_threads()}; "
          f"{load_average()}")
    print(f"median vLLM {vllm_rate:,.0f} tok/s, transformers generate {hf_rate:,.0f} tok/s")
    print(f"RATIO rollout_vs_hf={vllm_rate / hf_rate:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
