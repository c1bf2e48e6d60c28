"""The math accuracy reward decides equivalence like a person would on hand-written cases (fractions vs
decimals, LaTeX vs plain, sets and intervals, units, negatives, prose around the answer, several boxes,
nested braces, and near-miss wrong answers); it takes the last balanced box, else <answer>; a missing
answer is a 0 without error; and it works off the main thread, where math-verify's signal timeouts fail.
"""

import threading

import pytest

from r1_megatron.reward.math_reward import extract_answer, extract_boxed, math_reward, sympy_equal

# (response, ground truth, is the response's final answer equal to the ground truth?) — decided by hand.
CASES = [
    # fractions vs decimals
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{\frac{3}{4}}", "0.75", True),
    (r"\boxed{0.25}", "1/4", True),
    (r"\boxed{\dfrac{5}{2}}", "2.5", True),
    (r"\boxed{\frac{2}{4}}", "1/2", True),
    (r"\boxed{1.5}", r"\frac{3}{2}", True),
    (r"\boxed{0.333}", r"\frac{1}{3}", False),
    (r"\boxed{0.6}", r"\frac{2}{3}", False),
    # \frac vs /
    (r"\boxed{3/8}", r"\frac{3}{8}", True),
    (r"\boxed{\frac{3}{8}}", "3/8", True),
    (r"\boxed{\frac{8}{3}}", "3/8", False),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\sqrt{3}/2", True),
    (r"\boxed{(1+\sqrt{5})/2}", r"\frac{1+\sqrt{5}}{2}", True),
    (r"\boxed{\tfrac{1}{6}}", "1/6", True),
    # LaTeX vs plain, and equal expressions written differently
    (r"\boxed{\sqrt{2}}", "sqrt(2)", True),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", True),
    (r"\boxed{2^{10}}", "1024", True),
    (r"\boxed{10^{-3}}", "0.001", True),
    (r"\boxed{3\times 4}", "12", True),
    (r"\boxed{\log_2 8}", "3", True),
    (r"\boxed{\sin^2 x + \cos^2 x}", "1", True),
    (r"\boxed{\binom{5}{2}}", "10", True),
    (r"\boxed{\pi}", "3.14", False),
    (r"\boxed{2\pi}", r"\pi", False),
    # sets and intervals
    (r"\boxed{\{1,2,3\}}", r"\{3,2,1\}", True),
    (r"\boxed{\{1,2\}}", r"\{1,2,3\}", False),
    (r"\boxed{[1,2)}", "[1,2)", True),
    (r"\boxed{(1,2]}", "[1,2)", False),
    (r"\boxed{(-\infty, 3)}", r"(-\infty,3)", True),
    (r"\boxed{(0,\infty)}", r"[0,\infty)", False),
    (r"\boxed{[2,5]}", "[2, 5]", True),
    (r"\boxed{2, 3}", "3, 2", True),  # a solution set: order does not matter
    (r"\boxed{(-\infty,-1)\cup(1,\infty)}", r"(-\infty,-1)\cup(1,\infty)", True),
    (r"\boxed{x \in [2, 5]}", "[2,5]", True),
    (r"\boxed{[1,3]}", "[1,2]", False),
    # units and signs of money / percent / degrees
    (r"\boxed{5\text{ cm}}", "5", True),
    (r"\boxed{12 \text{ apples}}", "12", True),
    (r"\boxed{90^\circ}", "90", True),
    (r"\boxed{15\%}", "0.15", True),
    (r"\boxed{\$25}", "25", True),
    (r"\boxed{6 \text{ m}}", "7", False),
    # negatives
    (r"\boxed{-3}", "-3", True),
    (r"\boxed{3}", "-3", False),
    (r"\boxed{-\frac{1}{2}}", "-0.5", True),
    (r"\boxed{\frac{-1}{2}}", r"-\frac{1}{2}", True),
    (r"\boxed{-(-2)}", "2", True),
    (r"\boxed{-0.5}", "0.5", False),
    # text around the answer
    (r"The final answer is $\boxed{42}$.", "42", True),
    ("<answer>The answer is 42</answer>", "42", True),
    ("<answer>x = 7</answer>", "7", True),
    ("<think>maybe 6</think> <answer>so it is 7.</answer>", "7", True),
    (r"Therefore, \boxed{7} apples remain.", "7", True),
    ("<answer>It is 8</answer>", "7", False),
    ("<think>6 is wrong</think><answer>6</answer>", "7", False),
    # docs/grpo.md#rewards: a box anywhere wins over <answer>, even a box inside the think block
    (r"<think>I get \boxed{3}</think><answer>5</answer>", "3", True),
    # several boxes: the last balanced one counts
    (r"\boxed{1} wait, actually \boxed{2}", "2", True),
    (r"\boxed{1} wait, actually \boxed{2}", "1", False),
    (r"\boxed{5} then \fbox{6}", "6", True),
    (r"\boxed{2} and a cut-off \boxed{3", "2", True),
    # nested braces and spacing
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", True),
    (r"\boxed{{2}}", "2", True),
    (r"\boxed {\frac{2}{3}}", "2/3", True),
    (r"\boxed{\left\{1,2\right\}}", r"\{1,2\}", True),
    (r"\boxed{2^{2^{2}}}", "16", True),
    (r"\boxed 7", "7", True),
    # near-miss wrong answers
    (r"\boxed{0.5001}", "1/2", False),
    (r"\boxed{1/3}", "1/2", False),
    (r"\boxed{x^2-1}", "(x-1)^2", False),
    (r"\boxed{12}", "21", False),
    (r"\boxed{\sqrt{3}}", r"\sqrt{2}", False),
    # multiple choice and integer ground truths
    (r"\boxed{\text{(B)}}", "B", True),
    (r"\boxed{B}", "C", False),
    (r"\boxed{42}", 42, True),
]


