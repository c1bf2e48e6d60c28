"""Eval metrics and the eval report, without an engine.

Guarantees:
- pass@1, cons@k and pass@k equal hand-counted values on fixed samples (the counting is in comments);
  pass@k's product form equals brute-force enumeration of every k-subset;
- the majority vote merges answers that math-verify calls equal ("0.5" and "\\frac{1}{2}"), which can
  change the winner against plain string voting; ties go to the cluster seen first; unextractable
  answers do not vote, and a prompt where none voted counts as wrong;
- `build_report` on planted responses (math, countdown, code run in the sandbox, an unparseable gold)
  marks exactly the right samples correct, counts the reward error, and its pass@1 / cons@k are the
  ones recomputed from its own per-sample fields;
- prompt files with bad lines are reported by line number while the good lines are kept, and
  `r1m eval` refuses bad arguments with a one-line message naming the flag.
"""

from __future__ import annotations

import itertools
import json

import pytest

from r1_megatron.config.schema import RewardConfig
from r1_megatron.eval.metrics import (
    cons_at_k,
    consensus_correct,
    majority_vote,
    mean_pass_at_k,
    pass_at_1,
    pass_at_k,
)
from r1_megatron.eval.runner import build_report, format_table, make_pool
from r1_megatron.eval.scoring import Generation, TaskScorer, ground_truth, read_prompt_file

T, F = True, False


def test_pass_at_1_hand_counted():
    # prompt 0: 2 of 4 correct -> 0.5; prompt 1: 4 of 4 -> 1.0; prompt 2: 0 of 4 -> 0.0; prompt 3: 1 of 4
    # -> 0.25. Mean over prompts: (0.5 + 1 + 0 + 0.25) / 4 = 0.4375.
    correct = [[T, F, F, T], [T, T, T, T], [F, F, F, F], [F, F, T, F]]
    assert pass_at_1(correct) == pytest.approx(0.4375)
    # Unequal sample counts: (1/2 + 3/3) / 2 = 0.75, while pooling would give 4/5 = 0.8.
    assert pass_at_1([[T, F], [T, T, T]]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="prompt 1 has no samples"):
        pass_at_1([[T], []])


