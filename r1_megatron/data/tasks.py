"""Synthetic verifiable tasks, generated on the fly: multi-digit arithmetic and countdown.

Each item is a dict ``{"prompt", "answer", "task", "id", "question"}``; countdown items also carry the
ground truth the reward needs, ``"numbers"`` and ``"target"`` (its ``"answer"`` is one reference
expression, since many expressions are correct).

Train and eval never overlap: every question has a canonical key (``"37+45"``, or the sorted numbers
and the target for countdown), and a stable hash of that key puts it in the eval split or the train
split for good, whatever the seed or the difficulty knobs.

Departure from the paper: DeepSeek-R1-Zero's template puts the answer in ``<answer>`` tags; ours asks
for ``\\boxed{}`` (the math reward reads either) and ends with ``Assistant: <think>`` so the think block
is opened by the prompt. The models here are tiny (hidden 256, ~64 new tokens), so a compact template
is offered and the SFT chains of thought are short place-value steps.
"""

from __future__ import annotations

import ast
import hashlib
import operator
import random
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from r1_megatron.config.schema import JobConfig

TEMPLATES: dict[str, str] = {
    "r1_zero": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user "
        "with the answer. The reasoning process is enclosed within <think> </think> tags and the final "
        "answer is given in \\boxed{}, i.e., <think> reasoning process here </think> \\boxed{answer here}. "
        "User: {question} Assistant: <think>"
    ),
    "compact": "Think in <think> </think>, then answer in \\boxed{}. User: {question} Assistant: <think>",
    "plain": "User: {question} Assistant: <think>",
}
TASKS = ("arithmetic", "countdown")
EVAL_PERMILLE = 100  # share of the question space (per mille) that only the eval split may use
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def format_prompt(question: str, template: str = "r1_zero") -> str:
    """Wrap a question in a prompt template (see TEMPLATES)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template '{template}'; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template].replace("{question}", question)


def is_eval_key(task: str, key: str) -> bool:
    """True if this canonical question belongs to the held-out eval split (fixed by a hash)."""
    h = int.from_bytes(hashlib.sha256(f"{task}|{key}".encode()).digest()[:8], "big")
    return h % 1000 < EVAL_PERMILLE


# ---------------------------------------------------------------- arithmetic


def _operand(rng: random.Random, digits: int) -> int:
    if digits <= 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _arithmetic_raw(rng: random.Random, digits: int, ops: tuple[str, ...], mul_digits: int) -> dict:
    op = rng.choice(ops)
    a = _operand(rng, digits)
    b = _operand(rng, min(digits, mul_digits) if op == "*" else digits)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"key": f"{a}{op}{b}", "question": f"What is {a} {op} {b}?", "answer": str(value),
            "a": a, "b": b, "op": op}


def _check_arithmetic_knobs(digits: int, ops: tuple[str, ...], mul_digits: int) -> None:
    if digits < 1 or mul_digits < 1:
        raise ValueError(f"arithmetic: digits ({digits}) and mul_digits ({mul_digits}) must be >= 1")
    bad = [op for op in ops if op not in ("+", "-", "*")]
    if not ops or bad:
        raise ValueError(f"arithmetic: ops must be a non-empty subset of '+', '-', '*'; got {list(ops)}")


# ---------------------------------------------------------------- countdown


def _random_tree(numbers: list[int], rng: random.Random, ops: str) -> tuple[Fraction, str, list[str]]:
    """Combine two random nodes with a random op until one is left: (value, expression, steps).

    Subtraction is ordered to stay non-negative; a division that is not exact becomes an addition,
    so every intermediate value is a non-negative integer.
    """
    nodes = [(Fraction(n), str(n), True) for n in numbers]
    steps: list[str] = []
    while len(nodes) > 1:
        i, j = rng.sample(range(len(nodes)), 2)
        (x, ex, lx), (y, ey, ly) = nodes[i], nodes[j]
        op = rng.choice(ops)
        if op == "-" and x < y:
            (x, ex, lx), (y, ey, ly) = (y, ey, ly), (x, ex, lx)
        if op == "/" and (y == 0 or x % y != 0):
            op = "+"
        value = _APPLY[op](x, y)
        steps.append(f"{x}{op}{y}={value}")
        text = f"{ex if lx else '(' + ex + ')'}{op}{ey if ly else '(' + ey + ')'}"
        nodes = [n for k, n in enumerate(nodes) if k not in (i, j)] + [(value, text, False)]
    return nodes[0][0], nodes[0][1], steps


def _countdown_raw(rng: random.Random, num_count: int, max_number: int, max_target: int) -> dict:
    """Numbers, and a target reached by a random expression tree over all of them."""
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(num_count)]
        target, expr, _ = _random_tree(numbers, rng, "+-*/")
        if 1 <= target <= max_target:
            break
    question = (f"Using the numbers {numbers}, make {int(target)}. "
                "Use + - * / and each number exactly once.")
    return {"key": f"{sorted(numbers)}->{int(target)}", "question": question, "answer": expr,
            "numbers": numbers, "target": int(target)}


def evaluate_expression(expr: str) -> tuple[Fraction, list[int]] | None:
    """Value and integer literals of an arithmetic expression, or None if it is not one.

    Parses with `ast` and walks only integer literals, parentheses and + - * / between them,
    in exact rationals: no `eval`, no names, no unary signs, no powers. Division by zero gives None.
    """
    if len(expr) > 200:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    literals: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _APPLY[_OPS[type(node.op)]](walk(node.left), walk(node.right))
        raise ValueError(type(node).__name__)

    try:
        return walk(tree), literals
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def verify_countdown(expr: str, numbers: list[int], target: int) -> bool:
    """True if `expr` uses every number exactly once (as a multiset) and equals `target` exactly."""
    result = evaluate_expression(expr)
    if result is None:
        return False
    value, literals = result
    return Counter(literals) == Counter(numbers) and value == target


# ---------------------------------------------------------------- items


def iter_items(task: str, *, seed: int, split: str = "train", template: str = "r1_zero",
               **knobs: Any) -> Iterator[dict]:
    """Endless deterministic stream of `task` items for `split` ("train" or "eval").

    Knobs: arithmetic takes digits (2), ops (("+", "-", "*")), mul_digits (1);
    countdown takes num_count (3), max_number (20), max_target (100).
    Eval streams never repeat a question; train streams may.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got '{split}'")
    format_prompt("", template)  # fail early on an unknown template
    rng = random.Random(f"{task}|{split}|{seed}")
    if task == "arithmetic":
        digits, ops = knobs.pop("digits", 2), tuple(knobs.pop("ops", ("+", "-", "*")))
        mul_digits = knobs.pop("mul_digits", 1)
        _check_arithmetic_knobs(digits, ops, mul_digits)

        def draw() -> dict:
            return _arithmetic_raw(rng, digits, ops, mul_digits)
    elif task == "countdown":
        num_count, max_number = knobs.pop("num_count", 3), knobs.pop("max_number", 20)
        max_target = knobs.pop("max_target", 100)
        if num_count < 2 or max_number < 1 or max_target < 1:
            raise ValueError(f"countdown: need num_count >= 2, max_number >= 1, max_target >= 1; "
                             f"got {num_count}, {max_number}, {max_target}")

        def draw() -> dict:
            return _countdown_raw(rng, num_count, max_number, max_target)
    else:
        raise ValueError(f"unknown task '{task}'; known: {list(TASKS)}")
    if knobs:
        raise ValueError(f"{task}: unknown knob(s) {sorted(knobs)}")

    want_eval, seen, misses, index = split == "eval", set(), 0, 0
    while True:
        raw = draw()
        if is_eval_key(task, raw["key"]) != want_eval or (want_eval and raw["key"] in seen):
            misses += 1
            if misses > 100_000:
                raise ValueError(f"{task}: question space exhausted for split '{split}' after "
                                 f"{index} items; raise the difficulty knobs or ask for fewer")
            continue
        misses = 0
        if want_eval:
            seen.add(raw["key"])
        item = {"prompt": format_prompt(raw["question"], template), "answer": raw["answer"],
                "task": task, "id": f"{task}-{split}-s{seed}-{index}", "question": raw["question"]}
        if task == "countdown":
            item.update(numbers=raw["numbers"], target=raw["target"])
        yield item
        index += 1


