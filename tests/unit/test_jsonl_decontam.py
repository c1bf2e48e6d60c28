"""JSONL reading and 10-gram decontamination.

- Bad lines (invalid JSON, non-objects, missing fields, wrong types, empty prompts, bad tests) are
  reported as file:line with the reason, the good lines come back in file order, blank lines are
  skipped, and strict mode raises on the first bad line.
- Written items read back unchanged (unicode included).
- Decontamination on a hand-built case drops exactly the training prompts that share a normalized
  word 10-gram with an eval prompt (case, punctuation and whitespace ignored; CJK per character;
  math operators kept), and returns the counts.
"""

import json

import pytest

from r1_megatron.data import tasks
from r1_megatron.data.decontam import decontaminate, ngrams, normalize_words
from r1_megatron.data.jsonl import JsonlFormatError, read_jsonl, write_jsonl


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_prompt_file_reports_bad_lines_and_keeps_good_ones(tmp_path):
    path = _write(tmp_path / "p.jsonl", [
        '{"prompt": "1+1?", "answer": "2"}',            # 1 ok
        '{"prompt": "2+2?", "answer": 4, "src": "x"}',  # 2 ok, int answer, extra field kept
        '{"prompt": "3+3?", "answer": "6"',             # 3 invalid JSON
        "",                                              # 4 blank: skipped
        '["prompt", "answer"]',                          # 5 not an object
        '{"prompt": "no answer"}',                       # 6 missing answer
        '{"prompt": 7, "answer": "7"}',                  # 7 prompt not a string
        '{"prompt": "  ", "answer": "0"}',               # 8 empty prompt
        '{"prompt": "t?", "answer": true}',              # 9 bool answer
        '{"prompt": "5+5?", "answer": "10"}',           # 10 ok
    ])
    items, errors = read_jsonl(path, "prompt")
    assert [it["prompt"] for it in items] == ["1+1?", "2+2?", "5+5?"]
    assert items[1] == {"prompt": "2+2?", "answer": "4", "src": "x"}
    assert [e.line for e in errors] == [3, 5, 6, 7, 8, 9]
    reasons = [e.reason for e in errors]
    assert reasons[0].startswith("invalid JSON")
    assert reasons[1:] == [
        "expected a JSON object, got list",
        "missing field 'answer'",
        "field 'prompt' must be a string, got int",
        "field 'prompt' is empty",
        "field 'answer' must be a string or an integer, got bool",
    ]
    assert str(errors[1]) == f"{path}:5: expected a JSON object, got list"
    with pytest.raises(JsonlFormatError, match=rf"^{path}:3: invalid JSON"):
        read_jsonl(path, "prompt", strict=True)


def test_code_and_sft_files(tmp_path):
    code = _write(tmp_path / "c.jsonl", [
        json.dumps({"prompt": "add", "tests": ["assert add(1, 2) == 3"]}),
        json.dumps({"prompt": "echo", "tests": [{"input": "a\n", "output": "a\n"}]}),
        json.dumps({"prompt": "none", "tests": []}),
        json.dumps({"prompt": "bad", "tests": [{"input": "a"}]}),
        json.dumps({"prompt": "num", "tests": [3]}),
        json.dumps({"prompt": "missing"}),
    ])
    items, errors = read_jsonl(code, "code")
    assert [it["prompt"] for it in items] == ["add", "echo"]
    assert [(e.line, e.reason) for e in errors] == [
        (3, "field 'tests' must be a non-empty list"),
        (4, "tests[0] needs string fields 'input' and 'output'"),
        (5, "tests[0] must be a string or an {input, output} object, got int"),
        (6, "missing field 'tests'"),
    ]
    sft = _write(tmp_path / "s.jsonl", [
        json.dumps({"prompt": "hi", "response": "hello"}),
        json.dumps({"prompt": "hi", "response": None}),
    ])
    items, errors = read_jsonl(sft, "sft")
    assert items == [{"prompt": "hi", "response": "hello"}]
    assert [(e.line, e.reason) for e in errors] == [(2, "field 'response' must be a string, got NoneType")]
    with pytest.raises(ValueError, match="unknown JSONL kind 'rl'"):
        read_jsonl(sft, "rl")


def test_write_then_read_round_trips(tmp_path):
    items = tasks.make_items("countdown", 20, seed=0) + [{"prompt": "我们 \\boxed{1}", "answer": "1"}]
    assert write_jsonl(tmp_path / "t.jsonl", items) == 21
    back, errors = read_jsonl(tmp_path / "t.jsonl", "prompt")
    assert back == items and errors == []


EVAL = [
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "What is 37 + 45?",
    "小明有三个苹果，小红又给了他五个苹果，现在一共有几个？",
]


def test_normalization():
    assert normalize_words("The QUICK,  brown\tfox!") == ["the", "quick", "brown", "fox"]
    assert normalize_words("What is 37 + 45?") == ["what", "is", "37", "+", "45"]
    assert normalize_words("三个苹果") == ["三", "个", "苹", "果"]
    assert len(ngrams(EVAL[0], 10)) == 14 - 10 + 1


def test_decontamination_hand_built_case():
    train = [
        # 10 consecutive eval words, different case, punctuation and spacing: dropped.
        {"prompt": "Story: THE quick brown fox... jumps over the lazy dog, near the   river!"},
        # Only 9 consecutive eval words ("the quick ... the river" breaks at "near"): kept.
        {"prompt": "the quick brown fox jumps over the lazy dog by the river bank"},
        # Short prompt repeated verbatim up to normalization: dropped.
        {"prompt": "what is 37+45"},
        # Same numbers, other operator: kept.
        {"prompt": "What is 37 - 45?"},
        # Ten CJK characters in a row from the eval prompt: dropped.
        {"prompt": "题目：小红又给了他五个苹果，问题是什么"},
        # Nine of them: kept.
        {"prompt": "题目：小红又给了他五个苹"},
        {"prompt": "An unrelated question about the weather in spring."},
    ]
    kept, counts = decontaminate(train, EVAL)
    assert [train.index(k) for k in kept] == [1, 3, 5, 6]
    assert counts["total"] == 7 and counts["kept"] == 4 and counts["dropped"] == 3
    with pytest.raises(ValueError, match="training item 0 has no string field 'question'"):
        decontaminate(train, EVAL, key="question")


def test_decontaminating_task_items_by_question():
    train = tasks.make_items("arithmetic", 300, seed=0)
    eval_items = tasks.make_items("arithmetic", 50, seed=0, split="eval")
    # The template alone shares 10-grams, so templated prompts all collide...
    _, by_prompt = decontaminate(train, [it["prompt"] for it in eval_items])
    assert by_prompt["dropped"] == 300
    # ...while the (short) questions of the disjoint splits do not, until an eval item leaks in.
    leaked = train + [eval_items[7]]
    kept, by_question = decontaminate(leaked, [it["question"] for it in eval_items], key="question")
    assert by_question["dropped"] == 1 and kept == train
