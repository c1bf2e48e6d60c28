"""Evaluate a policy: k samples per prompt at T = 0.6, top-p 0.95 (docs/grpo.md), checked by the
rule-based verifiers, summarized as pass@1, cons@k and pass@k; and the held-out accuracy a GRPO run
measures on its own engine and reward pool (`heldout_correct`).

    report = evaluate(engine, tokenizer, items, k=4, sampling=eval_sampling(max_tokens=512))
    print(format_table(report))

The report (JSON-ready):
- "pass_at_1", "cons_at_k" (over the prompts that vote: math and countdown; code prompts have no
  answer to vote with and are left out, see "cons_prompts"), "pass_at_k" {"1", "2", ..., "k"};
- "reward_errors" {type: count} over the samples (timeouts, crashes, sandbox violations, parse errors:
  each such sample is scored wrong, and counted here), "equivalence_errors" (failed vote checks);
- "truncated", "mean_tokens", "by_task" {task: {"prompts", "pass_at_1", "cons_at_k"}};
- "prompts": per prompt its id, task, gold answer, pass@1, majority answer and whether it is correct,
  and every sample: extracted answer, correct, num_tokens, finish_reason, error, text.

Departures from DeepSeek-R1's protocol: R1 reports cons@64 on AIME only; here every prompt with an
extractable answer votes, and a sample with a reward error still votes with its extracted answer (only
its correctness is lost). Countdown answers are expressions and vote by value (math-verify evaluates
them), so two expressions making the same number are one vote; the cluster's first expression decides
whether the majority is correct. The vote compares every pair of distinct answers of a prompt in the
reward pool: at most k(k-1)/2 checks per prompt, fewer when answers repeat.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from r1_megatron.config.schema import JobConfig, RewardConfig
from r1_megatron.eval.metrics import majority_vote, mean_pass_at_k, pass_at_1
from r1_megatron.eval.scoring import (
    Generation,
    TaskScorer,
    equivalence_table,
    extract_final,
    generate_and_score,
    item_kind,
)
from r1_megatron.reward.registry import RewardResult
from r1_megatron.rollout.engine import RolloutEngine, SamplingParams

EVAL_TEMPERATURE = 0.6
EVAL_TOP_P = 0.95


def eval_sampling(max_tokens: int = 512, temperature: float = EVAL_TEMPERATURE, top_p: float = EVAL_TOP_P,
                  seed: int | None = 0) -> SamplingParams:
    """The documented eval sampling (T 0.6, top-p 0.95), stopping at EOS."""
    return SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)


def make_pool(reward_cfg: RewardConfig | None = None, code_mode: str = "all") -> Any:
    """A RewardPool running TaskScorer with the configured workers, timeout and sandbox."""
    from r1_megatron.reward.pool import RewardPool

    cfg = reward_cfg or RewardConfig()
    return RewardPool(num_workers=cfg.num_workers, timeout_s=cfg.timeout_s,
                      scorer=TaskScorer(cfg.sandbox, code_mode))


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    items: list[dict],
    *,
    k: int = 4,
    sampling: SamplingParams | None = None,
    reward_cfg: RewardConfig | None = None,
    pool: Any = None,
    chat: bool = False,
    keep_text: bool = True,
    batch_prompts: int = 32,
) -> dict:
    """Generate k samples per item with `engine`, score them, and return the report (module docstring).

    `pool` (a RewardPool running TaskScorer) is used when given, else one is made from `reward_cfg`
    and closed at the end.
    """
    if not items:
        raise ValueError("evaluate: no prompts")
    sampling = sampling or eval_sampling()
    own_pool = pool is None
    pool = make_pool(reward_cfg) if own_pool else pool
    try:
        generations, rewards = generate_and_score(engine, tokenizer, items, k, sampling, pool, chat=chat,
                                                  batch_prompts=batch_prompts)
        report = build_report(items, generations, rewards, pool, keep_text=keep_text)
    finally:
        if own_pool:
            pool.close()
    report["sampling"] = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                          "max_tokens": sampling.max_tokens, "seed": sampling.seed}
    return report


def heldout_items(cfg: JobConfig, tokenizer, n: int | None = None) -> list[dict]:
    """The first n (default data.num_eval) items of the job's eval split, with their prompt ids."""
    from r1_megatron.data.chat import encode_prompt
    from r1_megatron.data.tasks import make_items
    from r1_megatron.data.tasks import task_kwargs

    items = make_items(n=n or cfg.data.num_eval, **task_kwargs(cfg, "eval"))
    for item in items:
        item["prompt_ids"] = encode_prompt(tokenizer, item["prompt"], chat=cfg.data.chat)
    return items


def heldout_correct(engine, pool, tokenizer, cfg: JobConfig, n: int | None = None,
                    share: Callable[[int], list[int]] | None = None) -> list[float]:
    """Held-out accuracy during RL: the 'accuracy' reward component of each of cfg.rl.eval_samples
    samples per prompt (eval sampling, seed cfg.seed + 7), scored by the run's own reward pool, for
    the prompts `share(len(items))` picks (default: all). Each prompt's samples are seeded by its
    index, so an item scores the same whichever engine generates it. pool None: generate only, return []."""
    from r1_megatron.data.tasks import ground_truth

    items = heldout_items(cfg, tokenizer, n)
    picked = share(len(items)) if share is not None else list(range(len(items)))
    items = [items[i] for i in picked]
    sampling = eval_sampling(cfg.rollout.max_new_tokens, seed=cfg.seed + 7)
    prompts = [it["prompt_ids"] for it in items]
    outs = engine.generate(prompts, n=cfg.rl.eval_samples, sampling=sampling, keys=picked)
    if pool is None:
        return []
    pairs = [(tokenizer.decode(s.token_ids, skip_special_tokens=True), ground_truth(it))
             for it, gens in zip(items, outs, strict=True) for s in gens]
    return [r.components.get("accuracy", 0.0) for r in pool.score(pairs)]