def make_items(task: str, n: int, *, seed: int, split: str = "train", template: str = "r1_zero",
               **knobs: Any) -> list[dict]:
    """The first `n` items of `iter_items(task, seed=seed, split=split, ...)`."""
    stream = iter_items(task, seed=seed, split=split, template=template, **knobs)
    return [next(stream) for _ in range(n)]


# ---------------------------------------------------------------- SFT responses


def _place_parts(n: int) -> list[int]:
    """372 -> [300, 70, 2]; zero parts are dropped (0 -> [0])."""
    digits = str(n)
    parts = [int(d) * 10 ** (len(digits) - k - 1) for k, d in enumerate(digits) if d != "0"]
    return parts or [0]


def _column_steps(a: int, op: str, b: int, drop_last_carry: bool = False) -> tuple[list[str], int]:
    """Column working for a + b or a - b (a >= b), units first, one equation per column with its carry
    (borrow) written out: 56+36 -> ["6+6=12", "5+3+1=9"], 92; 52-36 -> ["12-6=6", "5-3-1=1"], 16.

    The last column's sum is written whole; the answer is it followed by the earlier columns' units.
    `drop_last_carry` forgets the carry (borrow) into the last column: every equation stays true
    arithmetic, but the result is off by one unit of that column. That is the deliberate mistake of a
    weak SFT base; it needs a carry there (see can_go_wrong).
    """
    width = max(len(str(a)), len(str(b)))
    xs, ys = str(a)[::-1].ljust(width, "0"), str(b)[::-1].ljust(width, "0")
    steps, digits, carry = [], [], 0
    for k, (x, y) in enumerate(zip(xs, ys)):
        x, y, last = int(x), int(y), k == len(xs) - 1
        if last and drop_last_carry:
            if not carry:
                raise ValueError(f"{a}{op}{b}: no carry into the last column to drop")
            carry = 0
        if op == "+":
            total = x + y + carry
            steps.append(f"{x}+{y}{'+1' if carry else ''}={total}")
            carry, digit = divmod(total, 10) if not last else (0, total)
        else:
            top = x + 10 if (x < y + carry and not last) else x
            digit = top - y - carry
            steps.append(f"{top}-{y}{'-1' if carry else ''}={digit}")
            carry = int(top != x)
        digits.append(digit)
    return steps, sum(d * 10**k for k, d in enumerate(digits))


