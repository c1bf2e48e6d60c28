"""Rejection sampling's filter, selection, mixing and decontamination, on planted samples (no engine).

Guarantees:
- `rejection_reasons` names exactly the rules a planted sample breaks: wrong answer (math-verify),
  bad format (no or two think blocks), mixed language (CJK words inside the think block, with a
  threshold), truncated, too long, too short, reward error; good samples get no reason;
- `select` keeps only the samples with no reason (and one copy of a duplicate), counts every reason,
  and writes provenance (prompt id, sample index, token count, reward components) that survives a
  JSONL round trip;
- a prompt file with bad lines reports them by line number while its good lines go through;
- non-reasoning pairs make up the configured fraction of the output (hand-counted), and nothing
  selected is lost in the mix;
- decontamination drops the training prompts whose question shares a 10-gram with an eval prompt.
"""

from __future__ import annotations

import json

import pytest

from r1_megatron.data.jsonl import read_jsonl, write_jsonl
from r1_megatron.data.tasks import chitchat_pairs
from r1_megatron.distill.rejection import (
    RejectionConfig,
    decontaminate_items,
    mix_non_reasoning,
    non_reasoning_count,
    rejection_reasons,
    select,
)
from r1_megatron.eval.scoring import Generation, TaskScorer, ground_truth, read_prompt_file

CFG = RejectionConfig(k=12, min_tokens=5, max_tokens=100)
ITEM = {"id": "a", "task": "arithmetic", "prompt": "User: What is 37 + 45? Assistant: <think>",
        "answer": "82", "question": "What is 37 + 45?"}
BAD_GOLD = {"id": "b", "task": "math", "prompt": "User: ? Assistant: <think>", "answer": "}{"}

# (response, tokens, finish reason, expected reasons)
PLANTED = [
    (" 37+40=77, 77+5=82 </think> \\boxed{82}", 20, "stop", []),  # 0 good, a CoT without words
    (" 37+40=77, 77+5=83 </think> \\boxed{83}", 20, "stop", ["wrong"]),  # 1
    (" 37+45=82 \\boxed{82}", 12, "stop", ["format"]),  # 2 never closes the think block
    (" a </think> b </think> \\boxed{82}", 12, "stop", ["format"]),  # 3 two closing tags
    (" 我们 add 37 and 45 </think> \\boxed{82}", 15, "stop", ["mixed_language"]),  # 4 CJK in the think block
    (" 37+40=77, 77+5=82 </think> \\boxed{82}", 100, "length", ["truncated"]),  # 5 hit the cap
    (" add them: 82 </think> \\boxed{82}", 300, "stop", ["too_long"]),  # 6
    (" </think> \\boxed{82}", 3, "stop", ["too_short"]),  # 7
    (" 37+40=77, 77+5=82 </think> \\boxed{82}", 20, "stop", []),  # 8 same text as 0: a duplicate
    (" add 45 to 37 </think> The answer is \\boxed{82}.", 18, "stop", []),  # 9 good, English words
    (" add 45 to 37 </think> 答案是 \\boxed{82}", 18, "stop", []),  # 10 CJK only after the think block
    (" 37+45 </think>", 8, "stop", ["wrong", "format"]),  # 11 no answer part at all
]


def _score(item: dict, text: str):
    return TaskScorer()(text, ground_truth(item))


def test_each_planted_sample_gets_exactly_its_reasons():
    got = [rejection_reasons(ITEM, text, n, finish, _score(ITEM, text), CFG).reasons
           for text, n, finish, _ in PLANTED]
    assert got == [expected for *_, expected in PLANTED]


def test_reward_error_and_language_threshold():
    text = " 1 </think> \\boxed{1}"
    verdict = rejection_reasons(BAD_GOLD, text, 10, "stop", _score(BAD_GOLD, text), CFG)
    assert verdict.reasons == ["reward_error", "wrong"]
    # 1 Han word and 3 English words in the think block: share 0.75.
    mixed = " 我 add two numbers </think> \\boxed{82}"
    reward = _score(ITEM, mixed)
    assert rejection_reasons(ITEM, mixed, 20, "stop", reward, CFG).reasons == ["mixed_language"]
    relaxed = RejectionConfig(min_tokens=5, max_tokens=100, min_language=0.7)
    verdict = rejection_reasons(ITEM, mixed, 20, "stop", reward, relaxed)
    assert verdict.reasons == [] and verdict.scores["language"] == pytest.approx(0.75)
    # An item's own language wins over the configured one: an all-Chinese chain of thought for "zh".
    zh = {**ITEM, "language": "zh"}
    chinese = " 三十七加四十五 </think> \\boxed{82}"
    assert rejection_reasons(zh, chinese, 20, "stop", _score(zh, chinese), CFG).reasons == []
    verdict = rejection_reasons(ITEM, chinese, 20, "stop", _score(ITEM, chinese), CFG)
    assert verdict.reasons == ["mixed_language"]


