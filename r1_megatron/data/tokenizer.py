"""The tiny test tokenizer: a byte-level BPE with exactly 512 ids, built here from repo-generated text.

There is no model hub on our machines, so the tokenizer the tiny model cards use (vocab_size 512) is
trained locally with the `tokenizers` library and shipped in HF format in ``tests/assets/tokenizer``
(``tokenizer.json``, ``tokenizer_config.json`` with a jinja chat template, ``special_tokens_map.json``).
It loads with ``transformers.AutoTokenizer`` and with vLLM.

Layout of the ids (fixed, so tests and model cards can rely on it):
- 0..5: special tokens ``<|bos|> <|eos|> <|pad|> <|system|> <|user|> <|assistant|>``;
- 6..10: format markers ``<think> </think> <answer> </answer> \\boxed{`` as single, *non-special*
  tokens (a tiny model learns the format faster; decoding with skip_special_tokens keeps them);
- 11..266: the 256 byte symbols; 267..511: BPE merges.

Digits are split one per token (as in Qwen2/DeepSeek-V3), which keeps arithmetic learnable.
Encoding text adds ``<|bos|>`` in front (``add_special_tokens=True``, what vLLM does for a text
prompt); the chat template writes ``<|bos|>`` itself and is tokenized without special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from r1_megatron.config.loader import ConfigError
from r1_megatron.config.schema import JobConfig
from r1_megatron.config.validate import has_tokenizer_files

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
FORMAT_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{"]
ASSET_DIR = Path(__file__).resolve().parents[2] / "tests" / "assets" / "tokenizer"

# Roles are written as their special marker; an assistant turn ends with eos, which is what SFT learns
# to emit and what generation stops on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_ENGLISH_FILLER = """\
The quick brown fox jumps over the lazy dog. A small model learns to add numbers one digit at a time.
Please think step by step, check the work, and then write the final answer clearly.
The weather is nice today, so we will walk to the park and read a book under a tree.
Reasoning is the process of drawing conclusions from facts. A good answer is short and correct.
She asked a simple question and he gave a simple answer. They went home after the long day.
Numbers, words and symbols are all turned into tokens before the model reads them.
Water boils at one hundred degrees. The moon goes around the earth, and the earth goes around the sun.
If the answer is wrong, try again: first find the mistake, then fix it and explain why.
"""

_CHINESE_FILLER = """\
我们今天学习加法和减法。请一步一步地思考，然后给出最终答案。
天气很好，我们去公园散步，在树下看书。这个问题很简单，答案也很简单。
推理是从事实得出结论的过程。好的答案应该简短而且正确。
数字、文字和符号都会先变成词元，然后模型才能读取它们。
如果答案错了，请再试一次：先找到错误，再改正它，并说明原因。
水在一百度沸腾。月亮绕着地球转，地球绕着太阳转。
"""


def _place_value_response(item: dict) -> str:
    """The arithmetic working the corpus was built with (place-value steps, "37+45: 37+40=77, 77+5=82").

    Frozen here so the shipped tokenizer does not change when the SFT working in data/tasks.py does."""
    from r1_megatron.data import tasks

    a, op, b = tasks._operands(item)
    if op == "*":
        return tasks.sft_response(item)
    sign, (a, b) = ("-", (b, a)) if op == "-" and a < b else ("", (a, b))
    steps, acc = ([f"{b}-{a}=-({a}-{b})"] if sign else []), a
    for part in tasks._place_parts(b):
        new = acc + part if op == "+" else acc - part
        steps.append(f"{acc}{op}{part}={new}")
        acc = new
    if sign:
        steps.append(f"so {b}-{a}=-{acc}")
    return f" {', '.join(steps)} </think> \\boxed{{{sign}{acc}}}"


def training_corpus() -> list[str]:
    """The texts the tokenizer is trained on, in a fixed order (same list on every call)."""
    from r1_megatron.data import tasks

    # Every prompt carries its template, so the templates are weighted up to earn merges of their words.
    texts = [tasks.format_prompt("", template) for template in tasks.TEMPLATES] * 50
    for digits in (1, 2, 3, 4):
        items = tasks.make_items("arithmetic", 300, seed=digits, template="compact", digits=digits,
                                 mul_digits=2)
        texts += [item["question"] for item in items]
        texts += [_place_value_response(item) for item in items]
    for num_count in (2, 3, 4):
        items = tasks.make_items("countdown", 300, seed=num_count, template="compact",
                                 num_count=num_count)
        texts += [item["question"] for item in items]
        texts += [pair["response"] for pair in tasks.sft_pairs(items, seed=0)]
    texts += [p["prompt"] + p["response"] for p in tasks.chitchat_pairs(16, seed=0)] * 5
    for filler in (_ENGLISH_FILLER, _CHINESE_FILLER):
        texts += filler.splitlines() * 20
    return texts


def build_tokenizer_json() -> str:
    """Train the BPE and return its ``tokenizer.json`` text (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS + FORMAT_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    spec = json.loads(tok.to_str())
    # The trainer registers every reserved token as special; the format markers must stay in decoded
    # text (rewards read them), so they are ordinary added tokens.
    for added in spec["added_tokens"]:
        added["special"] = added["content"] in SPECIAL_TOKENS
    if len(spec["model"]["vocab"]) != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer: trained {len(spec['model']['vocab'])} ids, want {VOCAB_SIZE}; "
                           "the corpus has too few distinct pairs")
    return json.dumps(spec, ensure_ascii=False, indent=1, sort_keys=False) + "\n"


def _config_files() -> dict[str, dict[str, Any]]:
    special_map = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
                   "additional_special_tokens": SPECIAL_TOKENS[3:]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
        "padding_side": "right",
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}


def build_tokenizer(out_dir: str | Path) -> list[Path]:
    """Train the tokenizer and write the HF files into `out_dir`; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "tokenizer.json"]
    paths[0].write_text(build_tokenizer_json(), encoding="utf-8")
    for name, content in _config_files().items():
        path = out / name
        path.write_text(json.dumps(content, ensure_ascii=False, indent=2, sort_keys=True) + "\n",
                        encoding="utf-8")
        paths.append(path)
    return paths


def load_tokenizer(path: str | Path | None = None) -> Any:
    """The HF tokenizer at `path` (default: the shipped tiny tokenizer in tests/assets/tokenizer)."""
    from transformers import AutoTokenizer

    directory = Path(path) if path is not None else ASSET_DIR
    if not has_tokenizer_files(directory):
        raise FileNotFoundError(f"no tokenizer files in {directory} (build with tools/build_tokenizer.py)")
    return AutoTokenizer.from_pretrained(str(directory))


def tokenizer_dir(cfg: JobConfig) -> Path:
    """The job's tokenizer directory: data.tokenizer, or the shipped test tokenizer when unset. HF
    exports copy it, so vLLM and the eval/rejection CLIs read the tokenizer the job trained with."""
    return Path(cfg.data.tokenizer) if cfg.data.tokenizer else ASSET_DIR


def check_vocab(tok: Any, cfg: JobConfig) -> None:
    """Every id of `tok` must have a row in the model's embedding (model.vocab_size, padded)."""
    if len(tok) > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer ({tokenizer_dir(cfg)}) has {len(tok)} ids, more than "
            f"model.vocab_size({cfg.model.vocab_size}), the model's padded vocabulary"
        )


def job_tokenizer(cfg: JobConfig) -> Any:
    """The job's tokenizer (`tokenizer_dir`), checked against the model's vocabulary."""
    tok = load_tokenizer(tokenizer_dir(cfg))
    check_vocab(tok, cfg)
    return tok
