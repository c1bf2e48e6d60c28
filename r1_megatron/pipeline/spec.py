"""A pipeline config, checked and resolved before anything runs: the stage spec (what each kind
reads, stages.py), the YAML file with its base job config and shared overrides, and the command
line's `key=value` (every stage) and `stages.<name>.<field>=value` (one stage). Every stage's job
config is base < shared overrides < the stage's own < command line, merged as config/loader.py
merges a job config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from r1_megatron.config.loader import (
    CONFIGS_DIR,
    ConfigError,
    computed_keys,
    find_config,
    from_dict,
    merge,
    parse_overrides,
    read_yaml,
    resolve_dict,
)
from r1_megatron.config.schema import JobConfig
from r1_megatron.distill.rejection import RejectionConfig

KINDS = ("sft", "grpo", "rejection_sampling", "distill", "eval")
POLICY_KINDS = ("sft", "grpo", "rejection_sampling")  # stages whose output is the next policy
_COMMON = {"name", "kind", "overrides", "init", "eval_prompts", "eval_k", "dir"}
_KIND_FIELDS = {
    "sft": {"steps", "pairs_per_step"},
    "grpo": {"steps", "own_eval"},
    "rejection_sampling": {"steps", "pairs_per_step", "prompts", "rejection"},
    "distill": {"steps", "pairs_per_step", "prompts", "rejection", "student", "traces"},
    "eval": set(),
}


@dataclass
class StageSpec:
    """One stage of a pipeline YAML (`overrides` is read separately: job-config changes for this stage)."""

    name: str = ""  # unique, names the stage (and DIR/<name>/ unless `dir` says otherwise)
    dir: str = ""  # the stage's directory relative to DIR ("": <name>; ".": DIR itself)
    kind: Literal["sft", "grpo", "rejection_sampling", "distill", "eval"] = "sft"  # what the stage does
    init: str = ""  # policy to start/sample from: "" the previous policy stage, "base", or an earlier stage
    steps: int = 0  # optimizer steps (sft, rejection_sampling, distill); grpo: rl.steps (0: the job's)
    pairs_per_step: int = 32  # SFT pairs per optimizer step (0: the job's data.sft_pairs_per_step)
    prompts: int = 64  # train prompts sampled (rejection_sampling, distill)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)  # what sampling keeps
    student: str = ""  # distill: the dense student's model card
    traces: str = ""  # distill: reuse this earlier stage's traces.jsonl instead of sampling the teacher
    eval_prompts: int = 0  # held-out prompts for pass@1 after the stage (eval: default data.num_eval)
    eval_k: int = 4  # samples per eval prompt
    own_eval: bool = False  # grpo: held-out pass@1 by the run's own evaluator before and after (stages.py)


@dataclass
class Stage:
    """A checked stage: its spec, its resolved job config, and the digest done.json records (`_digest`)."""

    spec: StageSpec
    job: JobConfig
    digest: str


@dataclass
class Pipeline:
    source: str
    stages: list[Stage]

    def describe(self) -> dict:
        return {"source": self.source, "stages": [
            {"spec": dataclasses.asdict(s.spec), "job": dataclasses.asdict(s.job)} for s in self.stages]}


def _nest(overrides: dict, where: str) -> dict:
    """{'rl.steps': 2, 'optim': {'lr': 1e-3}} -> {'rl': {'steps': 2}, 'optim': {'lr': 1e-3}}."""
    out: dict = {}
    for key, value in overrides.items():
        node = out
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: '{key}' goes through '{part}', which is not a section")
        leaf = _nest(value, where) if isinstance(value, dict) else value
        node[parts[-1]] = merge(node[parts[-1]], leaf) if isinstance(node.get(parts[-1]), dict) else leaf
    return out


def _spec(raw: object, where: str) -> tuple[StageSpec, dict]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with name and kind, got {raw!r}")
    for key in ("name", "kind"):
        if key not in raw:
            raise ConfigError(f"{where}: missing required field '{key}'")
    if raw["kind"] not in KINDS:
        raise ConfigError(f"{where}: kind {raw['kind']!r} is not one of {list(KINDS)}")
    where = f"{where} ({raw['name']})"
    extra = sorted(set(raw) - _COMMON - _KIND_FIELDS[raw["kind"]])
    if extra and extra[0] in {f.name for f in dataclasses.fields(StageSpec)}:
        raise ConfigError(f"{where}: field '{extra[0]}' does not apply to kind {raw['kind']}")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: overrides: expected a mapping, got {type(overrides).__name__}")
    try:
        spec = from_dict(StageSpec, {k: v for k, v in raw.items() if k != "overrides"})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:  # RejectionConfig's own range checks
        raise ConfigError(f"{where}: {e}") from None
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", spec.name):
        raise ConfigError(f"{where}: name must be letters, digits, '_', '.' or '-'")
    parts = spec.dir.split("/")
    if spec.dir and spec.dir != "." and ("." in parts or ".." in parts
                                         or not all(re.fullmatch(r"[A-Za-z0-9_.-]+", p) for p in parts)):
        raise ConfigError(f"{where}: dir must be '.' or a relative path inside the pipeline directory, "
                          f"got {spec.dir!r}")
    if spec.own_eval and spec.eval_prompts:
        raise ConfigError(f"{where}: own_eval and eval_prompts both measure the stage; set one")
    if spec.kind in ("sft", "rejection_sampling", "distill") and spec.steps < 1:
        raise ConfigError(f"{where}: steps must be >= 1 for kind {spec.kind}, got {spec.steps}")
    if spec.kind == "distill" and not spec.student:
        raise ConfigError(f"{where}: missing required field 'student' (a dense model card, e.g. qwen2_tiny)")
    lows = (("pairs_per_step", 0), ("prompts", 1), ("eval_prompts", 0), ("eval_k", 1), ("steps", 0))
    for name, low in lows:
        if getattr(spec, name) < low:
            raise ConfigError(f"{where}: {name} must be >= {low}, got {getattr(spec, name)}")
    return spec, _nest(overrides, f"{where}: overrides")


def _job(base: dict, layers: list[dict], spec: StageSpec, own: dict, where: str) -> JobConfig:
    from r1_megatron.config.validate import validate

    data = base
    for layer in layers:
        data = merge(data, layer)
    if spec.kind == "distill":
        # The student is its own network: none of the teacher's model fields, and no teacher weights.
        data = {**data, "model": {"card": spec.student, **own.get("model", {})}}
        data["checkpoint"] = {**data.get("checkpoint", {}), "load": own.get("checkpoint", {}).get("load", "")}
    if spec.kind == "grpo" and spec.steps:
        data = merge(data, {"rl": {"steps": spec.steps}})
    try:
        job = from_dict(JobConfig, resolve_dict(data))
        validate(job)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if spec.kind == "distill" and job.model.arch not in ("qwen2", "llama"):
        raise ConfigError(f"{where}: student '{spec.student}' is a {job.model.arch} card; "
                          "a student is qwen2 or llama")
    return job


def build_pipeline(base: dict, shared: dict, stages_raw: object, common: list[str],
                   per_stage: dict[str, dict], source: str) -> Pipeline:
    """Check the stages and resolve each one's job config (base < shared < stage < command line)."""
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{source}: stages: expected a non-empty list of stages")
    names = [s.get("name") for s in stages_raw if isinstance(s, dict)]
    unknown = sorted(set(per_stage) - set(names))
    if unknown:
        raise ConfigError(f"override stages.{unknown[0]}.*: no stage named '{unknown[0]}' (stages: {names})")
    cli = parse_overrides(common)
    stages: list[Stage] = []
    for i, raw in enumerate(stages_raw):
        if isinstance(raw, dict) and raw.get("name") in per_stage:
            raw = merge(raw, per_stage[raw["name"]])
        spec, own = _spec(raw, f"stages[{i}]")
        where = f"stages[{i}] ({spec.name})"
        earlier = {s.spec.name: s.spec.kind for s in stages}
        if spec.name in earlier:
            raise ConfigError(f"{where}: duplicate stage name '{spec.name}'")
        if spec.init not in ("", "base") and earlier.get(spec.init) not in POLICY_KINDS:
            raise ConfigError(f"{where}: init '{spec.init}' is not an earlier "
                              "sft/grpo/rejection_sampling stage")
        if spec.kind == "distill" and spec.init == "base":
            raise ConfigError(f"{where}: init: base does not apply to distill (the teacher is a policy "
                              "stage; or reuse a traces set with traces: <stage>)")
        if spec.traces and earlier.get(spec.traces) not in ("rejection_sampling", "distill"):
            raise ConfigError(f"{where}: traces '{spec.traces}' is not an earlier "
                              "rejection_sampling/distill stage")
        has_policy = any(k in POLICY_KINDS for k in earlier.values())
        if spec.kind in ("rejection_sampling", "distill") and not spec.traces and spec.init != "base" \
                and not has_policy:
            raise ConfigError(f"{where}: kind {spec.kind} samples a policy, but no "
                              "sft/grpo/rejection_sampling "
                              "stage comes before it (or set init: base with an HF checkpoint.load)")
        has_student = "distill" in earlier.values()
        if spec.kind == "eval" and not (has_policy or has_student or spec.init == "base"):
            raise ConfigError(f"{where}: nothing to evaluate: no policy or distill stage comes before it")
        job = _job(base, [_nest(shared, "overrides"), own, cli], spec, own, where)
        if spec.pairs_per_step == 0:
            if job.data.sft_pairs_per_step < 1:
                raise ConfigError(f"{where}: pairs_per_step 0 takes data.sft_pairs_per_step, which is "
                                  f"{job.data.sft_pairs_per_step}; it must be >= 1")
            spec = dataclasses.replace(spec, pairs_per_step=job.data.sft_pairs_per_step)
        stage_dir = spec.dir or spec.name
        if stage_dir in {s.spec.dir or s.spec.name for s in stages}:
            raise ConfigError(f"{where}: dir '{stage_dir}' is an earlier stage's directory")
        stages.append(Stage(spec, job, _digest(stages[-1] if stages else None, spec, job)))
    return Pipeline(source, stages)