def test_select_keeps_only_verified_samples_with_provenance(tmp_path):
    gens = [[Generation(text, n, finish) for text, n, finish, _ in PLANTED]]
    rewards = [[_score(ITEM, text) for text, *_ in PLANTED]]
    records, counts = select([ITEM], gens, rewards, CFG)
    assert [r["sample_index"] for r in records] == [0, 9, 10]
    # 12 samples: 8 rejected (1-7 and 11), 1 duplicate (8), 3 kept (0, 9, 10). Reasons: wrong in 1 and
    # 11, format in 2, 3 and 11, one each of truncated (5), too_long (6), too_short (7), mixed (4).
    assert counts["samples"] == 12 and counts["kept"] == 3 and counts["duplicate"] == 1
    assert counts["rejected"] == 8
    assert {k: v for k, v in counts.items() if k.startswith("rejected/")} == {
        "rejected/truncated": 1, "rejected/too_short": 1, "rejected/too_long": 1, "rejected/reward_error": 0,
        "rejected/wrong": 2, "rejected/format": 3, "rejected/mixed_language": 1,
    }
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, records)
    back, errors = read_jsonl(path, "sft")
    assert errors == [] and back == records
    first = back[0]
    assert (first["prompt"], first["response"]) == (ITEM["prompt"], PLANTED[0][0])
    provenance = (first["id"], first["prompt_id"], first["sample_index"], first["num_tokens"])
    assert provenance == ("a/0", "a", 0, 20)
    assert first["answer"] == "82" and first["source"] == "rejection_sampling"
    assert first["rewards"]["correct"] == first["rewards"]["format"] == first["rewards"]["language"] == 1.0
    assert first["rewards"]["answer_found"] == 1.0  # the accuracy reward's own component


def test_cap_per_prompt_and_no_dedupe():
    text = PLANTED[0][0]
    gens = [[Generation(text, 20, "stop")] * 3]
    rewards = [[_score(ITEM, text)] * 3]
    records, counts = select([ITEM], gens, rewards, RejectionConfig(dedupe=False, max_per_prompt=2))
    assert [r["sample_index"] for r in records] == [0, 1] and counts["over_cap"] == 1


def test_bad_prompt_lines_reported_and_good_lines_selected(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "What is 2 + 2? Assistant: <think>", "answer": "4"}),
        json.dumps({"prompt": "What is 3 + 3?"}),
        "not json at all",
        json.dumps({"prompt": "What is 5 + 5? Assistant: <think>", "answer": 10}),
    ]) + "\n")
    items, errors = read_prompt_file(path)
    assert [(e.line, e.reason) for e in errors] == [
        (2, "missing field 'answer'"), (3, "invalid JSON (Expecting value at column 1)")]
    texts = [[" 2+2=4 </think> \\boxed{4}", " </think> \\boxed{5}"], [" 5+5=10 </think> \\boxed{10}", " x"]]
    gens = [[Generation(t, 10, "stop") for t in row] for row in texts]
    rewards = [[_score(item, t) for t in row] for item, row in zip(items, texts)]
    records, counts = select(items, gens, rewards, RejectionConfig())
    assert [(r["prompt_id"], r["sample_index"]) for r in records] == [("train:1", 0), ("train:4", 0)]
    assert counts["kept"] == 2 and counts["rejected/wrong"] == 2


@pytest.mark.parametrize("kept,fraction,added", [
    (3, 0.25, 1),  # 1 / (3 + 1) = 0.25 exactly
    (6, 0.4, 4),  # 4 / 10 = 0.4 exactly
    (5, 0.25, 2),  # 0.25 * 5 / 0.75 = 1.67 -> 2, i.e. 2/7: the nearest share to 0.25 reachable
    (4, 0.0, 0),
])
def test_mixing_ratio(kept, fraction, added):
    assert non_reasoning_count(kept, fraction) == added
    records = [{"prompt": f"p{i}", "response": "r", "id": f"x/{i}", "source": "rejection_sampling"}
               for i in range(kept)]
    pairs = chitchat_pairs(3, seed=0)
    mixed, n = mix_non_reasoning(records, pairs, fraction, seed=1)
    assert n == added and len(mixed) == kept + added
    assert sum(r["source"] == "non_reasoning" for r in mixed) == added
    selected = sorted(r["id"] for r in mixed if r["source"] == "rejection_sampling")
    assert selected == sorted(r["id"] for r in records)
    if added:
        assert {r["prompt"] for r in mixed if r["source"] == "non_reasoning"} <= {p["prompt"] for p in pairs}
    assert len({r["id"] for r in mixed}) == len(mixed)  # 4 drawn from 3 pairs repeat one, ids stay unique


def test_mixing_without_pairs_is_an_error():
    records = [{"prompt": f"p{i}", "response": "r", "id": f"x/{i}"} for i in range(6)]
    with pytest.raises(ValueError, match="needs 2 non-reasoning pairs, but none"):
        mix_non_reasoning(records, [], 0.25, seed=0)


def test_decontamination_drops_overlapping_questions():
    train = [
        {"id": "t0", "prompt": "P0",
         "question": "A farmer has 17 sheep and all but 9 run away; how many are left?"},
        {"id": "t1", "prompt": "P1",
         "question": "What is the sum of the first 10 positive odd numbers in total?"},
        {"id": "t2", "prompt": "A prompt with no question field about the number of primes below 100 today"},
    ]
    evals = [
        "a FARMER has 17 sheep, and all but 9 run away. How many are left?",  # t0 after normalization
        "Count the number of primes below 100 today please",  # 10 words not shared with t2 in a row
    ]
    kept, counts = decontaminate_items(train, evals)
    assert [i["id"] for i in kept] == ["t1", "t2"]
    assert (counts["total"], counts["kept"], counts["dropped"]) == (3, 2, 1)
    longer = "no question field about the number of primes below 100 today"  # 10-gram shared with t2
    kept, counts = decontaminate_items(train, evals + [longer])
    assert [i["id"] for i in kept] == ["t1"] and counts["dropped"] == 2


@pytest.mark.parametrize("kwargs,message", [
    ({"non_reasoning_fraction": 1.0}, r"non_reasoning_fraction must be in \[0, 1\)"),
    ({"min_language": 1.5}, "min_language must be in"),
    ({"k": 0}, "rejection.k must be >= 1"),
    ({"min_tokens": 10, "max_tokens": 5}, r"max_tokens\(5\) < min_tokens\(10\)"),
    ({"language": "xx"}, "unknown language 'xx'"),
])
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RejectionConfig(**kwargs)