@pytest.mark.parametrize("response,truth,expected", CASES)
def test_equivalence(response, truth, expected):
    result = math_reward(response, truth)
    assert result.error is None
    assert result.score == (1.0 if expected else 0.0)
    assert result.components == {"accuracy": result.score, "answer_found": 1.0}


def test_case_count():
    assert len(CASES) >= 60


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"a \boxed{1} b \boxed{x^{2}} c", "x^{2}"),
        (r"\boxed{\left\{1\right\}}", r"\left\{1\right\}"),
        (r"\boxed{a\\}", r"a\\"),  # a LaTeX line break right before the closing brace
        (r"\boxed{1} \boxed{2", "1"),  # the last *balanced* box
        (r"\fbox{9}", "9"),
        (r"\boxed   {9}", "9"),
        (r"\boxed 9.", "9."),
        (r"\boxedx{9}", None),
        ("no box", None),
        (r"\boxed{", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_answer_order():
    assert extract_answer("<answer> 4 </answer>") == "4"
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert extract_answer(r"<answer>\boxed{}</answer>") == r"\boxed{}"  # an empty box is no box
    assert extract_answer("<answer>  </answer>") is None
    assert extract_answer("<answer>1") is None
    assert extract_answer(r"\boxed{} <answer>5</answer>") == "5"


def test_missing_answer_is_zero_without_error():
    result = math_reward("I think it is 5 but I will not say", "5")
    assert (result.score, result.error) == (0.0, None)
    assert result.components == {"accuracy": 0.0, "answer_found": 0.0}


def test_unreadable_answer_is_a_wrong_answer_not_an_error():
    result = math_reward(r"\boxed{)(}", "5")
    assert (result.score, result.error) == (0.0, None)
    assert result.components["answer_found"] == 1.0


def test_sympy_fallback_refuses_code():
    # parse_expr evaluates Python: the fallback must not run it on untrusted text.
    assert sympy_equal("1", "__import__('os').getpid()") is None
    assert sympy_equal("1", "exit()") is None
    assert sympy_equal("2*x + 2", "2(x+1)") is True
    assert sympy_equal("x^2", "x*x") is True
    assert sympy_equal("x^2", "x") is False


def test_works_off_the_main_thread():
    # With math-verify's default signal.alarm timeouts this raises ValueError in a thread (verl's bug).
    out = {}

    def run():
        out["r"] = math_reward(r"\boxed{\frac{1}{2}}", "0.5")

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert out["r"].score == 1.0 and out["r"].error is None
