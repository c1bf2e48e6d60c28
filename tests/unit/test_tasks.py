"""Synthetic task guarantees.

- Items are deterministic given the seed, and a different seed gives different items.
- Train and eval questions never overlap (for any seeds and knobs); eval questions never repeat;
  an exhausted eval space is a clear error.
- Arithmetic answers equal Python's integer arithmetic on the question; countdown reference answers
  evaluate (by sympy) to the target and use exactly the given numbers.
- The safe countdown verifier agrees with sympy on random expressions and rejects anything that is
  not plain arithmetic over the numbers (names, calls, powers, unary signs, reuse, division by 0).
- SFT responses: every working step is true arithmetic (sympy), the boxed answer is judged correct
  by math-verify (arithmetic) or sympy (countdown); with wrong_fraction f, exactly round(f*n) of the
  n items that can go wrong are wrong, and they are the ones flagged; responses fit the tiny model's 64-token budget.
- Column working for + and - (hand-written cases): a wrong response forgets only the carry (borrow)
  into the last column, so only items with one can go wrong; everything before that column is the
  correct response's text.
"""

import re
from collections import Counter

import pytest
import sympy
from math_verify import parse, verify

from r1_megatron.data import tasks
from r1_megatron.data.tokenizer import load_tokenizer

_QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


def _boxed(text: str) -> str:
    return re.findall(r"\\boxed\{([^{}]*)\}", text)[-1]


