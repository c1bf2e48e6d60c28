"""Format reward: exactly one think block plus a non-empty answer part, with or without the opening tag
(R1-Zero's prompt ends in "<think>"), strict <answer> tags when used. Language consistency: the share of
target-script words in the chain of thought, hand-counted. Weighted total: sum of w_k r_k over the
components that apply to the sample, every component and error recorded."""

import pytest

from r1_megatron.reward import SKIP, component_truth, score_sample
from r1_megatron.reward.format_reward import format_reward, split_think
from r1_megatron.reward.language import chain_of_thought, language_reward, language_share, word_scripts
from r1_megatron.reward.registry import RewardResult, names


@pytest.mark.parametrize(
    "response,expected",
    [
        ("reasoning here</think> The answer is 4.", 1.0),  # prompt opened <think>
        ("<think>reasoning here</think> The answer is 4.", 1.0),  # response opens it
        ("  \n<think>r</think>\n<answer>4</answer>\n", 1.0),
        ("r</think><answer> 4 </answer>", 1.0),
        ("<think></think>4", 1.0),  # an empty think block is still one block
        ("reasoning</think>", 0.0),  # no answer part
        ("reasoning</think>   \n", 0.0),
        ("The answer is 4.", 0.0),  # no think block at all
        ("<think>a</think>b</think>c", 0.0),  # two closings
        ("<think>a</think><think>b</think>c", 0.0),  # two blocks
        ("<think><think>a</think>c", 0.0),  # a second opening tag
        ("a</think>b<think>", 0.0),
        ("r</think><answer></answer>", 0.0),  # empty answer tags
        ("r</think><answer>4", 0.0),  # unclosed answer
        ("r</think><answer>4</answer> trailing", 0.0),
        ("r</think>so <answer>4</answer>", 0.0),
        ("r</think><answer>4</answer><answer>5</answer>", 0.0),
    ],
)
def test_format(response, expected):
    assert format_reward(response, None).score == expected
    assert format_reward(response, None).components == {"format": expected}


def test_split_think():
    assert split_think("<think>a</think>b") == ("a", "b")
    assert split_think("a</think>b") == ("a", "b")
    assert split_think("ab") is None


@pytest.mark.parametrize(
    "text,expected",
    [
        ("the cat sat", ["latin"] * 3),
        ("我们计算", ["han"] * 4),  # every Han character is a word
        ("ひらがな", ["kana"] * 4),
        ("x is 5, 所以", ["latin", "latin", "han", "han"]),
        ("Привет мир", ["cyrillic"] * 2),
        ("안녕 하세요", ["hangul"] * 2),
        (r"we get $\frac{a}{b} = x$ and \(y\) \sqrt{2}", ["latin", "latin", "latin"]),  # math is not language
        ("123 + 456 = 579 !", []),
        ("café naïve", ["latin"] * 2),
    ],
)
def test_word_scripts(text, expected):
    assert word_scripts(text) == expected


def test_language_share_hand_counted():
    # 3 Latin words + 4 Han characters.
    text = "let us 计算一下 now"
    assert language_share(text, "en") == pytest.approx(3 / 7)
    assert language_share(text, "zh") == pytest.approx(4 / 7)
    assert language_share("ひらがな 漢字", "ja") == 1.0
    assert language_share("ひらがな 漢字", "zh") == pytest.approx(2 / 6)
    assert language_share("$x=1$", "en") == 0.0  # no words: nothing to reward
    with pytest.raises(ValueError, match="reward.language: unknown language 'xx'"):
        language_share("a", "xx")


def test_language_reward_reads_only_the_chain_of_thought():
    response = "<think>我们来算 two plus two</think> 答案是四"
    assert chain_of_thought(response) == "我们来算 two plus two"
    # CoT: 4 Han + 3 Latin words; the answer part's Han characters do not count.
    assert language_reward(response, "zh").score == pytest.approx(4 / 7)
    assert language_reward(response, "en").score == pytest.approx(3 / 7)
    assert language_reward("no closing tag here", "en").score == 1.0  # all of it is the CoT


def test_builtin_components_registered():
    assert {"accuracy", "format", "language"} <= set(names())


def test_component_truth_routing():
    assert component_truth("accuracy", "5") == "5"
    assert component_truth("accuracy", {"answer": "5", "language": "zh"}) == "5"
    assert component_truth("accuracy", {"tests": []}) is SKIP
    assert component_truth("code", "5") is SKIP
    assert component_truth("code", {"tests": [{"assert": "1"}]}) == {"tests": [{"assert": "1"}]}
    assert component_truth("language", "5", "zh") == "zh"
    assert component_truth("language", {"answer": "5", "language": "ja"}, "zh") == "ja"
    assert component_truth("format", "5") is None


def test_weighted_total_records_components():
    weights = {"accuracy": 1.0, "format": 0.1, "language": 0.5}
    response = "<think>two and two make four</think> <answer>4</answer>"
    result = score_sample(response, "4", weights, "en")
    assert result.score == pytest.approx(1.0 + 0.1 + 0.5)
    assert result.components == {
        "accuracy": 1.0,
        "accuracy/answer_found": 1.0,
        "format": 1.0,
        "language": 1.0,
    }
    assert result.error is None
    wrong = score_sample("<think>两个加两个</think> <answer>5</answer>", "4", weights, "en")
    assert wrong.score == pytest.approx(0.1)  # wrong answer, right format, no English word in the CoT
    # A code sample skips accuracy: it is neither in the total nor in the breakdown.
    code_like = score_sample("x</think>y", {"tests": []}, {"accuracy": 1.0, "format": 0.1}, "en")
    assert code_like.components == {"format": 1.0} and code_like.score == pytest.approx(0.1)


def test_component_exception_is_counted_not_raised():
    from r1_megatron.reward import registry

    def broken(response, truth):
        raise ZeroDivisionError

    def failing(response, truth):
        return RewardResult(0.0, {}, "sandbox:memory")

    registry.register("test_broken_component")(broken)
    registry.register("test_failing_component")(failing)
    try:
        weights = {"format": 1.0, "test_broken_component": 2.0, "test_failing_component": 1.0}
        result = score_sample("a</think>b", "1", weights)
    finally:  # leave the process-wide registry as other test modules expect it
        del registry._REGISTRY["test_broken_component"], registry._REGISTRY["test_failing_component"]
    assert result.score == 1.0
    assert result.error == "exception:ZeroDivisionError,sandbox:memory"
    assert result.components["test_broken_component/error"] == 1.0
    assert result.components["test_failing_component/error"] == 1.0
    assert result.components["test_broken_component"] == 0.0