@pytest.mark.parametrize("n,c,k,expected", [
    (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (4, 0, 2, 0.0),  # no correct sample
    (4, 3, 2, 1.0),  # n - c = 1 < k: every 2-subset holds a correct one
    (8, 2, 1, 0.25),  # pass@1 is c/n
])
def test_pass_at_k_hand_counted(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_equals_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    # averaged over prompts: (pass@2 of 1/4 correct = 0.5) and (pass@2 of 4/4 = 1) -> 0.75
    assert mean_pass_at_k([[T, F, F, F], [T, T, T, T]], 2) == pytest.approx(0.75)


def test_math_verify_merges_votes_and_changes_the_winner():
    answers = ["0.5", "\\frac{1}{2}", "1/3", "1/3", None]
    # math-verify: {0.5, 1/2} (samples 0, 1) and {1/3} (samples 2, 3): a 2-2 tie, and the cluster seen
    # first (sample 0) wins. Sample 4 has no answer and does not vote.
    vote = majority_vote(answers)
    assert vote.index == 0 and vote.votes == 2 and vote.clusters == [[0, 1], [2, 3]]
    # By string equality "1/3" would win 2 votes to 1.
    strings = majority_vote(answers, equivalent=lambda a, b: a == b)
    assert strings.index == 2 and strings.votes == 2 and strings.clusters == [[0], [1], [2, 3]]
    # Three spellings of one half against two "1/3": a 3-2 win for the half wherever it comes first.
    vote = majority_vote(["1/3", "0.5", "1/3", "\\frac{1}{2}", "\\dfrac{2}{4}"])
    assert vote.index == 1 and vote.votes == 3 and vote.clusters == [[0, 2], [1, 3, 4]]


def test_ties_go_to_the_earliest_first_occurrence():
    # 2-2 tie between "3" (first at 0) and "4" (first at 1): "3" wins.
    assert majority_vote(["3", "4", "4", "3"]).index == 0
    # Same votes, "4" seen first: "4" wins.
    assert majority_vote(["4", "3", "3", "4"]).index == 0
    # 1-1-1: the first answer wins; with unextracted samples in front, the first that voted wins.
    assert majority_vote(["7", "8", "9"]).index == 0
    assert majority_vote([None, None, "9", "8"]).index == 2
    # A larger cluster beats an earlier one: "5" at 0 has one vote, "6" has two.
    assert majority_vote(["5", "6", "6"]).index == 1


def test_no_vote_counts_as_wrong_and_cons_at_k_hand_counted():
    assert majority_vote([None, None]) is None
    assert consensus_correct([None, None], [F, F]) is False
    answers = [
        ["12", "12", "13", None],  # majority "12" (2 votes): its first sample (0) is correct -> 1
        ["0.5", "\\frac{1}{2}", "2", "2"],  # tie 2-2, the half is first: sample 0 is wrong -> 0
        [None, None, None, None],  # nobody voted -> 0
        ["x+1", "1+x", "x", "y"],  # {x+1, 1+x} has 2 votes: sample 0 correct -> 1
    ]
    correct = [[T, T, F, F], [F, F, T, T], [F, F, F, F], [T, T, F, F]]
    # cons@4 = (1 + 0 + 0 + 1) / 4 = 0.5; pass@1 = (2/4 + 2/4 + 0 + 2/4) / 4 = 0.375
    assert cons_at_k(answers, correct) == pytest.approx(0.5)
    assert pass_at_1(correct) == pytest.approx(0.375)


def test_equivalent_is_asked_only_for_different_strings():
    asked = []

    def equivalent(a, b):
        asked.append((a, b))
        return False

    majority_vote(["1", "1", "2", "1", "2"], equivalent)
    # "1" opens a cluster; the second "1" is identical; "2" is compared with "1"; later "1" joins at
    # once; the last "2" is compared with "1" (head of the first cluster) before joining its own.
    assert asked == [("1", "2"), ("1", "2")]


# ---------------------------------------------------------------- the report on planted samples

def _gen(text: str, tokens: int = 10, finish: str = "stop") -> Generation:
    return Generation(text, tokens, finish)


ECHO = "import sys\ndef echo(s):\n    return s\n"
ITEMS = [
    {"id": "m1", "task": "math", "prompt": "What is half of one?", "answer": "\\frac{1}{2}"},
    {"id": "c1", "task": "countdown", "prompt": "Make 38 from 3 5 7", "answer": "3+5*7", "numbers": [3, 5, 7],
     "target": 38},
    {"id": "p1", "task": "code", "prompt": "echo",
     "tests": [{"input": "hi\n", "output": "hi\n"}, "assert echo('a') == 'a'"]},
    {"id": "g1", "task": "math", "prompt": "bad gold", "answer": "}{"},
]
GENERATIONS = [
    # 0.5 and 1/2 correct and one vote; 1/3 wrong; "none" has no answer. Correct: T T F F.
    [_gen(" half </think> \\boxed{0.5}"), _gen(" </think> \\boxed{\\frac{1}{2}}"),
     _gen(" </think> \\boxed{1/3}"), _gen(" no idea </think> maybe", 64, "length")],
    # 5*7+3 and 7*5+3 use each number once and make 38; 38 alone does not use the numbers; 3+5+7 = 15.
    # Correct: T T F F. Votes: all of 5*7+3, 7*5+3, 38 equal 38 numerically -> 3 votes, head correct.
    [_gen("</think> \\boxed{5*7+3}"), _gen("</think> \\boxed{7*5+3}"), _gen("</think> \\boxed{38}"),
     _gen("</think> \\boxed{3+5+7}")],
    # Code: passes both tests; passes only the assert; no code block (error "no_code"); fails both.
    # Correct ("all" tests): T F F F.
    [_gen(f"</think>\n```python\n{ECHO}print(sys.stdin.read(), end='')\n```\n"),
     _gen(f"</think>\n```python\n{ECHO}print('no')\n```\n"),
     _gen("</think> I cannot"),
     _gen("</think>\n```python\nimport sys\nprint(sys.stdin.read().upper())\n```\n")],
    # The gold answer cannot be parsed: every sample errs ("gold_parse_error") and is wrong.
    [_gen("</think> \\boxed{1}"), _gen("</think> \\boxed{1}"), _gen("</think> \\boxed{2}"),
     _gen("</think> x")],
]
CORRECT = [[T, T, F, F], [T, T, F, F], [T, F, F, F], [F, F, F, F]]


@pytest.fixture(scope="module")
def pool():
    with make_pool(RewardConfig(num_workers=1)) as p:  # one worker: its start dominates on 2 cores
        yield p


@pytest.fixture(scope="module")
def report(pool):
    tickets = [pool.submit([(g.text, ground_truth(item)) for g in row])
               for item, row in zip(ITEMS, GENERATIONS)]
    rewards = [pool.wait(t) for t in tickets]
    return build_report(ITEMS, GENERATIONS, rewards, pool)


def test_report_marks_exactly_the_right_samples(report):
    assert [[s["correct"] for s in p["samples"]] for p in report["prompts"]] == CORRECT
    assert [p["id"] for p in report["prompts"]] == ["m1", "c1", "p1", "g1"]
    # sample errors: 1 no_code (code prompt) + 3 gold_parse_error (the three answers of g1; "x" has none)
    assert report["reward_errors"] == {"gold_parse_error": 3, "no_code": 1}
    assert report["truncated"] == 1 and report["num_samples"] == 16


def test_report_metrics_hand_counted_and_recomputed(report):
    # pass@1 = (2/4 + 2/4 + 1/4 + 0) / 4 = 0.3125
    assert report["pass_at_1"] == pytest.approx(0.3125)
    recomputed = sum(sum(s["correct"] for s in p["samples"]) / len(p["samples"]) for p in report["prompts"])
    assert report["pass_at_1"] == pytest.approx(recomputed / len(report["prompts"]))
    # cons@4 over the voting prompts m1, c1, g1: m1 majority 0.5 (2 votes) correct, c1 majority 5*7+3
    # (3 votes) correct, g1 majority "1" (2 votes) wrong -> 2/3. The code prompt does not vote.
    by_id = {p["id"]: p for p in report["prompts"]}
    def vote(pid):
        return by_id[pid]["majority_answer"], by_id[pid]["votes"], by_id[pid]["cons_correct"]

    assert vote("m1") == ("0.5", 2, True)
    assert vote("c1") == ("5*7+3", 3, True)
    assert (by_id["g1"]["majority_answer"], by_id["g1"]["cons_correct"]) == ("1", False)
    assert by_id["p1"]["cons_correct"] is None
    assert report["cons_at_k"] == pytest.approx(2 / 3) and report["cons_prompts"] == 3
    # pass@4 = share of prompts with any correct sample = 3/4; pass@2: m1 and c1 1 - C(2,2)/C(4,2) = 5/6,
    # p1 1 - C(3,2)/C(4,2) = 1/2, g1 0 -> (5/6 + 5/6 + 1/2) / 4
    assert report["pass_at_k"]["4"] == pytest.approx(0.75)
    assert report["pass_at_k"]["2"] == pytest.approx((5 / 6 + 5 / 6 + 0.5) / 4)
    assert report["by_task"]["math"] == {"prompts": 2, "pass_at_1": pytest.approx(0.25), "cons_at_k": 0.5}
    json.dumps(report)  # JSON-ready
    table = format_table(report)
    assert "pass@1" in table and "cons@4" in table and "31.2" in table


def test_scorer_equivalence_in_the_pool_and_countdown(pool):
    got = pool.score([("0.5", {"equivalent_to": "\\frac{1}{2}"}), ("0.4", {"equivalent_to": "\\frac{1}{2}"})])
    assert [r.score for r in got] == [1.0, 0.0]
    assert TaskScorer()("</think> \\boxed{3*5+7}", ground_truth(ITEMS[1])).score == 0.0  # 22, not 38


def test_prompt_file_bad_lines_reported_good_lines_kept(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "1+1?", "answer": 2}),
        "{not json",
        json.dumps({"prompt": "no answer"}),
        "",
        json.dumps({"prompt": "echo", "tests": [{"input": "a", "output": "a"}]}),
        json.dumps({"prompt": "", "answer": "1"}),
        json.dumps(["a list"]),
    ]) + "\n")
    items, errors = read_prompt_file(path)
    assert [(e.line, e.reason.split(" (")[0]) for e in errors] == [
        (2, "invalid JSON"), (3, "missing field 'answer'"), (6, "field 'prompt' is empty"),
        (7, "expected a JSON object, got list"),
    ]
    assert str(errors[0]).startswith(f"{path}:2: invalid JSON")
    assert [(i["id"], i["task"]) for i in items] == [("set:1", "math"), ("set:5", "code")]
    assert items[0]["answer"] == "2"
    assert ground_truth(items[1]) == {"tests": [{"stdin": "a", "stdout": "a"}]}


@pytest.mark.parametrize("argv,message", [
    (["--model", "{tmp}", "--task", "arithmetic", "--k", "0"], "--k must be >= 1"),
    (["--model", "{tmp}/nowhere", "--task", "arithmetic"], "no config.json"),
    (["--model", "{tmp}", "--prompts", "{tmp}/missing.jsonl"], "missing.jsonl: no such file"),
    (["--model", "{tmp}", "--task", "arithmetic", "--top-p", "0"], "0 < --top-p <= 1"),
    (["--model", "{tmp}"], "one of the arguments --prompts --task is required"),
])
def test_eval_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    from r1_megatron.cli.eval import main

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