def _ks(k: int) -> list[int]:
    """1, 2, 4, ... below k, then k."""
    ks, m = [], 1
    while m < k:
        ks.append(m)
        m *= 2
    return ks + [k]


def build_report(
    items: list[dict],
    generations: list[list[Generation]],
    rewards: list[list[RewardResult]],
    pool: Any,
    *,
    keep_text: bool = True,
) -> dict:
    """The report for scored samples; `pool` (running TaskScorer) decides answer equivalence for the vote."""
    if not (len(items) == len(generations) == len(rewards)):
        raise ValueError(f"build_report: {len(items)} items, {len(generations)} generation groups, "
                         f"{len(rewards)} reward groups")
    k = len(generations[0])
    if any(len(row) != k for row in generations) or any(len(row) != k for row in rewards):
        raise ValueError(f"build_report: every prompt needs the same number of samples ({k})")
    answers = [[extract_final(g.text, item) for g in row] for item, row in zip(items, generations)]
    correct = [[r.score >= 1.0 for r in row] for row in rewards]
    voting = [i for i, item in enumerate(items) if item_kind(item) != "code"]
    tables, equivalence_errors = equivalence_table(pool, [answers[i] for i in voting])
    table_of = dict(zip(voting, tables))

    errors: Counter[str] = Counter()
    prompts = []
    for i, item in enumerate(items):
        cons, majority, votes = None, None, 0
        if i in table_of:
            table = table_of[i]
            vote = majority_vote(answers[i], lambda a, b, t=table: t[(a, b)] if (a, b) in t else t[(b, a)])
            cons = vote is not None and correct[i][vote.index]
            if vote is not None:
                majority, votes = answers[i][vote.index], vote.votes
        samples = []
        for g, r, a, c in zip(generations[i], rewards[i], answers[i], correct[i]):
            errors.update(e for e in (r.error or "").split(",") if e)
            sample = {"answer": a, "correct": c, "num_tokens": g.num_tokens, "finish_reason": g.finish_reason,
                      "error": r.error}
            if keep_text:
                sample["text"] = g.text
            samples.append(sample)
        gold = item.get("answer")
        if item_kind(item) == "countdown":
            gold = f"{item['target']} from {item['numbers']}"
        prompts.append({"id": item.get("id", str(i)), "task": item.get("task", item_kind(item)), "gold": gold,
                        "pass_at_1": sum(correct[i]) / k, "cons_correct": cons, "majority_answer": majority,
                        "votes": votes, "samples": samples})

    flat = [g for row in generations for g in row]
    report = {
        "k": k,
        "num_prompts": len(items),
        "num_samples": len(flat),
        "pass_at_1": pass_at_1(correct),
        "cons_at_k": _mean([p["cons_correct"] for p in prompts if p["cons_correct"] is not None]),
        "cons_prompts": len(voting),
        "pass_at_k": {str(m): mean_pass_at_k(correct, m) for m in _ks(k)},
        "reward_errors": dict(sorted(errors.items())),
        "equivalence_errors": equivalence_errors,
        "truncated": sum(g.truncated for g in flat),
        "mean_tokens": sum(g.num_tokens for g in flat) / len(flat),
        "by_task": _by_task(prompts),
        "prompts": prompts,
    }
    return report


def _mean(values: list) -> float | None:
    return sum(map(float, values)) / len(values) if values else None


def _by_task(prompts: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for task in dict.fromkeys(p["task"] for p in prompts):
        rows = [p for p in prompts if p["task"] == task]
        out[task] = {"prompts": len(rows), "pass_at_1": _mean([p["pass_at_1"] for p in rows]),
                     "cons_at_k": _mean([p["cons_correct"] for p in rows if p["cons_correct"] is not None])}
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(report: dict) -> str:
    """A plain-text summary: one row per task and a total row (pass@1 and cons@k in percent)."""
    k = report["k"]
    head = f"{'task':<16}{'prompts':>8}{'pass@1':>9}{f'cons@{k}':>9}"
    lines = [head, "-" * len(head)]
    for task, row in report["by_task"].items():
        lines.append(f"{task:<16}{row['prompts']:>8}{_pct(row['pass_at_1']):>9}{_pct(row['cons_at_k']):>9}")
    lines.append("-" * len(head))
    lines.append(f"{'all':<16}{report['num_prompts']:>8}{_pct(report['pass_at_1']):>9}"
                 f"{_pct(report['cons_at_k']):>9}")
    errors = ", ".join(f"{name} {n}" for name, n in report["reward_errors"].items()) or "none"
    lines.append(f"samples {report['num_samples']}, truncated {report['truncated']}, "
                 f"mean tokens {report['mean_tokens']:.1f}, reward errors: {errors}")
    return "\n".join(lines)
