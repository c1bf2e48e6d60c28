"""Where the rollout engines run relative to the trainer (`rollout.placement`), in one place.

`build_rollout(cfg, device)` is the factory the GRPO session calls; it returns the engine this rank
takes part in (or None) and the rank's `EngineSlot`. Placements:

- colocated (default): every trainer rank is also a vLLM rank, through vLLM's external launcher
  (GPU and CPU alike; vllm_engine.py). Engine e spans the `rollout.tp` consecutive ranks
  [e * tp, (e + 1) * tp). Engines are independent (no vLLM data parallelism): vLLM's DP couples the
  engines' step loops, so an engine that finishes early would wait on the others, and on CPU its
  MoE all_gatherv does not exist. Each engine generates its share of the prompts (`EngineSlot.share`);
  every rank of an engine submits the same requests (a vLLM TP group must), and only its first rank
  (the leader) scores them, keeps the samples and checks the canary.
- separate: `rollout.engines` vLLM processes outside the trainer's world (rollout/separate.py), all
  driven by rank 0, which generates every prompt (dividing them among the engines), scores them and
  checks the canary on every engine. The other ranks get no engine (None) and a slot with no share:
  they join only the collectives (the refit's gather, the canary's trainer forward, `agree`).

Either engine starts from the model's HF config alone, with dummy weights (and asleep at once on GPU),
before the trainer allocates anything: the first refit of the run loads the trainer's weights, so
no checkpoint is written just to start it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from r1_megatron.config.loader import ConfigError
from r1_megatron.config.schema import JobConfig
from r1_megatron.rollout.vllm_process import vllm_log_level


@dataclass(frozen=True)
class EngineSlot:
    """This rank's place among the rollout engines."""

    rank: int  # global rank
    index: int  # this rank's engine
    count: int  # engines in the job
    ranks: tuple[int, ...]  # the global ranks of this rank's engine (separate: (0,), the driving rank)
    separate: bool = False  # rollout.placement separate: the engines are processes rank 0 drives

    @property
    def leader(self) -> bool:
        """The engine's first rank: it scores, keeps the samples and checks the canary."""
        return self.rank == self.ranks[0]

    def share(self, n: int) -> list[int]:
        """The indices among n prompts this rank's engine generates (round robin over engines; none
        on a rank that drives no engine)."""
        return list(range(self.index, n, self.count)) if self.rank in self.ranks else []

    def describe(self) -> str:
        if self.separate:
            return "rank 0 (drives the separate engines)" if self.leader else f"rank {self.rank} (trainer only)"
        ranks = f"rank {self.rank}" if len(self.ranks) == 1 else f"ranks {self.ranks[0]}-{self.ranks[-1]}"
        return f"engine {self.index} ({ranks})"


def colocated_slot(tp: int, rank: int, world: int) -> EngineSlot:
    """Engine index rank // tp, over `world` ranks; rollout.tp must divide the world size."""
    if tp < 1 or world % tp:
        raise ConfigError(f"rollout.tp({tp}) must be >= 1 and divide the world size ({world}) with "
                          "rollout.placement 'colocated' (one engine per rollout.tp consecutive ranks)")
    index = rank // tp
    ranks = tuple(range(index * tp, index * tp + tp))
    return EngineSlot(rank=rank, index=index, count=world // tp, ranks=ranks)


def separate_slot(rank: int) -> EngineSlot:
    """Rank 0 drives the separate engines (one slot generating every prompt); other ranks none."""
    return EngineSlot(rank=rank, index=0, count=1, ranks=(0,), separate=True)


def engine_config_dir(cfg: JobConfig) -> Path:
    """<run_dir>/rollout_init holding only the HF config.json of cfg.model: what vLLM needs to build
    the model with dummy weights. Every rank writes the same bytes (atomically), so no rank waits."""
    import json
    import os

    from r1_megatron.checkpoint import hf_io

    out = Path(cfg.logging.run_dir) / "rollout_init"
    out.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = out / f".config.json.{os.getpid()}.{rank}"
    tmp.write_text(json.dumps(hf_io.hf_config(cfg.model), indent=2))
    os.replace(tmp, out / "config.json")
    return out


def routing_capture(cfg: JobConfig, hf_dir: Path):
    """The rollout's routing capture for router replay / routing-mismatch metrics (MoE models), or None."""
    import json

    from r1_megatron.rollout.routing_capture import RoutingCapture

    if cfg.rl.router_replay == "off" and not cfg.rollout.capture_routing:
        return None
    hf = json.loads((Path(hf_dir) / "config.json").read_text())
    if "n_routed_experts" not in hf:
        raise ValueError(f"rl.router_replay={cfg.rl.router_replay!r} / rollout.capture_routing: {hf_dir} is not an MoE model")
    return RoutingCapture.for_hf_config(hf)


def build_rollout(cfg: JobConfig, device: torch.device):
    """(the engine this rank takes part in, its EngineSlot). Collective: every rank calls it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    vllm_log_level(cfg.logging.verbose)  # before vLLM is imported; spawned engines inherit it
    if cfg.rollout.placement == "separate":
        slot, engine, error = separate_slot(rank), None, None
        if slot.leader:
            from r1_megatron.rollout.separate import SeparateEngine

            try:
                engine = SeparateEngine(engine_config_dir(cfg), cfg.rollout, device=device.type, dummy_weights=True)
            except Exception as e:  # noqa: BLE001 (every rank must learn of it: see agree)
                error = e
        agree(slot, error, "starting the separate rollout engines")
        return engine, slot
    if cfg.rollout.placement != "colocated":
        raise ConfigError(f"rollout.placement: {cfg.rollout.placement!r} is not one of ['colocated', 'separate']")
    slot = colocated_slot(cfg.rollout.tp, rank, world)
    from r1_megatron.rollout.vllm_engine import VLLMEngine

    config_dir = engine_config_dir(cfg)
    engine = VLLMEngine(config_dir, cfg.rollout, device=device.type, dummy_weights=True,
                        routing=routing_capture(cfg, config_dir))
    engine.release()  # GPU: asleep until the first refit (dummy weights are never used); CPU: no-op
    return engine, slot


class EngineFailure(RuntimeError):
    """A rollout engine failed on some ranks; raised on every rank alike (see `agree`)."""


def agree(slot: EngineSlot, error: BaseException | None, what: str) -> None:
    """Raise the same EngineFailure on every rank when any rank failed (collective).

    Each rank's error travels to all, so a rank whose engine is healthy stops too, with a message
    naming every failing engine and rank, instead of waiting for a collective that never comes."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        if error is not None:
            raise error
        return
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(rank, msg) for rank, msg in enumerate(errors) if msg is not None]
    if failed:
        where = "; ".join(f"{_slot_like(slot, rank, len(errors)).describe()} on rank {rank}: {msg}"
                          for rank, msg in failed)
        raise EngineFailure(f"{what} failed on {len(failed)} of {len(errors)} ranks: {where}") from error


def _slot_like(slot: EngineSlot, rank: int, world: int) -> EngineSlot:
    """Rank `rank`'s slot in the placement `slot` belongs to."""
    return separate_slot(rank) if slot.separate else colocated_slot(len(slot.ranks), rank, world)
