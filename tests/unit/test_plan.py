"""The planner counts parameters exactly as transformers' DeepseekV3/Qwen2 models hold them and as the
DeepSeek-V3 report publishes them (671B, 685B with MTP, 37B active), splits them over a layout by
hand-checkable arithmetic, calls the public 256/512-GPU DeepSeek-V3 GRPO layouts (NeMo-RL v0.4, verl)
fitting in 80 GB and smaller ones not, and refuses impossible layouts with the numbers in the message.
Sources of the public layouts: launch/README.md."""

import json

import pytest
import torch

from r1_megatron.config import ConfigError, load_card
from r1_megatron.plan import GiB, Layout, Precision, Workload, count_params, plan
from r1_megatron.cli.plan import main as plan_main
from r1_megatron.plan.memory import activation_bytes_per_token, kv_bytes_per_token


def _hf_model(card: str):
    """transformers' own model for the card, on the meta device (no memory even for 671B)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    m = load_card(card)
    if m.arch == "qwen2":
        cfg = Qwen2Config(
            vocab_size=m.vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_key_value_heads,
            tie_word_embeddings=m.tie_embeddings,
        )
        cls = Qwen2ForCausalLM
    else:
        cfg = DeepseekV3Config(
            vocab_size=m.vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.ffn_hidden_size,
            moe_intermediate_size=m.moe_ffn_hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_attention_heads,
            n_shared_experts=m.num_shared_experts,
            n_routed_experts=m.num_experts,
            kv_lora_rank=m.kv_lora_rank,
            q_lora_rank=m.q_lora_rank,
            qk_rope_head_dim=m.qk_rope_head_dim,
            v_head_dim=m.v_head_dim,
            qk_nope_head_dim=m.qk_nope_head_dim,
            n_group=m.n_group,
            topk_group=m.topk_group,
            num_experts_per_tok=m.router_topk,
            first_k_dense_replace=m.first_k_dense,
            tie_word_embeddings=False,
        )
        cls = DeepseekV3ForCausalLM
    with torch.device("meta"):
        return cls(cfg)


@pytest.mark.parametrize("card", ["deepseek_v3_671b", "moonlight_16b", "tiny_moe", "micro_moe", "qwen2_tiny"])
def test_total_matches_transformers(card):
    model = _hf_model(card)
    # The expert-bias is a buffer in transformers and a tensor of the published checkpoint: count it.
    hf = sum(p.numel() for p in model.parameters())
    hf += sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert count_params(load_card(card)).total == hf


def test_deepseek_v3_matches_published_counts():
    c = count_params(load_card("deepseek_v3_671b"))
    # arXiv:2412.19437 and the HF model card: 671B total, 37B activated, 685B with the 14B MTP module.
    assert abs(c.total / 671e9 - 1) < 0.005
    assert abs(c.total_with_mtp / 685e9 - 1) < 0.005
    assert abs(c.active_per_token / 37e9 - 1) < 0.02
    assert abs(c.mtp_with_copies / 14e9 - 1) < 0.05  # "14B of MTP" includes its embedding/head copies


def test_moonlight_matches_published_counts():
    # Moonlight-16B-A3B (arXiv:2502.16982, HF model card table): 15.29B total, 2.24B activated, counted
    # without the input embedding and the output head (2 x 163840 x 2048).
    m = load_card("moonlight_16b")
    c, emb_and_head = count_params(m), 2 * m.vocab_size * m.hidden_size
    assert abs((c.total - emb_and_head) / 15.29e9 - 1) < 0.001
    assert abs((c.active_per_token - emb_and_head) / 2.24e9 - 1) < 0.005


def test_micro_moe_counts_by_hand():
    # micro_moe: H 64, 2 layers (1 dense), 4 heads, q_lora 32, kv_lora 32, nope 16, rope 16, v 16,
    # ffn 128, expert ffn 32, 8 experts + 1 shared, top-2, vocab 128, 1 MTP layer.
    attn = 64 * 32 + 32 + 32 * (4 * 32) + 64 * (32 + 16) + 32 + 32 * (4 * (16 + 16)) + (4 * 16) * 64
    assert attn == 17472
    norms = 2 * 64
    dense = attn + norms + 3 * 64 * 128
    expert = 3 * 64 * 32
    moe = attn + norms + 8 * 64 + 8 + expert + 8 * expert  # router, bias, shared, routed
    emb = head = 128 * 64
    c = count_params(load_card("micro_moe"))
    assert c.total == emb + dense + moe + 64 + head == 132040
    assert c.mtp_own == 64 + 64 + 2 * 64 * 64 + 64 + moe
    assert c.mtp_with_copies == c.mtp_own + emb + head
    assert c.active_per_token == emb + dense + (moe - 8 * expert + 2 * expert) + 64 + head


def test_micro_moe_per_rank_bytes_by_hand():
    m = load_card("micro_moe")
    lay = Layout(tp=2, pp=2, ep=2, dp=1, sequence_parallel=True)  # world 4, experts: edp = 4/(2*1*2) = 1
    pl = plan(m, lay, Workload(seq_length=64, microbatches=4))
    s0, s1 = pl.stages
    # Stage 0: layer 0 (dense) + embedding. TP-split: q_b, kv_b, o, MLP, embedding; replicated: q_a,
    # kv_a, their norms, the two layer norms.
    tp0 = (4096 + 4096 + 4096 + 3 * 64 * 128 + 128 * 64) // 2
    rep0 = 2048 + 32 + 3072 + 32 + 128
    assert s0.params_per_rank == tp0 + rep0 == 27840
    assert s0.bytes["params"] == 2 * 27840 and s0.bytes["grads"] == 4 * 27840
    assert s0.bytes["optimizer"] == 12 * 27840  # dp*cp = 1: nothing to shard over
    # Stage 1: the MoE layer, final norm + head, the MTP layer and megatron's embedding copy.
    layer = 12288 // 2 + 5184 + 128 + 512 + 8 + 6144 // 2 + 4 * 6144  # 4 of 8 experts per EP rank
    mtp = 3 * 64 + 2 * 64 * 64 // 2 + layer
    assert s1.params_per_rank == layer + (64 + 8192 // 2) + mtp + 8192 // 2 == 91792
    trainable = 91792 - 2 * 8  # the two expert-bias buffers get no grads or Adam state
    assert s1.bytes["grads"] == 4 * trainable and s1.bytes["optimizer"] == 12 * trainable
    # Twice the data-parallel ranks: the distributed optimizer halves both the dense and expert shards.
    s1_dp2 = plan(m, Layout(tp=2, pp=2, ep=2, dp=2, sequence_parallel=True), Workload(seq_length=64)).stages[
        1
    ]
    assert s1_dp2.bytes["optimizer"] == 12 * trainable // 2
    # Refit (bf16): stage 0 sends its TP shards once (tp - 1 = 1) and half the main model over PP.
    assert s0.refit_send_bytes == 2 * 22528 + 2 * 132040 // 2
    assert s1.refit_send_bytes == 2 * ((6144 + 3072 + 4096) + 4 * 6144) + 2 * 132040 // 2


def test_activation_and_kv_by_hand():
    m = load_card("micro_moe")
    # Dense layer, tp 1, per token: 2H norm in/out + lora 2*32 + 2*32 + heads 4*(2*32 + 2*16) = 640;
    # MLP 3H + 3*ffn = 576; bf16.
    assert activation_bytes_per_token(m, False, Layout(), Precision()) == 2 * (640 + 576)
    # MLA caches kv_lora + rope per token per layer: (32 + 16) * 2 layers * 2 bytes.
    assert kv_bytes_per_token(m, Workload(seq_length=64)) == 192
    dsv3 = load_card("deepseek_v3_671b")
    assert kv_bytes_per_token(dsv3, Workload(seq_length=1)) == (512 + 64) * 61 * 2


DSV3 = load_card("deepseek_v3_671b", ["model.mtp_num_layers=0"])  # both public runs dropped MTP


def _peak_gib(pl) -> float:
    return max(max(s.phases.values()) for s in pl.stages) / GiB


def test_nemo_rl_256_and_512_gpu_layouts_fit_80gb():
    # NeMo-RL v0.4 performance summary: DeepSeek-V3 GRPO on 256 and 512 H100s, training
    # [TP, CP, EP, PP] = [1, 1, 16, 16], max sequence 1536, generation TP 32; recipe
    # grpo-deepseek-v3-32n8g.yaml: first stage 3 layers, last 2, activation checkpointing, vLLM 0.6.
    work = Workload(seq_length=1536, rollout_tp=32, gpu_memory_utilization=0.6)
    for dp in (16, 32):
        lay = Layout(tp=1, pp=16, ep=16, dp=dp, first_stage_layers=3, last_stage_layers=2, recompute="full")
        pl = plan(DSV3, lay, work)
        assert pl.fits, pl.problems
        assert _peak_gib(pl) < 80


def test_verl_layouts():
    # verl run_deepseek671b_math_megatron_80gb.sh: 256 H100, TP1 PP16 EP16, 4 layers first, 1 last,
    # full recompute, 2048 + 4096 tokens.
    lay = Layout(tp=1, pp=16, ep=16, dp=16, first_stage_layers=4, last_stage_layers=1, recompute="full")
    pl = plan(DSV3, lay, Workload(seq_length=6144, rollout_tp=32, gpu_memory_utilization=0.6))
    assert pl.fits and _peak_gib(pl) < 80, pl.problems
    # verl run_deepseek671b_math_megatron_96gb.sh: 96 H20 (96 GB), TP8 PP12 EP8, last stage 6 layers,
    # optimizer fully on the CPU (OFFLOAD_FRACTION=1); verl's docs say it needs that offload to run.
    lay96 = Layout(
        tp=8,
        pp=12,
        ep=8,
        dp=1,
        last_stage_layers=6,
        sequence_parallel=True,
        recompute="full",
        gpu_memory_gb=96,
        optimizer_on_host=True,
    )
    work96 = Workload(seq_length=2048 + 1204 * 8, rollout_tp=32, gpu_memory_utilization=0.6)
    assert plan(DSV3, lay96, work96).fits
    no_offload = plan(DSV3, Layout(**{**lay96.__dict__, "optimizer_on_host": False}), work96)
    assert not no_offload.fits and "optimizer" in no_offload.problems[0]


def test_too_small_layouts_refused_with_numbers():
    work = Workload(seq_length=1536, rollout_tp=32, gpu_memory_utilization=0.6)
    # The NeMo-RL split on half the GPUs: 32 experts per GPU per layer, unsharded Adam state.
    half = plan(
        DSV3,
        Layout(tp=1, pp=16, ep=8, dp=8, first_stage_layers=3, last_stage_layers=2, recompute="full"),
        work,
    )
    assert not half.fits and _peak_gib(half) > 80
    msg = half.problems[0]
    assert "GiB > budget 72.0 GiB" in msg and "optimizer 64.3 GiB" in msg
    # One node of 8 GPUs.
    one_node = plan(
        DSV3,
        Layout(tp=8, pp=1, ep=8, dp=1, sequence_parallel=True, recompute="full"),
        Workload(seq_length=1536, rollout_tp=8),
    )
    assert not one_node.fits and _peak_gib(one_node) > 1000
    # Nor is there room for one sequence of KV cache: with vLLM TP 8 each GPU holds 1/8 of 1.25 TiB of
    # weights, more than vLLM's whole share.
    assert any("KV for 0 tokens" in p for p in one_node.problems)


def test_bad_layouts_refused():
    work = Workload(seq_length=1024)
    with pytest.raises(ConfigError, match=r"parallel\.ep\(512\) > physical expert slots\(256\)"):
        plan(DSV3, Layout(tp=1, pp=1, ep=512, dp=512), work)
    with pytest.raises(
        ConfigError, match=r"parallel\.tp\(3\) does not divide model\.num_attention_heads\(128\)"
    ):
        plan(DSV3, Layout(tp=3, dp=1), work)
    with pytest.raises(ConfigError, match=r"parallel\.pp\(16\) does not divide model\.num_layers\(61\)"):
        plan(DSV3, Layout(pp=16, ep=1, dp=1), work)  # 61 layers do not split over 16 stages evenly
    with pytest.raises(ConfigError, match=r"ep\(8\)\*etp\(1\)\*pp\(2\) does not divide world\(8\)"):
        plan(load_card("micro_moe"), Layout(pp=2, ep=8, dp=4), work)


def test_plan_cli_json_and_exit_codes(capsys):
    assert plan_main(["configs/dsv3_671b_grpo_256xh100.yaml", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and out["total_params"] == count_params(DSV3).total
    assert {"total_params_with_mtp", "active_params_per_token"} <= out.keys()
    assert {"params", "grads", "optimizer", "activations", "logits"} <= out["per_rank"].keys()
    assert out["layout"]["world"] == 256 and out["rollout"]["kv_bytes_per_token"] == 70272
    # Half the GPUs does not fit (exit 1, reasons printed); a broken layout is a config error (exit 2).
    assert plan_main(["configs/dsv3_671b_grpo_256xh100.yaml", "parallel.ep=8", "parallel.dp=8"]) == 1
    assert "fits: NO" in capsys.readouterr().out
    assert plan_main(["configs/dsv3_671b_grpo_256xh100.yaml", "parallel.tp=3"]) == 2
    assert "parallel.tp(3) does not divide model.num_attention_heads(128)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config", ["dsv3_671b_grpo_256xh100", "dsv3_671b_grpo_512xh100", "moonlight_16b_grpo_16xh100"]
)
def test_shipped_gpu_configs_fit(config, capsys):
    assert plan_main([f"configs/{config}.yaml"]) == 0
    assert "fits: yes" in capsys.readouterr().out
