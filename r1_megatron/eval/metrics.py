"""Evaluation metrics over k sampled responses per prompt (docs/architecture.md): pure functions.

- pass@1: the mean correctness of the k samples of a prompt, averaged over prompts (DeepSeek-R1 §3).
- cons@k: the correctness of the majority-vote answer among the k samples' extracted answers.
- pass@k: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k).

Voting (see `majority_vote`):
- answers are clustered by equivalence, decided by math-verify (through `check_answer`, the same
  comparison the accuracy reward uses), so "0.5" and "\\frac{1}{2}" are one vote;
- a sample whose answer could not be extracted (None) does not vote; a prompt where no sample voted
  counts as wrong for cons@k;
- each answer joins the first existing cluster (in order of creation) whose first answer it is
  equivalent to, else it starts a new cluster; so clusters are ordered by their first occurrence;
- the largest cluster wins; among equally large ones, the cluster whose first occurrence comes earliest
  in sample order wins;
- the majority answer is correct when the winning cluster's first sample was scored correct against
  the ground truth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

Equivalent = Callable[[str, str], bool]  # (earlier answer, later answer) -> same answer?


class Vote(NamedTuple):
    """The outcome of a majority vote over one prompt's samples.

    index: the sample whose answer represents the winning cluster (its first member);
    votes: the size of the winning cluster; clusters: every cluster as sample indices, in order of
    first occurrence.
    """

    index: int
    votes: int
    clusters: list[list[int]]


def math_equivalent(earlier: str, later: str) -> bool:
    """math-verify (with the sympy fallback) judging `later` against `earlier` as the reference."""
    from r1_megatron.reward.math_reward import check_answer

    return check_answer(later, earlier)[0]


def pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over prompts of the share of correct samples; correct[i][j] is sample j of prompt i."""
    if not correct:
        raise ValueError("pass_at_1: no prompts")
    for i, row in enumerate(correct):
        if not row:
            raise ValueError(f"pass_at_1: prompt {i} has no samples")
    return sum(sum(map(bool, row)) / len(row) for row in correct) / len(correct)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples with c correct.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which equals 1 - C(n-c, k)/C(n, k) without the
    huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c({c}) <= n({n}) and 1 <= k({k}) <= n")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over prompts (each prompt needs at least k samples)."""
    if not correct:
        raise ValueError("mean_pass_at_k: no prompts")
    return sum(pass_at_k(len(row), sum(map(bool, row)), k) for row in correct) / len(correct)


def majority_vote(answers: Sequence[str | None], equivalent: Equivalent = math_equivalent) -> Vote | None:
    """The majority answer among `answers` (None: not extracted, no vote); None when nobody voted.

    Identical strings are one answer without asking `equivalent`; otherwise `equivalent(first answer
    of a cluster, this answer)` decides, clusters tried in order of first occurrence. The rule for ties
    is in the module docstring: the earliest first occurrence wins.
    """
    clusters: list[list[int]] = []
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for cluster in clusters:
            head = answers[cluster[0]]
            if answer == head or equivalent(head, answer):
                cluster.append(i)
                break
        else:
            clusters.append([i])
    if not clusters:
        return None
    # max() keeps the first of equal maxima, and clusters are ordered by first occurrence.
    best = max(clusters, key=len)
    return Vote(best[0], len(best), clusters)


def consensus_correct(
    answers: Sequence[str | None], correct: Sequence[bool], equivalent: Equivalent = math_equivalent
) -> bool:
    """Whether the majority-vote answer of one prompt is correct (False when no sample voted)."""
    if len(answers) != len(correct):
        raise ValueError(f"consensus_correct: {len(answers)} answers but {len(correct)} correctness flags")
    vote = majority_vote(answers, equivalent)
    return vote is not None and bool(correct[vote.index])


def cons_at_k(
    answers: Sequence[Sequence[str | None]],
    correct: Sequence[Sequence[bool]],
    equivalent: Equivalent = math_equivalent,
) -> float:
    """Share of prompts whose majority-vote answer is correct; answers[i][j] belongs to correct[i][j]."""
    if not answers or len(answers) != len(correct):
        raise ValueError(f"cons_at_k: need as many answer rows ({len(answers)}) as correctness rows "
                         f"({len(correct)}), at least one")
    return sum(consensus_correct(a, c, equivalent) for a, c in zip(answers, correct)) / len(answers)

