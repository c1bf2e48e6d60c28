"""GRPO: the sample contract (types), advantages, the policy loss, the train step and the loop."""
