"""Strict YAML loading: unknown keys, wrong types and inconsistent sizes are one-line errors.

Order of precedence: model card < job YAML < dotted `key=value` overrides from the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from r1_megatron.config.schema import ConfigError, JobConfig, ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = Path(os.environ.get("R1M_MODELS_DIR", REPO_ROOT / "models"))
CONFIGS_DIR = Path(os.environ.get("R1M_CONFIGS_DIR", REPO_ROOT / "configs"))


# Keys named elsewhere (issues, other systems) -> where they live here.
MOVED = {"rl.max_bad_steps": "optim.max_bad_steps", "rl.skip_nonfinite": "optim.skip_nonfinite"}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; the only conversions are int -> float and "3e-6" -> float."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in get_args(tp):
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a bool
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, path)
    if origin is dict:
        key_t, val_t = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, key_t, f"{path}.{k}"): _coerce(v, val_t, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        (item_t,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_t, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-6" (no dot) as a string; accept what float() accepts, nothing more.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected float, got str {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {tp}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys with a did-you-mean."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if full in MOVED:
            raise ConfigError(f"unknown key '{full}': it is '{MOVED[full]}' (it applies to SFT and distillation too)")
        key = _field_name(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), list(_yaml_keys(dict.fromkeys(names))), n=1, cutoff=0.5)
            hint = f"; did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{full}'{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def find_card(name: str) -> Path:
    """Resolve a model card name (models/<name>.yaml) or path."""
    for candidate in (Path(name), MODELS_DIR / name, MODELS_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known cards: {known}"
    raise ConfigError(f"model.card: no model card '{name}' in {MODELS_DIR}{hint}")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}".replace("\n", " ")) from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ['rl.steps=5', 'model.card=tiny_moe'] into a nested dict (values parsed as YAML scalars)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. rl.steps=5)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


merge, read_yaml = _merge, _read_yaml  # public: a pipeline config's files read and merge the same way


def resolve_dict(data: dict, overrides: list[str] | None = None) -> dict:
    """Apply overrides and expand `model.card` into the card's fields (job fields win)."""
    data = _merge(data, parse_overrides(overrides or []))
    model = data.get("model", {})
    if isinstance(model, str):
        model = {"card": model}
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping or a card name, got {model!r}")
    if model.get("card"):
        card = _read_yaml(find_card(model["card"]))
        card.pop("card", None)
        model = {**card, **model}
    data["model"] = model
    return data


def find_config(path: str | Path, kind: str = "config") -> Path:
    """A YAML path, or the name of one under configs/ (without .yaml); ConfigError when neither exists."""
    p = Path(path)
    if not p.is_file() and (CONFIGS_DIR / f"{path}.yaml").is_file():
        p = CONFIGS_DIR / f"{path}.yaml"
    if not p.is_file():
        raise ConfigError(f"{kind} file not found: {path}")
    return p


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Load a job config (YAML path or configs/<name>), apply overrides, check everything but world size."""
    data = _read_yaml(find_config(path)) if path else {}
    cfg = from_dict(JobConfig, resolve_dict(data, overrides))
    from r1_megatron.config.validate import validate

    validate(cfg)
    return cfg


def load_card(name: str, overrides: list[str] | None = None) -> ModelConfig:
    """Load just a model card (e.g. for conversion tools)."""
    return load_config(None, [f"model.card={name}", *(overrides or [])]).model


def _field_name(key: Any) -> Any:
    """A YAML key that is a Python keyword (rollout.async) lives in the field of that name plus '_'."""
    return f"{key}_" if isinstance(key, str) and keyword.iskeyword(key) else key


def _yaml_keys(data: Any) -> Any:
    """dataclasses.asdict output with keyword fields under their YAML key (async_ -> async)."""
    if not isinstance(data, dict):
        return data
    return {(k[:-1] if isinstance(k, str) and keyword.iskeyword(k[:-1]) else k): _yaml_keys(v)
            for k, v in data.items()}


def to_dict(cfg: Any) -> dict:
    return _yaml_keys(dataclasses.asdict(cfg))


# What a resumed run may change (keys, or sections ending in "."): how long it runs, how it reports,
# and how it is laid out on the machines (any layout resumes any other's checkpoint), not what it computes.
RESUMABLE = ("rl.steps", "rl.eval_every", "checkpoint.", "logging.", "parallel.", "offload.", "rollout.tp",
             "rollout.gpu_memory_utilization", "rollout.bucket_mb", "rollout.enforce_eager", "rollout.placement",
             "rollout.engines", "rollout.timeout_s")


def _resumable(key: str) -> bool:
    return key in RESUMABLE or key.startswith(tuple(k for k in RESUMABLE if k.endswith(".")))


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _as_saved(cfg: JobConfig) -> dict:
    """The config as config.resolved.yaml reads back (tuples become lists, as in the file)."""
    return yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def computed_keys(cfg: JobConfig) -> dict[str, Any]:
    """The config's flat `key: value`s less the RESUMABLE ones: what a resumed run may not change."""
    return {k: v for k, v in _flat(_as_saved(cfg)).items() if not _resumable(k)}


def config_changes(saved: str | Path, cfg: JobConfig) -> list[str]:
    """`key: old -> new` for every non-RESUMABLE key where `cfg` differs from the resolved config
    saved at `saved` (at most six, then a count)."""
    old, new = _flat(_read_yaml(Path(saved))), _flat(_as_saved(cfg))
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k) and not _resumable(k)]
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6]]
    return diffs + ([f"(and {len(changed) - 6} more)"] if len(changed) > 6 else [])


def save_resolved(cfg: JobConfig, run_dir: str | Path) -> Path:
    """Write the resolved config next to the run's outputs, so a run can be reproduced exactly.

    When the run dir already holds a checkpoint the job would resume from (a `latest` pointer in one
    of its subdirectories or in checkpoint.dir), its saved config must agree with `cfg` on every key
    but RESUMABLE ones; otherwise ConfigError names each key with both values and nothing is
    written, so a rerun with other settings (another seed, say) never silently continues the old run."""
    out = Path(run_dir)
    target = out / "config.resolved.yaml"
    pointers = [*out.glob("*/latest"), *([Path(cfg.checkpoint.dir) / "latest"] if cfg.checkpoint.dir else [])]
    if cfg.checkpoint.resume and target.is_file() and any(p.is_file() for p in pointers):
        changed = config_changes(target, cfg)
        if changed:
            raise ConfigError(
                f"{out} holds a run made with another config, which this one would resume: "
                f"{'; '.join(changed)}; use another run dir, remove {out}, or set checkpoint.resume=false")
    out.mkdir(parents=True, exist_ok=True)
    # Every rank of a torchrun job writes the same file: each through its own temp file and a rename,
    # so that a rank reading it back never sees another's half-written copy.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(target)
    return target


def config_from_resolved(path: str | Path) -> JobConfig:
    """Read back a config written by save_resolved (or stored in a checkpoint)."""
    return from_dict(JobConfig, _read_yaml(Path(path)))