def _operands(item: dict) -> tuple[int, str, int]:
    a_text, op, b_text = item["question"].removeprefix("What is ").removesuffix("?").split(" ")
    return int(a_text), op, int(b_text)


def can_go_wrong(item: dict) -> bool:
    """Whether sft_response(item, wrong=True) exists: a sum or difference needs a carry (borrow) into
    its last column; products and countdown items can always be made wrong."""
    if item["task"] != "arithmetic":
        return True
    try:
        _arithmetic_steps(*_operands(item), drop_last_carry=True)
    except ValueError:
        return False
    return True


def _arithmetic_steps(a: int, op: str, b: int, drop_last_carry: bool = False) -> tuple[list[str], int]:
    """Working for a op b, as equations: column steps for + and - (see _column_steps; a - b with
    a < b is worked as -(b - a)), place-value partial products for *."""
    if op == "-" and a < b:
        steps, value = _column_steps(b, "-", a, drop_last_carry)
        return [f"{a}-{b}=-({b}-{a})", *steps], -value
    if op in "+-":
        return _column_steps(a, op, b, drop_last_carry)
    # Multiplication: split the operand with more non-zero digits into place parts, then add.
    split_b = len(_place_parts(b)) > 1 or len(_place_parts(a)) == 1
    x, parts = (a, _place_parts(b)) if split_b else (b, _place_parts(a))
    steps = [f"{x}*{p}={x * p}" if split_b else f"{p}*{x}={x * p}" for p in parts]
    if len(parts) > 1:
        steps.append(f"{'+'.join(str(x * p) for p in parts)}={a * b}")
    return steps, a * b


def sft_response(item: dict, *, wrong: bool = False, rng: random.Random | None = None) -> str:
    """A short chain of thought and a boxed answer, continuing a prompt that ends with ``<think>``.

    ``wrong=True`` gives the same kind of chain with a wrong boxed answer, for a deliberately weak SFT
    base. Addition and subtraction forget the carry (borrow) into the last column, one systematic
    mistake (see _column_steps; only where can_go_wrong); multiplication's last result is off by 1, 2
    or 10; countdown gives a valid expression over the numbers that misses the target.
    """
    rng = rng or random.Random(item["id"])
    if item["task"] == "arithmetic":
        a, op, b = _operands(item)
        steps, value = _arithmetic_steps(a, op, b)
        if str(value) != item["answer"]:
            raise ValueError(f"item {item['id']}: stored answer {item['answer']} != computed {value}")
        if wrong and op in "+-":
            steps, value = _arithmetic_steps(a, op, b, drop_last_carry=True)
        elif wrong:
            value += rng.choice([-10, -2, -1, 1, 2, 10])
            steps[-1] = f"{steps[-1].rsplit('=', 1)[0]}={value}"
        return f" {', '.join(steps)} </think> \\boxed{{{value}}}"
    if item["task"] == "countdown":
        numbers, target = item["numbers"], item["target"]
        expr = item["answer"]
        if not wrong:
            if not verify_countdown(expr, numbers, target):
                raise ValueError(f"item {item['id']}: reference {expr!r} does not make {target}")
            return f" {', '.join(_steps_of(expr))} </think> \\boxed{{{expr}}}"
        for _ in range(1000):
            value, expr, steps = _random_tree(numbers, rng, "+-*")
            if value != target:
                return f" {', '.join(steps)} </think> \\boxed{{{expr}}}"
        raise ValueError(f"item {item['id']}: every expression over {numbers} makes {target}")
    raise ValueError(f"item {item.get('id')}: no SFT responses for task '{item.get('task')}'")


