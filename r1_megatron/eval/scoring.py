"""What eval and rejection sampling share: prompt items, how a sample is checked, generate-then-score.

Item kinds, told apart by their fields:
- "countdown": a task item with ``numbers`` and ``target``; correct when the extracted answer is an
  expression that `verify_countdown` accepts (any correct expression, not only the reference one);
- "code": an item with ``tests``; correct when the code reward passes every test (mode "all");
- "math": an item with ``answer``; correct when the accuracy reward (math-verify) accepts it.

Every check runs in a `RewardPool` worker with a hard timeout, and so do the answer-equivalence
checks that cons@k votes with; a timeout or crash counts as a reward error, never as a silent 0.

Prompt files (JSONL) mix kinds line by line: a line with "tests" is a code task ({"prompt", "tests"}),
any other line a math prompt ({"prompt", "answer"}); bad lines come back as `JsonlError`s naming the
line, and the good lines are kept. The code tests of a prompt file ("assert ..." strings and
{"input", "output"} pairs) are turned into the code reward's {"assert"} / {"stdin", "stdout"} cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r1_megatron.config.schema import SandboxConfig
from r1_megatron.data.jsonl import JsonlError, read_lines, validate_record
from r1_megatron.reward.registry import RewardResult, get

if TYPE_CHECKING:  # the reward workers unpickle TaskScorer from this module: keep torch out of them
    from r1_megatron.rollout.engine import RolloutEngine, SamplingParams


def item_kind(item: dict) -> str:
    """ "countdown", "code" or "math" (see the module docstring)."""
    if "numbers" in item and "target" in item:
        return "countdown"
    if "tests" in item:
        return "code"
    if "answer" in item:
        return "math"
    raise ValueError(f"item {item.get('id', '?')}: no 'answer', 'tests' or 'numbers'/'target' to check")


def code_tests(tests: list) -> list[dict]:
    """Prompt-file tests ("assert ..." strings, {"input", "output"} pairs) as code-reward test cases."""
    cases = []
    for test in tests:
        if isinstance(test, str):
            cases.append({"assert": test})
        elif isinstance(test, dict) and set(test) >= {"input", "output"}:
            cases.append({"stdin": test["input"], "stdout": test["output"]})
        else:  # already in the reward's own form
            cases.append(test)
    return cases


def ground_truth(item: dict) -> dict:
    """What TaskScorer checks a response of `item` against."""
    kind = item_kind(item)
    if kind == "countdown":
        return {"countdown": {"numbers": list(item["numbers"]), "target": int(item["target"])}}
    if kind == "code":
        return {"tests": code_tests(item["tests"])}
    return {"answer": str(item["answer"])}


def extract_final(response: str, item: dict) -> str | None:
    """The answer a sample votes with: the math extraction (last box, else <answer>); None for code."""
    from r1_megatron.reward.math_reward import extract_answer

    return None if item_kind(item) == "code" else extract_answer(response)


def _prompt_or_code(record: Any) -> tuple[dict | None, str | None]:
    """A line with "tests" is a code task, any other a math prompt."""
    return validate_record(record, "code" if isinstance(record, dict) and "tests" in record else "prompt")


def read_prompt_file(path: str | Path) -> tuple[list[dict], list[JsonlError]]:
    """Math prompts and code tasks from one JSONL file: (good items with ids, errors for bad lines)."""
    numbered, errors = read_lines(path, _prompt_or_code)
    stem = Path(path).stem
    items = []
    for number, item in numbered:
        item.setdefault("id", f"{stem}:{number}")
        item.setdefault("task", "code" if "tests" in item else "math")
        items.append(item)
    return items, errors


@dataclass
class TaskScorer:
    """A picklable RewardPool scorer. For a sample: {"correct": 1.0 or 0.0} (plus the reward's own
    sub-scores) with the reward's error; for {"equivalent_to": a} and a response b: whether b is the
    same answer as a (math-verify), used by the cons@k vote."""

    sandbox: SandboxConfig | None = None
    code_mode: str = "all"

    def prepare(self) -> None:
        from r1_megatron.reward.code import configure

        configure(self.sandbox, self.code_mode)
        get("accuracy")(r"\boxed{\frac{1}{2}}", "0.5")  # first-call parser setup, outside any deadline

    def __call__(self, response: str, truth: dict) -> RewardResult:
        if "equivalent_to" in truth:
            from r1_megatron.reward.math_reward import check_answer

            same, error = check_answer(response, truth["equivalent_to"])
            return RewardResult(float(same), {"equivalent": float(same)}, error)
        if "countdown" in truth:
            from r1_megatron.data.tasks import verify_countdown
            from r1_megatron.reward.math_reward import extract_answer

            answer = extract_answer(response)
            ok = answer is not None and verify_countdown(answer, **truth["countdown"])
            return RewardResult(float(ok), {"correct": float(ok), "answer_found": float(answer is not None)})
        result = get("code" if "tests" in truth else "accuracy")(response, truth.get("answer", truth))
        ok = result.score >= 1.0
        return RewardResult(float(ok), {"correct": float(ok), **result.components}, result.error)


@dataclass
class Generation:
    """One decoded sample: its text (special tokens dropped), token count (EOS included) and why it ended."""

    text: str
    num_tokens: int
    finish_reason: str

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


def generate_and_score(
    engine: RolloutEngine,
    tokenizer: Any,
    items: list[dict],
    k: int,
    sampling: SamplingParams,
    pool: Any,
    *,
    chat: bool = False,
    batch_prompts: int = 32,
) -> tuple[list[list[Generation]], list[list[RewardResult]]]:
    """k samples per item, decoded and scored: (generations[i][j], rewards[i][j]).

    Prompts go to the engine `batch_prompts` at a time; each batch is handed to the reward pool as
    soon as it is decoded, so scoring overlaps the next batch's generation.
    """
    from r1_megatron.data.chat import encode_prompt

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    generations: list[list[Generation]] = []
    tickets = []
    for start in range(0, len(items), batch_prompts):
        batch = items[start : start + batch_prompts]
        prompts = [encode_prompt(tokenizer, item["prompt"], chat=chat) for item in batch]
        for item, samples in zip(batch, engine.generate(prompts, k, sampling), strict=True):
            group = [Generation(tokenizer.decode(s.token_ids, skip_special_tokens=True), len(s.token_ids),
                                s.finish_reason) for s in samples]
            generations.append(group)
            truth = ground_truth(item)
            tickets.append(pool.submit([(g.text, truth) for g in group]))
    return generations, [pool.wait(t) for t in tickets]


def equivalence_table(
    pool: Any, answers: list[list[str | None]]
) -> tuple[list[dict[tuple[str, str], bool]], int]:
    """For each prompt, math-verify's verdict on every pair of its distinct answers, scored in the pool;
    and how many of those checks failed (timeout, crash, parse error), each counted as "not the same".

    The key is (earlier, later) by first occurrence, which is the order `majority_vote` asks in.
    """
    pairs_per_prompt = []
    for row in answers:
        distinct = list(dict.fromkeys(a for a in row if a is not None))
        pairs_per_prompt.append([(a, b) for i, a in enumerate(distinct) for b in distinct[i + 1 :]])
    flat = [(b, {"equivalent_to": a}) for pairs in pairs_per_prompt for a, b in pairs]
    verdicts = iter(pool.score(flat) if flat else [])
    tables, errors = [], 0
    for pairs in pairs_per_prompt:
        table = {}
        for pair in pairs:
            result = next(verdicts)
            errors += result.error is not None
            table[pair] = result.score >= 1.0 and result.error is None
        tables.append(table)
    return tables, errors