def _digest(previous: Stage | None, spec: StageSpec, job: JobConfig) -> str:
    """What done.json records: the stage's spec and job config less what a resumed run may change
    (config/loader.py RESUMABLE: steps, reporting, layout; a grpo stage's `steps` is its rl.steps),
    chained over the stages before it, so that a changed input, a grpo stage's rl.steps included,
    makes every later done.json stale too."""
    chain = ""
    if previous is not None:
        grown = previous.job.rl.steps if previous.spec.kind == "grpo" else None
        chain = _sha([previous.digest, grown])
    own = {k: v for k, v in dataclasses.asdict(spec).items() if not (spec.kind == "grpo" and k == "steps")}
    return _sha([chain, own, computed_keys(job)])


def _sha(data: list) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _split_cli(overrides: list[str]) -> tuple[list[str], dict[str, dict]]:
    """(job-config overrides for every stage, {stage name: nested changes to its spec})."""
    common, per_stage = [], {}
    for item in overrides:
        key = item.split("=", 1)[0]
        if key.startswith("stages."):
            parts = item[len("stages."):].split(".", 1)
            if len(parts) != 2 or "=" not in parts[1]:
                raise ConfigError(f"override '{item}' must look like stages.<name>.<field>=value")
            per_stage[parts[0]] = merge(per_stage.get(parts[0], {}), parse_overrides([parts[1]]))
        else:
            common.append(item)
    return common, per_stage