def _steps_of(expr: str) -> list[str]:
    """Evaluation steps of an expression, innermost first ("(3+5)*7" -> ["3+5=8", "8*7=56"])."""
    steps: list[str] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        left, right = walk(node.left), walk(node.right)
        op = _OPS[type(node.op)]
        value = _APPLY[op](left, right)
        steps.append(f"{left}{op}{right}={value}")
        return value

    walk(ast.parse(expr, mode="eval").body)
    return steps


def sft_pairs(items: list[dict], *, seed: int, wrong_fraction: float = 0.0) -> list[dict]:
    """SFT pairs ``{"prompt", "response", "answer", "task", "id", "correct"}`` for task items.

    Of the items that can go wrong (can_go_wrong: for sums and differences, those with a carry into
    the last column), exactly ``round(wrong_fraction * count)``, chosen by `seed`, get a wrong answer.
    """
    if not 0.0 <= wrong_fraction <= 1.0:
        raise ValueError(f"wrong_fraction must be in [0, 1], got {wrong_fraction}")
    rng = random.Random(f"sft|{seed}")
    eligible = [k for k, item in enumerate(items) if can_go_wrong(item)]
    wrong = set(rng.sample(eligible, round(wrong_fraction * len(eligible))))
    pairs = []
    for k, item in enumerate(items):
        response = sft_response(item, wrong=k in wrong, rng=random.Random(f"{seed}|{item['id']}"))
        pairs.append({"prompt": item["prompt"], "response": response, "answer": item["answer"],
                      "task": item["task"], "id": item["id"], "correct": k not in wrong})
    return pairs


_CHITCHAT = [
    ("What color is the sky on a clear day?", "The sky is blue."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Say hello.", "Hello! How can I help you today?"),
    ("What do bees make?", "Bees make honey."),
    ("Which animal says meow?", "A cat says meow."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What do plants need to grow?", "Plants need light, water and air."),
    ("Name a primary color.", "Red is a primary color."),
    ("What season comes after winter?", "Spring comes after winter."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Where does the sun rise?", "The sun rises in the east."),
    ("What do you use to write on paper?", "You can use a pen or a pencil."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("Thank you!", "You are welcome."),
]


def chitchat_pairs(n: int, *, seed: int, template: str = "plain") -> list[dict]:
    """`n` non-reasoning SFT pairs (simple English Q/A with an empty think block), shuffled by seed."""
    order = list(range(len(_CHITCHAT)))
    random.Random(f"chat|{seed}").shuffle(order)
    pairs = []
    for k in range(n):
        question, answer = _CHITCHAT[order[k % len(order)]]
        pairs.append({"prompt": format_prompt(question, template), "response": f" </think> {answer}",
                      "answer": answer, "task": "chat", "id": f"chat-s{seed}-{k}", "correct": True})
    return pairs


def task_kwargs(cfg: JobConfig, split: str) -> dict:
    """Arguments of data.tasks.iter_items/make_items for the configured built-in task."""
    d = cfg.data
    knobs = {"digits": d.digits, "ops": tuple(d.ops), "mul_digits": d.mul_digits} if d.task == "arithmetic" else {}
    return {"task": d.task, "seed": d.seed, "split": split, "template": d.template, **knobs}


def ground_truth(item: dict) -> Any:
    """What the reward functions compare against: tests for code, numbers/target for countdown."""
    if "tests" in item:
        return {"tests": item["tests"]}
    if item.get("task") == "countdown":
        return {"answer": item["answer"], "numbers": item["numbers"], "target": item["target"]}
    return item["answer"]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of n records in `epoch`: a fresh seeded shuffle per epoch (prompt streams, SFT data)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
