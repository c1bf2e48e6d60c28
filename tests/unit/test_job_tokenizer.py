"""`data.tokenizer`: the job's HF tokenizer directory, checked and carried into the HF exports.

A second tokenizer is built here from the shipped one (no hub): 8 added tokens, 520 ids, so anything
that silently falls back to the 512-id test tokenizer shows. Checks: a bad path is a ConfigError
naming data.tokenizer; a vocabulary larger than model.vocab_size names both numbers; the trainer's
HF export and `r1m convert mcore-to-hf` of a training checkpoint carry the job's tokenizer.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from r1_megatron.config.loader import ConfigError, load_config
from r1_megatron.data.tokenizer import ASSET_DIR, job_tokenizer, load_tokenizer, tokenizer_dir

EXTRA = [f"<extra_{i}>" for i in range(8)]


@pytest.fixture(scope="module")
def second_tokenizer(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer520")
    tok = load_tokenizer()
    tok.add_tokens(EXTRA)
    tok.save_pretrained(str(out))
    return out


def _cfg(tokenizer: Path | str, vocab: int = 640, *more: str):
    return load_config("configs/micro_moe_sft.yaml",
                       [f"data.tokenizer={tokenizer}", f"model.vocab_size={vocab}", *more])


def test_default_is_the_shipped_test_tokenizer():
    cfg = load_config("configs/micro_moe_sft.yaml")
    assert cfg.data.tokenizer == "" and tokenizer_dir(cfg) == ASSET_DIR
    assert len(job_tokenizer(cfg)) == 512


def test_bad_path_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: .*missing.* is not a directory with tokenizer files"):
        _cfg(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: "):
        _cfg(tmp_path / "empty")


def test_vocabulary_larger_than_the_model_names_both_numbers(second_tokenizer):
    cfg = _cfg(second_tokenizer, vocab=512)
    with pytest.raises(ConfigError, match=r"data\.tokenizer .* has 520 ids, more than model\.vocab_size\(512\)"):
        job_tokenizer(cfg)


def test_hf_exports_carry_the_job_tokenizer(second_tokenizer, tmp_path):
    from r1_megatron.train import checkpointing as dist_ckpt
    from r1_megatron.train.convert_job import mcore_to_hf
    from r1_megatron.train.weights import export_hf
    from r1_megatron.parallel.device import single_rank_world
    from r1_megatron.parallel.groups import resolve_layout, set_layout
    from r1_megatron.train.trainer import Trainer

    cfg = _cfg(second_tokenizer, 640, "parallel.micro_batch_size=1")
    tok = job_tokenizer(cfg)
    assert len(tok) == 520 and tok.convert_tokens_to_ids(EXTRA[0]) == 512
    device = single_rank_world(0, device=torch.device("cpu"))
    layout = resolve_layout(cfg, 1)
    set_layout(layout)
    trainer = Trainer(cfg, layout, device)
    exported = export_hf(trainer, tmp_path / "hf")
    ckpt = dist_ckpt.save(trainer, tmp_path / "ckpt")
    converted = mcore_to_hf(ckpt, tmp_path / "converted")
    for out in (exported, converted):
        got = AutoTokenizer.from_pretrained(str(out))
        assert len(got) == 520, out
        assert got.encode("1+2<extra_3>") == tok.encode("1+2<extra_3>")