def _base_path(base: str, config_path: Path) -> Path:
    candidates = (config_path.parent / base, Path(base), CONFIGS_DIR / base, CONFIGS_DIR / f"{base}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{config_path}: base: no job config '{base}' (looked next to the file and in "
                      f"{CONFIGS_DIR})")


def load_pipeline(path: str | Path, overrides: list[str] | None = None):
    """Read and check a pipeline YAML; every stage's job config is resolved here, so a bad stage
    fails before the first one runs."""
    path = find_config(path, "pipeline config")
    raw = read_yaml(path)
    unknown = sorted(set(raw) - {"base", "overrides", "stages"})
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (a pipeline has base, overrides, stages)")
    for key in ("base", "stages"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required key '{key}'")
    if not isinstance(raw["base"], str) or not raw["base"]:
        raise ConfigError(f"{path}: base: expected the name or path of a job config, got {raw['base']!r}")
    base_file = _base_path(raw["base"], path)
    base = read_yaml(base_file)
    shared = raw.get("overrides") or {}
    if not isinstance(shared, dict):
        raise ConfigError(f"{path}: overrides: expected a mapping, got {type(shared).__name__}")
    common, per_stage = _split_cli(list(overrides or []))
    return build_pipeline(base, shared, raw["stages"], common, per_stage, source=str(path))
