"""A reward that a few GRPO steps must raise from a random init: the share of digit characters in
the response. Lives in a module (not the test) so the reward pool's spawned workers can import it."""

from r1_megatron.reward.registry import RewardResult


def digit_share(response: str, ground_truth) -> RewardResult:
    chars = [c for c in response if not c.isspace()]
    share = sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0
    return RewardResult(share, {"accuracy": share})