def _ints(expr: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", expr)]


@pytest.mark.parametrize("task", tasks.TASKS)
def test_deterministic_by_seed(task):
    a = tasks.make_items(task, 50, seed=3)
    assert a == tasks.make_items(task, 50, seed=3)
    assert a != tasks.make_items(task, 50, seed=4)
    assert len({item["id"] for item in a}) == 50


@pytest.mark.parametrize("task,knobs", [
    ("arithmetic", {"digits": 1}),
    ("arithmetic", {"digits": 2, "ops": ("+",)}),
    ("arithmetic", {"digits": 3, "mul_digits": 2}),
    ("countdown", {"num_count": 3}),
    ("countdown", {"num_count": 2, "max_number": 30}),
])
def test_train_and_eval_are_disjoint(task, knobs):
    eval_items = tasks.make_items(task, 20, seed=0, split="eval", **knobs)
    eval_questions = [item["question"] for item in eval_items]
    assert len(set(eval_questions)) == len(eval_questions)
    train_questions = set()
    for seed in range(3):
        train_questions |= {it["question"] for it in tasks.make_items(task, 1000, seed=seed, **knobs)}
    assert train_questions.isdisjoint(eval_questions)
    if task == "countdown":  # the same numbers in another order are the same problem
        key = {(tuple(sorted(it["numbers"])), it["target"]) for it in eval_items}
        for seed in range(3):
            for it in tasks.make_items(task, 1000, seed=seed, **knobs):
                assert (tuple(sorted(it["numbers"])), it["target"]) not in key


def test_exhausted_eval_space_is_an_error():
    # One-digit sums have only 100 questions, about 10% of them in eval.
    with pytest.raises(ValueError, match="question space exhausted"):
        tasks.make_items("arithmetic", 60, seed=0, split="eval", digits=1, ops=("+",))


def test_arithmetic_answers_match_python():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    seen_ops = Counter()
    for digits in (1, 2, 4):
        for item in tasks.make_items("arithmetic", 300, seed=digits, digits=digits, mul_digits=2):
            a, op, b = _QUESTION.fullmatch(item["question"]).groups()
            seen_ops[op] += 1
            assert item["answer"] == str(ops[op](int(a), int(b)))
            assert item["prompt"].endswith(f"User: {item['question']} Assistant: <think>")
            assert len(a) == digits and (op == "*" or len(b) == digits)
    assert set(seen_ops) == {"+", "-", "*"}


def test_countdown_answers_checked_by_sympy():
    for num_count in (2, 3, 4):
        for item in tasks.make_items("countdown", 150, seed=num_count, num_count=num_count):
            assert sympy.sympify(item["answer"]) == item["target"]
            assert Counter(_ints(item["answer"])) == Counter(item["numbers"])
            assert len(item["numbers"]) == num_count and 1 <= item["target"] <= 100
            assert tasks.verify_countdown(item["answer"], item["numbers"], item["target"])


def test_countdown_verifier_agrees_with_sympy_and_rejects_non_arithmetic():
    import random

    rng = random.Random(0)
    for _ in range(300):
        nums = [rng.randint(0, 30) for _ in range(rng.randint(1, 5))]
        expr = str(nums[0])
        for n in nums[1:]:  # a random, sometimes parenthesized, expression built here
            op = rng.choice("+-*/")
            expr = f"({expr}){op}{n}" if rng.random() < 0.5 else f"{n}{op}{expr}"
        got = tasks.evaluate_expression(expr)
        try:
            want = sympy.sympify(expr)
        except ZeroDivisionError:
            want = sympy.zoo
        if want.has(sympy.zoo) or want == sympy.nan:
            assert got is None, expr
        else:
            assert got is not None and sympy.Rational(got[0].numerator, got[0].denominator) == want, expr
            assert Counter(got[1]) == Counter(_ints(expr))
    numbers, target = [3, 5, 7], 56
    assert tasks.verify_countdown("(3+5)*7", numbers, target)
    assert tasks.verify_countdown(" 7 * (5 + 3) ", numbers, target)
    for bad in ["(3+5)*7+0", "3+5*7", "(3+3)*7", "8*7", "(3+5)**7", "-(3-5)*7", "__import__('os')",
                "(3+5)*7.0", "x*7", "(3+5)*7 if True else 0", "3/(5-5)*7", "", "(" * 300]:
        assert not tasks.verify_countdown(bad, numbers, target), bad


def _steps_true(response: str) -> list[bool]:
    """Per working step "lhs=rhs" (optionally prefixed "so "), whether it is true arithmetic."""
    thought = response.split("</think>")[0].strip()
    out = []
    for step in thought.split(", "):
        lhs, rhs = step.removeprefix("so ").split("=")
        out.append(sympy.sympify(lhs) == sympy.sympify(rhs))
    return out


@pytest.mark.parametrize("task", tasks.TASKS)
def test_sft_responses_are_verified_correct(task):
    items = tasks.make_items(task, 200, seed=1, template="compact")
    for pair in tasks.sft_pairs(items, seed=0):
        assert pair["correct"]
        assert pair["response"].count("</think>") == 1
        assert all(_steps_true(pair["response"])), pair["response"]
        boxed = _boxed(pair["response"])
        if task == "arithmetic":
            assert verify(parse(pair["answer"]), parse(f"\\boxed{{{boxed}}}")), pair
        else:
            item = next(it for it in items if it["id"] == pair["id"])
            assert sympy.sympify(boxed) == item["target"]
            assert Counter(_ints(boxed)) == Counter(item["numbers"])


@pytest.mark.parametrize("task,fraction", [("arithmetic", 0.25), ("countdown", 0.3), ("arithmetic", 1.0)])
def test_wrong_answer_knob_fraction(task, fraction):
    items = tasks.make_items(task, 200, seed=2)
    by_id = {it["id"]: it for it in items}
    pairs = tasks.sft_pairs(items, seed=5, wrong_fraction=fraction)
    judged_correct = []
    for pair in pairs:
        boxed, item = _boxed(pair["response"]), by_id[pair["id"]]
        if task == "arithmetic":
            ok = verify(parse(item["answer"]), parse(f"\\boxed{{{boxed}}}"))
            steps = _steps_true(pair["response"])
            if "*" in item["question"]:  # a wrong product fails only in its final step
                assert all(steps) if ok else (all(steps[:-1]) and not steps[-1])
            else:  # a wrong sum/difference keeps true equations but mis-tracks the last carry
                right = tasks.sft_response(item)
                assert all(steps)
                assert ok == (pair["response"] == right)
                assert pair["response"].startswith(right.split("</think>")[0].rpartition(", ")[0])
        else:
            ok = sympy.sympify(boxed) == item["target"]
            assert Counter(_ints(boxed)) == Counter(item["numbers"]) and all(_steps_true(pair["response"]))
        assert ok == pair["correct"]
        judged_correct.append(ok)
    eligible = [it for it in items if tasks.can_go_wrong(it)]
    assert 0 < len(eligible) and (task != "arithmetic" or fraction < 1 or len(eligible) < len(items))
    assert judged_correct.count(False) == round(fraction * len(eligible))
    assert pairs == tasks.sft_pairs(items, seed=5, wrong_fraction=fraction)


@pytest.mark.parametrize("question,right,wrong", [
    ("56 + 36", " 6+6=12, 5+3+1=9 </think> \\boxed{92}", " 6+6=12, 5+3=8 </think> \\boxed{82}"),
    ("99 + 99", " 9+9=18, 9+9+1=19 </think> \\boxed{198}", " 9+9=18, 9+9=18 </think> \\boxed{188}"),
    ("23 + 41", " 3+1=4, 2+4=6 </think> \\boxed{64}", None),
    ("52 - 36", " 12-6=6, 5-3-1=1 </think> \\boxed{16}", " 12-6=6, 5-3=2 </think> \\boxed{26}"),
    ("36 - 52", " 36-52=-(52-36), 12-6=6, 5-3-1=1 </think> \\boxed{-16}",
     " 36-52=-(52-36), 12-6=6, 5-3=2 </think> \\boxed{-26}"),
    ("10 - 9", " 10-9=1, 1-0-1=0 </think> \\boxed{1}", " 10-9=1, 1-0=1 </think> \\boxed{11}"),
    ("55 - 51", " 5-1=4, 5-5=0 </think> \\boxed{4}", None),
    ("7 + 5", " 7+5=12 </think> \\boxed{12}", None),
])
def test_column_working_by_hand(question, right, wrong):
    a, op, b = question.split(" ")
    item = {"task": "arithmetic", "question": f"What is {question}?", "id": "x",
            "answer": str(int(a) + int(b) if op == "+" else int(a) - int(b))}
    assert tasks.sft_response(item) == right
    assert tasks.can_go_wrong(item) == (wrong is not None)
    if wrong is None:  # no carry into the last column: nothing to forget
        with pytest.raises(ValueError, match="no carry"):
            tasks.sft_response(item, wrong=True)
    else:
        assert tasks.sft_response(item, wrong=True) == wrong


def test_lengths_fit_the_tiny_model():
    tok = load_tokenizer()
    for task in tasks.TASKS:
        items = tasks.make_items(task, 200, seed=0, template="compact")
        for pair in tasks.sft_pairs(items, seed=0, wrong_fraction=0.5):
            assert len(tok(pair["prompt"])["input_ids"]) <= 64
            assert len(tok(pair["response"], add_special_tokens=False)["input_ids"]) + 1 <= 64


def test_chitchat_pairs():
    pairs = tasks.chitchat_pairs(40, seed=0)
    assert pairs == tasks.chitchat_pairs(40, seed=0)
    assert len(pairs) == 40 and len({p["prompt"] for p in pairs}) == 16
    for p in pairs:
        assert p["prompt"].startswith("User: ") and p["prompt"].endswith("Assistant: <think>")
        assert p["response"].startswith(" </think> ") and p["response"].isascii()


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="unknown task 'sorting'"):
        tasks.make_items("sorting", 1, seed=0)
    with pytest.raises(ValueError, match=r"unknown knob\(s\) \['digit'\]"):
        tasks.make_items("arithmetic", 1, seed=0, digit=3)
    with pytest.raises(ValueError, match="unknown prompt template 'long'"):
        tasks.make_items("countdown", 1, seed=0, template="long")
    with pytest.raises(ValueError, match="ops must be"):
        tasks.make_items("arithmetic", 1, seed=0, ops=("/",))
    with pytest.raises(ValueError, match="split must be"):
        tasks.make_items("arithmetic", 1, seed=0, split="test")
    with pytest.raises(ValueError, match="wrong_fraction"):
        tasks.sft_pairs([], seed=0, wrong_fraction=1.5)
