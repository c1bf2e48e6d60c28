"""Prompt and SFT-pair encoding, with a loss mask over the response only.

Two modes, and a run must use the same one for SFT and for RL prompts:
- ``chat=True``: the tokenizer's jinja chat template (a user turn, then the assistant turn);
- ``chat=False``: raw text, as DeepSeek-R1-Zero feeds its template to a base model
  (``<|bos|>`` + prompt, then the response and eos).

The prompt and the response are tokenized separately and concatenated, which is exactly what the
policy sees in RL (prompt ids, then the ids it generated), so SFT never trains on a token split that
generation cannot produce.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Encoded(NamedTuple):
    """input_ids: [L] token ids (prompt then response); loss_mask: [L], 1 on response tokens and eos."""

    input_ids: list[int]
    loss_mask: list[int]


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": prompt}]


def render_prompt(tokenizer: Any, prompt: str, *, chat: bool = True, system: str | None = None) -> str:
    """The prompt text the model is conditioned on (chat: the template up to the assistant turn)."""
    if not chat:
        if system:
            raise ValueError("a system message needs chat=True (raw prompts carry their own instructions)")
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat_template; use chat=False")
    return tokenizer.apply_chat_template(_messages(prompt, system), add_generation_prompt=True,
                                         tokenize=False)


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool = True, system: str | None = None) -> list[int]:
    """Token ids of a prompt, ready for generation (raw mode adds the tokenizer's bos, if any)."""
    text = render_prompt(tokenizer, prompt, chat=chat, system=system)
    # The chat template writes bos itself; a raw prompt gets it from the tokenizer's post-processor.
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def encode_sft(tokenizer: Any, prompt: str, response: str, *, chat: bool = True,
               system: str | None = None) -> Encoded:
    """Ids of prompt + response + eos and a loss mask that is 1 only on the response and eos."""
    prompt_ids = encode_prompt(tokenizer, prompt, chat=chat, system=system)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token")
    if chat:
        prefix = render_prompt(tokenizer, prompt, chat=True, system=system)
        full = tokenizer.apply_chat_template(
            _messages(prompt, system) + [{"role": "assistant", "content": response}], tokenize=False
        )
        if not full.startswith(prefix):
            raise ValueError("chat template: the rendered conversation does not start with the "
                             "rendered generation prompt, so the response cannot be masked")
        response_ids = tokenizer(full[len(prefix):], add_special_tokens=False)["input_ids"]
        # Templates that close the turn with another marker still have to teach the model to stop.
        if eos not in response_ids:
            response_ids.append(eos)
    else:
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
    return Encoded(prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids))
