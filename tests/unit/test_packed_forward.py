"""A packed row gives every sequence the logits it gets alone (fp32, 1e-5) on micro_moe.

Sequences of different lengths are packed best-fit (data/packing.py) into rows with a padding tail and
run through megatron with PackedSeqParams(qkv_format="thd"): attention, MLA's rope positions and the
MoE routing stay per sequence. Checked twice, against each sequence run alone in a batch of one:
the raw logits of GPTModel (main model, MTP off), and the label logprobs the trainer's
`forward_logprobs` returns for packed microbatches (two rows per stream, a padding-only tail).
Runs in-process on a world of size 1.
"""

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from r1_megatron.config.loader import load_config
from r1_megatron.data.packing import pack, unpack
from r1_megatron.model.provider import forward_logits, mtp_disabled
from r1_megatron.parallel.device import single_rank_world
from r1_megatron.parallel.groups import resolve_layout
from r1_megatron.train.microbatch import packed_microbatches
from r1_megatron.train.trainer import Trainer

TOL = 1e-5


@pytest.fixture(scope="module")
def trainer():
    cfg = load_config("configs/micro_moe_sft.yaml", [])
    device = single_rank_world(seed=3)
    return Trainer(cfg, resolve_layout(cfg, 1), device, for_training=False)


@pytest.fixture(scope="module")
def sequences():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(1, 128, (n,), generator=g) for n in (13, 5, 22, 9, 17, 3, 30, 11)]


@torch.no_grad()
def test_packed_logits_equal_alone(trainer, sequences):
    model = trainer.unwrapped.eval()
    batch = pack(sequences, 40)
    assert batch.tokens.shape[0] < len(sequences)  # several sequences share rows
    for r in range(batch.tokens.shape[0]):
        cu = batch.cu_seqlens[r]
        longest = int((cu[1:] - cu[:-1]).max())
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=longest, max_seqlen_kv=longest)
        with mtp_disabled(model):
            packed = model(batch.tokens[r : r + 1], batch.position_ids[r : r + 1], None, packed_seq_params=params)
        for i in batch.rows[r]:
            _, start = batch.where[i]
            n = batch.lengths[i]
            alone = forward_logits(model, sequences[i].unsqueeze(0))
            err = (packed[0, start : start + n] - alone[0]).abs().max().item()
            assert err <= TOL, (i, err)


def test_packed_microbatch_logprobs_equal_alone(trainer, sequences):
    batch = pack(sequences, 40)
    mbs = packed_microbatches(batch, rows_per_microbatch=2)
    assert any(mb.cu_seqlens.numel() > 4 for mb in mbs)
    streams = torch.cat([lp.reshape(-1, batch.capacity) for lp in trainer.forward_logprobs(mbs)])
    per_sequence = unpack(batch, streams, drop_last=True)
    for i, seq in enumerate(sequences):
        with torch.no_grad():
            logits = forward_logits(trainer.unwrapped.eval(), seq.unsqueeze(0))[0, :-1]
        want = torch.log_softmax(logits.float(), dim=-1).gather(1, seq[1:, None]).squeeze(1)
        err = (per_sequence[i] - want).abs().max().item()
        assert err <= TOL, (i, err)
