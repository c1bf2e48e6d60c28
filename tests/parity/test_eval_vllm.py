"""Eval and rejection sampling end to end on the real vLLM engine, with a tiny DeepSeek-V3 checkpoint.

The checkpoint is transformers' DeepseekV3ForCausalLM with the tiny_moe card's shape and random
weights, except that it is programmed to answer: every attention output projection and every MLP /
expert down projection is zero, so the residual stream is the token embedding and the next token
depends on the current one only. Embeddings and lm_head then encode a small chain,
    (any prompt end) -> "</think>" -> "\\boxed{" -> "7" (p 3/4 at T = 0.6) or "8" (p 1/4) -> "}" -> EOS,
so each sample is "</think>\\boxed{7}" or "</think>\\boxed{8}", drawn by vLLM's own sampler. With gold
answers 7, 8 and 9 the three prompts get mostly right, mostly wrong and never right samples. A prompt
ending in "~" loops on "~" until the token cap.

Guarantees:
- `r1m eval` on vLLM writes the documented report; each sample's correctness equals the accuracy
  reward rescoring its text in this process; pass@1 equals the value recomputed from the per-sample
  fields, and each majority answer equals a vote counted here from the extracted answers; a bad line
  of the prompt file is named by number and the good lines are still evaluated;
- rejection sampling (its CLI) keeps exactly the samples whose answer is the gold one, with
  provenance, drops every sample cut by the token cap, mixes non-reasoning pairs at the configured
  fraction, drops prompts overlapping the eval prompts, and names a bad prompt line while the good
  ones still run.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from dataclasses import replace

import pytest
import torch

pytest.importorskip("vllm")

from r1_megatron.config.loader import load_card  # noqa: E402
from r1_megatron.data.tokenizer import ASSET_DIR, load_tokenizer  # noqa: E402
from r1_megatron.model.random_hf import hf_model  # noqa: E402
from r1_megatron.reward.math_reward import math_reward  # noqa: E402

THINK_CLOSE, BOX, EOS = 7, 10, 1  # ids fixed by the shipped tokenizer (data/tokenizer.py)
TILDE = 104  # "~" in the shipped tokenizer
LOGIT = 30.0  # at T = 0.6 the tokens outside the chain share a probability below 1e-18
ITEMS = [  # gold 7: mostly right; 8: mostly wrong; 9: never right
    {"prompt": "What is 3 + 4? Assistant: <think>", "answer": "7"},
    {"prompt": "What is 4 + 4? Assistant: <think>", "answer": "8"},
    {"prompt": "What is 4 + 5? Assistant: <think>", "answer": "9"},
]
K = 8


def program_chain(model, chain: dict[int, dict[int, float]], start: dict[int, float]) -> None:
    """Make `model` a bigram model: token t is followed by u with logit chain[t][u] (start: for any token
    not in the chain). Hidden coordinate 0 carries "start", coordinate s + 1 the s-th chain token."""
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()  # attention and MLPs add nothing: the residual stream stays the embedding
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0
        head.zero_()
        model.model.norm.weight.fill_(1.0)
        # RMSNorm turns a one-hot embedding into sqrt(hidden) times the one-hot.
        scale = math.sqrt(hidden)
        for nxt, logit in start.items():
            head[nxt, 0] = logit / scale
        for s, (tok, outs) in enumerate(sorted(chain.items()), start=1):
            emb[tok].zero_()
            emb[tok, s] = 1.0
            for nxt, logit in outs.items():
                head[nxt, s] = logit / scale


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = load_tokenizer()
    seven, eight, close = (tok.convert_tokens_to_ids(c) for c in ("7", "8", "}"))
    # "7" over "8" at odds 3:1 after temperature 0.6: logit gap 0.6 * ln 3.
    chain = {THINK_CLOSE: {BOX: LOGIT}, BOX: {seven: LOGIT, eight: LOGIT - 0.6 * math.log(3)},
             seven: {close: LOGIT}, eight: {close: LOGIT}, close: {EOS: LOGIT},
             TILDE: {TILDE: LOGIT}}
    model = hf_model(replace(load_card("tiny_moe"), mtp_num_layers=0), seed=0)
    program_chain(model, chain, start={THINK_CLOSE: LOGIT})
    model.config.bos_token_id, model.config.eos_token_id = 0, EOS
    path = tmp_path_factory.mktemp("programmed_dsv3")
    model.save_pretrained(path)
    for f in ASSET_DIR.iterdir():
        shutil.copy(f, path)
    return path


def _vote(answers: list[str | None]) -> str | None:
    """Majority by plain counting; ties to the answer seen first (these answers are digits)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def test_eval_cli_report_on_vllm(model_dir, tmp_path, capsys):
    from r1_megatron.cli.eval import main

    prompts = tmp_path / "set.jsonl"
    lines = [json.dumps(item) for item in ITEMS]
    lines.insert(1, '{"prompt": "no answer"}')
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "report.json"
    assert main(["--model", str(model_dir), "--prompts", str(prompts), "--k", str(K), "--max-tokens", "8",
                 "--seed", "3", "--workers", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"{prompts}:2: missing field 'answer'" in captured.err
    assert "pass@1" in captured.out and f"cons@{K}" in captured.out
    report = json.loads(out.read_text())
    assert report["input_errors"] == [f"{prompts}:2: missing field 'answer'"]
    assert {"k", "num_prompts", "num_samples", "pass_at_1", "cons_at_k", "pass_at_k", "reward_errors",
            "truncated", "by_task", "prompts", "sampling"} <= set(report)
    assert (report["k"], report["num_prompts"], report["num_samples"]) == (K, 3, 3 * K)
    assert report["sampling"] == {"temperature": 0.6, "top_p": 0.95, "max_tokens": 8, "seed": 3}
    assert report["reward_errors"] == {} and report["truncated"] == 0
    answers = []
    for item, row, line in zip(ITEMS, report["prompts"], (1, 3, 4), strict=True):
        assert row["id"] == f"set:{line}" and row["gold"] == item["answer"] and len(row["samples"]) == K
        for s in row["samples"]:
            assert s["text"] in ("</think>\\boxed{7}", "</think>\\boxed{8}")
            assert (s["finish_reason"], s["num_tokens"]) == ("stop", 5)  # 4 tokens and EOS
            assert s["correct"] == (math_reward(s["text"], item["answer"]).score == 1.0)
            assert s["correct"] == (s["answer"] == item["answer"])
        row_answers = [s["answer"] for s in row["samples"]]
        answers += row_answers
        assert row["majority_answer"] == _vote(row_answers)
        assert row["cons_correct"] == (row["majority_answer"] == item["answer"])
    assert {"7", "8"} <= set(answers)  # sampled, not one greedy answer copied
    recomputed = sum(sum(s["correct"] for s in p["samples"]) / K for p in report["prompts"]) / 3
    assert report["pass_at_1"] == pytest.approx(recomputed)
    assert report["cons_at_k"] == pytest.approx(sum(p["cons_correct"] for p in report["prompts"]) / 3)
    assert report["prompts"][2]["pass_at_1"] == 0.0 and report["prompts"][2]["cons_correct"] is False


def test_rejection_cli_on_vllm(model_dir, tmp_path, capsys):
    from r1_megatron.cli.rejection import main

    prompts, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    lines = [json.dumps(item) for item in ITEMS]
    lines.insert(1, "not json")
    lines.append(json.dumps({"prompt": "Repeat the tilde: ~", "answer": "1"}))  # loops on "~" to the cap
    prompts.write_text("\n".join(lines) + "\n")
    # The eval set holds q9's prompt in other case and spacing: it is dropped before sampling.
    evals.write_text(json.dumps({"prompt": "what is 4+5 ?  assistant: <THINK>", "answer": "9"}) + "\n")
    out, report_path = tmp_path / "sft.jsonl", tmp_path / "report.json"
    assert main(["--model", str(model_dir), "--prompts", str(prompts), "--eval-prompts", str(evals),
                 "--out", str(out), "--report", str(report_path), "--k", str(K), "--max-tokens", "8",
                 "--seed", "5", "--no-dedupe", "--non-reasoning-fraction", "0.25"]) == 0
    assert f"{prompts}:2: invalid JSON" in capsys.readouterr().err
    report = json.loads(report_path.read_text())
    assert report["input_errors"] == [f"{prompts}:2: invalid JSON (Expecting value at column 1)"]
    assert report["prompts"] == 4 and report["decontam"]["dropped"] == 1
    assert report["samples"] == 3 * K and report["rejected/truncated"] == K  # every loop sample
    records = [json.loads(line) for line in out.read_text().splitlines()]
    kept = [r for r in records if r["source"] == "rejection_sampling"]
    # Every rejected sample is wrong: so the kept ones are exactly the correct ones.
    assert report["kept"] == len(kept) > 0
    assert report["rejected"] == report["rejected/wrong"] == 3 * K - len(kept)
    for r in kept:
        gold = {"train:1": "7", "train:3": "8"}[r["prompt_id"]]
        assert r["response"] == f"</think>\\boxed{{{gold}}}" and r["answer"] == gold
        assert r["id"] == f"{r['prompt_id']}/{r['sample_index']}" and 0 <= r["sample_index"] < K
        assert r["rewards"]["correct"] == r["rewards"]["format"] == 1.0 and r["num_tokens"] == 5
        assert r["model"] == str(model_dir)
    assert len({r["id"] for r in records}) == len(records)
    added = [r for r in records if r["source"] == "non_reasoning"]
    assert len(added) == report["non_reasoning"] == round(0.25 * len(kept) / 0.75)
    assert report["written"] == len(records) == len(kept) + len(added)
