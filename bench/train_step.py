"""Training-step throughput: our megatron-core DeepSeek-V3 against transformers' DeepseekV3ForCausalLM.

Both models hold the same weights (transformers' random init, imported through the HF name table; the
logits are checked equal first) and run forward + backward of the next-token loss on the same token
batches, fp32, on this machine's device. The two are timed alternately, step by step, so that load
from other processes hits both alike; the medians are compared.

    python bench/train_step.py [--steps 6] [--batch 4] [--seq 256] [--threads N]

Last line: RATIO train_step_vs_hf=<our tokens/s / transformers' tokens/s>
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from r1_megatron.checkpoint import hf, hf_io
from r1_megatron.config.loader import load_card
from r1_megatron.model.provider import build_model, forward_logits
from r1_megatron.model.random_hf import make_hf_checkpoint
from r1_megatron.parallel.device import single_rank_world

# A mid-size DeepSeek-V3: every feature on (MLA with q_lora, YaRN, grouped sigmoid routing with
# expert bias, shared expert, a dense first layer); MTP off because transformers does not run it.
MID = dict(
    hidden_size=512, num_layers=4, first_k_dense=1, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128,
    qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, ffn_hidden_size=1408, moe_ffn_hidden_size=256,
    num_experts=16, num_shared_experts=1, router_topk=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
    yarn_factor=4.0, original_max_position=512, max_position_embeddings=2048, mtp_num_layers=0,
    vocab_size=8192,
)


def ours_step(model: torch.nn.Module, tokens: torch.Tensor, position_ids: torch.Tensor) -> None:
    labels = torch.roll(tokens, -1, dims=1)
    loss = model(tokens, position_ids, None, labels=labels)[:, :-1].mean()
    loss.backward()


def hf_step(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    model(input_ids=tokens, labels=tokens).loss.backward()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model (after 1 warmup)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = single_rank_world(0)
    card = replace(load_card("tiny_moe"), **MID)

    with tempfile.TemporaryDirectory() as tmp:
        theirs = make_hf_checkpoint(card, tmp, seed=0).to(device).train()
        ckpt = hf_io.HFCheckpoint(tmp)
        ours = build_model(card, device=device).train()
        hf.import_weights(ours, ckpt, card, ckpt.keys())

    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq)
    batches = [torch.randint(0, card.vocab_size, shape, generator=gen).to(device) for _ in range(2)]
    position_ids = torch.arange(args.seq, device=device).expand(args.batch, -1)
    with torch.no_grad():
        ours.eval(), theirs.eval()
        diff = (forward_logits(ours, batches[0][:1]) - theirs(batches[0][:1]).logits).abs().max().item()
        ours.train(), theirs.train()
    print(f"config: {MID}")
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch} x seq {args.seq}, fp32")
    print(f"logit max |ours - transformers| before timing: {diff:.2e}")

    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in range(args.steps + 1):
        tokens = batches[step % len(batches)]
        runs = {
            "ours": lambda: ours_step(ours, tokens, position_ids),
            "transformers": lambda: hf_step(theirs, tokens),
        }
        for name, run in runs.items():
            ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            run()
            sync()
            if step > 0:  # step 0 warms up both
                times[name].append(time.perf_counter() - start)

    tokens_per_step = args.batch * args.seq
    rate = {name: tokens_per_step / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:>12}: median {statistics.median(t) * 1e3:8.1f} ms/step  {rate[name]:9.0f} tokens/s  "
              f"(steps: {', '.join(f'{x * 1e3:.0f}' for x in t)} ms)")
    best = min(times["transformers"]) / min(times["ours"])
    print(f"best-step ratio (least disturbed by other processes): {best:.3f}")
    print(f"RATIO train_step_vs_hf={rate['ours'] / rate['transformers']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
