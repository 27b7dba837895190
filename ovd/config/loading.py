"""Reading configs: YAML files with `_BASE_` inheritance, command-line overrides, strict key and type checks."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Sequence, get_args

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ovd.config.schema import Config
from ovd.utils.io import write_text

BASE_KEY = "_BASE_"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _schema_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k in node.keys():
        full = f"{prefix}{k}"
        child = node._get_node(k)
        if isinstance(child, DictConfig):
            keys.extend(_schema_keys(child, full + "."))
        keys.append(full)
    return keys


def _check_keys(data: dict, schema: DictConfig, source: str, prefix: str = "") -> None:
    """Reject keys the schema lacks, suggesting the closest valid key."""
    for k, v in data.items():
        full = f"{prefix}{k}"
        if not isinstance(k, str) or k not in schema:
            valid = _schema_keys(OmegaConf.structured(Config))
            # keys are upper case; `solver.base_lr` should still find SOLVER
            close = difflib.get_close_matches(full.upper(), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {full} in {source}{hint}")
        child = schema._get_node(k)
        if isinstance(child, DictConfig):
            if not isinstance(v, dict):
                raise ConfigError(f"config key {full} in {source} must be a mapping of sub-keys, got {v!r}")
            _check_keys(v, child, source, full + ".")


def _expected_type(schema: DictConfig, key: str) -> str:
    node = schema
    for part in key.partition("[")[0].split("."):
        node = node._get_node(part)
    ref = getattr(node, "_metadata", None)
    t = getattr(ref, "ref_type", None) or getattr(ref, "element_type", None)
    # OmegaConf names a bad list element `SOLVER.STEPS[0]`: that wants the element type, int of List[int]
    for _ in range(key.count("[")):
        t = (get_args(t) or (t,))[0]
    if getattr(t, "__origin__", None) is not None:  # List[int] rather than List
        return str(t).replace("typing.", "")
    return getattr(t, "__name__", None) or str(t)


def _merge(cfg: DictConfig, data: dict, source: str) -> DictConfig:
    _check_keys(data, cfg, source)
    try:
        return OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        raise ConfigError(
            f"config key {key} in {source}: expected {_expected_type(cfg, key)}, got {e.__class__.__name__}: "
            f"{str(e).splitlines()[0]}"
        ) from None


def _read_yaml(path: Path, stack: tuple[Path, ...]) -> list[tuple[dict, str]]:
    """The chain of (data, source) from the deepest `_BASE_` to ``path``."""
    if path in stack:
        raise ConfigError(f"_BASE_ cycle: {' -> '.join(map(str, stack + (path,)))}")
    if not path.is_file():
        where = f" (the _BASE_ of {stack[-1]})" if stack else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    chain: list[tuple[dict, str]] = []
    base = data.pop(BASE_KEY, None)
    if base is not None:
        bases = [base] if isinstance(base, str) else base
        if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
            raise ConfigError(f"{BASE_KEY} in {path} must be a file name or a list of them, got {base!r}")
        for b in bases:
            chain.extend(_read_yaml((path.parent / os.path.expanduser(b)).resolve(), stack + (path,)))
    _resolve_dataset_paths(data, path)
    chain.append((data, str(path)))
    return chain


DATASET_PATH_KEYS = ("JSON", "IMAGES", "CAPTIONS")


def _resolve_dataset_paths(data: dict, path: Path) -> None:
    """Make DATASETS.CUSTOM's relative paths relative to the folder of the file that declares them, so a config
    and its data can move together."""
    entries = (data.get("DATASETS") or {}).get("CUSTOM") if isinstance(data.get("DATASETS"), dict) else None
    if not isinstance(entries, list):
        return
    for entry in entries:
        if not isinstance(entry, dict):
            raise ConfigError(f"DATASETS.CUSTOM in {path}: each entry must be a mapping like {{NAME: my_train, JSON: "
                              f"train.json, IMAGES: images}}, got {entry!r}")
        for key in DATASET_PATH_KEYS:
            value = entry.get(key)
            if isinstance(value, str) and value and "${" not in value:
                entry[key] = str(path.parent / os.path.expanduser(value))


def parse_overrides(args: Sequence[str]) -> list[tuple[str, Any]]:
    """Parse `KEY=VALUE` and detectron2-style `KEY VALUE` pairs; values are YAML scalars or lists."""
    pairs, i = [], 0
    args = list(args)
    while i < len(args):
        tok = args[i]
        if "=" in tok:
            key, raw = tok.split("=", 1)
            i += 1
        elif i + 1 < len(args):
            key, raw = tok, args[i + 1]
            i += 2
        else:
            raise ConfigError(f"override {tok!r} has no value (use KEY=VALUE or KEY VALUE)")
        if not key or not all(key.split(".")):
            raise ConfigError(f"override {tok!r}: {key!r} is not a config key (KEY=VALUE or KEY VALUE, KEY like "
                              "SOLVER.BASE_LR)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key, value))
    return pairs


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> Config:
    """Schema defaults, then the `_BASE_` chain of ``path``, then ``overrides`` (`KEY=VALUE` or `KEY VALUE`)."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        for data, source in _read_yaml(Path(path).resolve(), ()):
            cfg = _merge(cfg, data, source)
    for key, value in parse_overrides(list(overrides)):
        cfg = _merge(cfg, _nest(key, value), f"command-line override {key}")
    return OmegaConf.to_object(cfg)


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config; loading it back gives the same config."""
    write_text(path, config_to_yaml(cfg))
