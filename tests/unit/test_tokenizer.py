"""The shipped tiny tokenizer and the chat encoding.

- It loads with transformers' AutoTokenizer, has exactly 512 ids (the tiny model cards' vocab_size),
  and rebuilding it in this process gives byte-identical files (so the build is deterministic).
- Special and format tokens are single ids; format markers survive skip_special_tokens decoding.
- Task prompts, SFT responses, Chinese/English filler and arbitrary unicode text round-trip exactly;
  digits are one token each.
- encode_sft masks exactly the response and eos, and its ids equal transformers' own tokenization of
  the chat template (chat mode) or bos + prompt + response + eos (raw mode); the prompt part equals
  the generation prompt that encode_prompt gives, so SFT and RL see the same ids.
"""

import filecmp
import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from r1_megatron.config.loader import load_card
from r1_megatron.data import tasks
from r1_megatron.data.chat import encode_prompt, encode_sft
from r1_megatron.data.tokenizer import (
    ASSET_DIR,
    FORMAT_TOKENS,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    build_tokenizer,
    load_tokenizer,
)

FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


@functools.cache
def _shipped():
    return load_tokenizer()


@pytest.fixture
def tok():
    return _shipped()


def test_loads_with_autotokenizer_and_matches_the_model_cards():
    tok = AutoTokenizer.from_pretrained(str(ASSET_DIR))
    assert len(tok) == VOCAB_SIZE == 512
    assert max(tok.get_vocab().values()) == 511
    for card in ("tiny_moe", "qwen2_tiny"):
        assert load_card(card).vocab_size == len(tok)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert tok.chat_template
    assert sum((ASSET_DIR / name).stat().st_size for name in FILES) < 64_000


def test_rebuild_is_byte_identical(tmp_path):
    build_tokenizer(tmp_path)
    for name in FILES:
        assert filecmp.cmp(tmp_path / name, ASSET_DIR / name, shallow=False), name


def test_special_and_format_tokens_are_single_ids(tok):
    for expected_id, text in enumerate(SPECIAL_TOKENS + FORMAT_TOKENS):
        assert tok.encode(text, add_special_tokens=False) == [expected_id], text
    assert set(tok.all_special_ids) == set(range(len(SPECIAL_TOKENS)))
    ids = tok("a <think> b </think> \\boxed{7}")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a <think> b </think> \\boxed{7}"


def test_task_text_round_trips(tok):
    texts = []
    for template in tasks.TEMPLATES:
        for task in tasks.TASKS:
            items = tasks.make_items(task, 30, seed=9, template=template)
            texts += [it["prompt"] for it in items]
            texts += [p["response"] for p in tasks.sft_pairs(items, seed=1, wrong_fraction=0.5)]
    texts += [p["prompt"] + p["response"] for p in tasks.chitchat_pairs(16, seed=0)]
    texts += ["我们今天学习加法和减法。请一步一步地思考。", "  two  spaces\n\ttab\r\nend "]
    texts += ["emoji 🙂 ok"]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids) == "<|bos|>" + text
    assert tok.tokenize("12345") == ["1", "2", "3", "4", "5"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_text_round_trips(text):
    tok = _shipped()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_encode_sft_chat_mode_matches_transformers(tok):
    item = tasks.make_items("arithmetic", 1, seed=0, template="compact")[0]
    response = tasks.sft_response(item)
    enc = encode_sft(tok, item["prompt"], response)
    messages = [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": response}]
    full = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    head = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"]
    assert enc.input_ids == full
    assert enc.input_ids[: len(head)] == head == encode_prompt(tok, item["prompt"])
    assert enc.loss_mask == [0] * len(head) + [1] * (len(full) - len(head))
    learned = [t for t, m in zip(enc.input_ids, enc.loss_mask) if m]
    assert learned[-1] == tok.eos_token_id
    assert tok.decode(learned) == response + "<|eos|>"
    assert head[0] == tok.bos_token_id and head.count(tok.bos_token_id) == 1


def test_encode_sft_raw_mode(tok):
    prompt, response = tasks.format_prompt("What is 2 + 3?"), " 2+3=5 </think> \\boxed{5}"
    enc = encode_sft(tok, prompt, response, chat=False)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    assert enc.input_ids == [tok.bos_token_id, *p_ids, *r_ids, tok.eos_token_id]
    assert enc.loss_mask == [0] * (1 + len(p_ids)) + [1] * (len(r_ids) + 1)
    assert encode_prompt(tok, prompt, chat=False) == enc.input_ids[: 1 + len(p_ids)]
    assert tok.decode(enc.input_ids) == "<|bos|>" + prompt + response + "<|eos|>"


def test_chat_template_system_and_errors(tok):
    enc = encode_sft(tok, "hi", "hello", system="be brief")
    assert tok.decode(enc.input_ids) == "<|bos|><|system|>be brief<|user|>hi<|assistant|>hello<|eos|>"
    with pytest.raises(Exception, match="unknown chat role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    with pytest.raises(ValueError, match="system message needs chat=True"):
        encode_prompt(tok, "hi", chat=False, system="s")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer("/nonexistent/dir")
