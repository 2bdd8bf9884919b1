"""Load a Pipeline from a Python pipeline file or YAML, with dotted `--set key=value` overrides.

Overrides address stages by name: `sft.group.zero_stage=3`, `sft.train.global_batch_size=16`;
top-level fields directly: `run_dir=/tmp/x`, `ray.num_cpus=8`. Values are parsed as YAML scalars,
so `3`, `true`, `1e-4` and `[q_proj, v_proj]` get their natural types.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rayllm.config import DataPrepConfig, Pipeline


class ConfigError(ValueError):
    """A pipeline file or override that does not validate; the message names each bad field."""


def _format(err: ValidationError, stage_names: list[str]) -> str:
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        if len(loc) >= 3 and loc[0] == "stages" and isinstance(loc[1], int):
            # pydantic reports stages.<i>.<kind>.field; show the stage by its name instead.
            name = stage_names[loc[1]] if loc[1] < len(stage_names) else loc[1]
            loc = [name] + loc[3:]
        lines.append(f"  {'.'.join(map(str, loc)) or '<root>'}: {e['msg']}")
    return "invalid pipeline config:\n" + "\n".join(lines)


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = tree
    stages = {s.get("name", s.get("kind")): s for s in tree.get("stages", [])}
    if keys[0] in stages and keys[0] not in tree:
        node, keys = stages[keys[0]], keys[1:]
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[int(k)]
            continue
        if not isinstance(node.get(k, {}), (dict, list)):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is not a section")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"override {p!r} is not key=value")
        k, v = p.split("=", 1)
        out[k.strip()] = _scalar(v)
    return out


def _scalar(text: str) -> Any:
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def _raw_from_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"pipeline file {str(path)!r} does not exist")
    if path.suffix in (".yaml", ".yml"):
        return _read_yaml(path)
    if path.suffix == ".py":
        spec = importlib.util.spec_from_file_location(f"rayllm_pipeline_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        pipe = getattr(module, "PIPELINE", None)
        if not isinstance(pipe, Pipeline):
            raise ConfigError(f"{path}: defines no PIPELINE = rayllm.Pipeline(...)")
        return pipe.model_dump(mode="json")
    raise ConfigError(f"{path}: pipeline files are .py or .yaml")


def validate(raw: dict, overrides: dict[str, Any] | None = None) -> Pipeline:
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy with plain types
    for k, v in (overrides or {}).items():
        _set(raw, k, v)
    names = [s.get("name", s.get("kind", "?")) if isinstance(s, dict) else "?" for s in raw.get("stages", [])]
    try:
        return Pipeline.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e, names)) from None


def load_pipeline(source: str | Path | Pipeline, overrides: list[str] | dict | None = None) -> Pipeline:
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    raw = source.model_dump(mode="json") if isinstance(source, Pipeline) else _raw_from_file(Path(source))
    return validate(raw, overrides)


def load_data_config(path: str | Path, overrides: list[str] | None = None) -> DataPrepConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data config {str(path)!r} does not exist")
    raw = _read_yaml(path)
    for k, v in parse_overrides(overrides or []).items():
        _set(raw, k, v)
    try:
        return DataPrepConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e, [])) from None
