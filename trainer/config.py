"""The trainer's root configuration and how it is resolved.

Each module owns its settings (ModelConfig in model.py, DataConfig in data.py, ...); this root
composes them. Resolution order, later wins:

    dataclass defaults < --config FILE.toml < environment (.env included) < command-line flags

Every field `x` of section `s` can be set as `[s] x = ...` in TOML, as `TRAINER_S__X` in the
environment and as `--s.x` on the command line. Names that are unique across sections also get
the short forms `TRAINER_X` and `--x` (so `--shards`, `--batch-size`, `--lr`). Two plain
variables are read too: RUNS_DIR (where runs go when --output-dir is not given) and SHARDS_DIR
(the default for --shards). model.name_or_path has one more name (ALIASES): `--model`, and
TRAINER_MODEL. The resolved configuration is written into the run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shard_builder.config import load_dotenv_file
from trainer.data.loader import DataConfig
from trainer.evaluate import EvalConfig
from trainer.model import ModelConfig
from trainer.runtime.checkpoint import CheckpointConfig
from trainer.runtime.fit import FitConfig
from trainer.runtime.optim import OptimConfig
from trainer.watch.metrics import LogConfig
from trainer.watch.sysmetrics import SystemConfig

ENV_PREFIX = "TRAINER_"
SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
    "log": LogConfig,
    "fit": FitConfig,
    "system": SystemConfig,
}

# Extra names of a field, for the command line and the environment. `--model` is what
# shard_builder, trainer.evaluate and trainer.export call the same thing. TOML has no aliases:
# there `model` is the [model] table.
ALIASES = {"model": "model.name_or_path"}


def _help(text: str, **kwargs: Any):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    output_dir: str = _help(
        "run folder (checkpoints, best model, logs); re-running with the same folder resumes. "
        "Default: $RUNS_DIR/<run_name>",
        default="",
    )
    run_name: str = _help("name of the run (the folder name under $RUNS_DIR)", default="whisper-de")
    seed: int = _help(
        "seed of dropout and other training randomness (per rank: seed + rank)", default=0
    )
    device: str = _help("auto (cuda when available), cuda or cpu", default="auto")
    config: str = _help("TOML file the settings were read from (informational)", default="")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    system: SystemConfig = field(default_factory=SystemConfig)

    def validate(self) -> None:
        if not self.output_dir:
            raise ValueError("no run folder: pass --output-dir or set RUNS_DIR")
        if not self.data.shards:
            raise ValueError("no shards: pass --shards or set SHARDS_DIR")
        self.data.validate()
        self.optim.validate()
        self.checkpoint.validate()
        self.fit.validate(self.data.batch_size, self.data.bucket_buffer)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- typed parsing of strings (environment and flags) -----------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(text: str, kind: Any, name: str) -> Any:
    """Parse `text` as `kind` (int, float, bool, str, X | None, list[str])."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if type(None) in typing.get_args(kind) and text.strip().lower() in ("none", "null", ""):
            return None
        for option in args[:-1]:  # int | str: a number if it is one (`--batch-size auto`)
            try:
                return _convert(text, option, name)
            except ValueError:
                pass
        return _convert(text, args[-1], name)
    if origin is list:
        (item,) = typing.get_args(kind)
        return [_convert(part.strip(), item, name) for part in text.split(",") if part.strip()]
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name}: expected {kind.__name__}, got {text!r}") from None


def _check_value(value: Any, kind: Any, name: str) -> Any:
    """TOML values are already typed; accept ints for floats, refuse other mismatches."""
    if isinstance(value, str) and kind is not str and typing.get_origin(kind) is None:
        return _convert(value, kind, name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _settable() -> dict[str, tuple[str | None, str, Any]]:
    """Every settable name -> (section or None, field, type): dotted names and unique short ones."""
    names: dict[str, tuple[str | None, str, Any]] = {}
    root_types = _field_types(TrainConfig)
    for spec in fields(TrainConfig):
        if spec.name not in SECTIONS:
            names[spec.name] = (None, spec.name, root_types[spec.name])
    counts: dict[str, int] = {}
    for cls in SECTIONS.values():
        for spec in fields(cls):
            counts[spec.name] = counts.get(spec.name, 0) + 1
    for section, cls in SECTIONS.items():
        hints = _field_types(cls)
        for spec in fields(cls):
            names[f"{section}.{spec.name}"] = (section, spec.name, hints[spec.name])
            if counts[spec.name] == 1 and spec.name not in names:
                names[spec.name] = (section, spec.name, hints[spec.name])
    return names


def _set(config: TrainConfig, section: str | None, name: str, value: Any) -> None:
    setattr(config if section is None else getattr(config, section), name, value)


# --- the four layers --------------------------------------------------------------------------


def apply_toml(config: TrainConfig, path: str | Path) -> None:
    with open(path, "rb") as handle:
        table = tomllib.load(handle)
    settable = _settable()
    unknown = []
    for key, value in table.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                aliased = ALIASES.get(key, "").partition(".")[2]
                hint = f"; write {key}.{aliased} as [{key}] {aliased} = ..." if aliased else ""
                raise ValueError(f"{path}: [{key}] must be a table{hint}")
            for name, item in value.items():
                dotted = f"{key}.{name}"
                if dotted not in settable:
                    unknown.append(dotted)
                    continue
                section, field_name, kind = settable[dotted]
                _set(config, section, field_name, _check_value(item, kind, dotted))
        elif key in settable and settable[key][0] is None:
            _set(config, None, key, _check_value(value, settable[key][2], key))
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{path}: unknown settings {', '.join(sorted(unknown))}")


def _variable(name: str) -> str:
    return ENV_PREFIX + name.replace(".", "__").upper()


def apply_environment(config: TrainConfig, environ: dict[str, str]) -> None:
    if environ.get("SHARDS_DIR"):
        config.data.shards = environ["SHARDS_DIR"]
    settable = _settable()
    for name, (section, field_name, kind) in settable.items():
        variable = _variable(name)
        if variable in environ:
            _set(config, section, field_name, _convert(environ[variable], kind, variable))
    for alias, name in ALIASES.items():
        variable = _variable(alias)
        if variable in environ:
            same = [_variable(other) for other, spec in settable.items() if spec == settable[name]]
            _check_alias_agrees(variable, same, environ)
            section, field_name, kind = settable[name]
            _set(config, section, field_name, _convert(environ[variable], kind, variable))


def _check_alias_agrees(variable: str, others: list[str], environ: dict[str, str]) -> None:
    """An alias and a field's own variable that disagree: neither precedence would be obvious."""
    for other in others:
        if other in environ and environ[other] != environ[variable]:
            raise ValueError(
                f"{variable}={environ[variable]!r} and {other}={environ[other]!r} set the same "
                "setting to different values: keep one of them"
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Fine-tune Whisper on WebDataset shards (single process, or under torchrun).",
        argument_default=argparse.SUPPRESS,  # only flags actually given override lower layers
    )
    parser.add_argument("--config", help="TOML file with settings (see config/*.toml)")
    defaults = TrainConfig()
    settable = _settable()
    short_of = {value: name for name, value in settable.items() if "." not in name}
    for name, (section, field_name, kind) in settable.items():
        if name == "config" or ("." not in name and section is not None):
            continue  # short aliases are added together with their dotted name
        owner = defaults if section is None else getattr(defaults, section)
        cls = TrainConfig if section is None else SECTIONS[section]
        spec = next(s for s in fields(cls) if s.name == field_name)
        flags = ["--" + name.replace("_", "-")]
        short = short_of.get((section, field_name, kind))
        if section is not None and short is not None:
            flags.insert(0, "--" + short.replace("_", "-"))
        flags[:0] = ["--" + alias.replace("_", "-") for alias, to in ALIASES.items() if to == name]
        parser.add_argument(
            *flags,
            dest=name,
            metavar=field_name.upper(),
            help=f"{spec.metadata.get('help', '')} (default: {getattr(owner, field_name)!r})",
        )
    return parser


def read_environment(environ: dict[str, str] | None) -> dict[str, str]:
    """`environ`, or the process environment with .env filling in what it does not set."""
    if environ is not None:
        return environ
    load_dotenv_file()
    return dict(os.environ)


def resolve_layers(args: dict[str, Any], environ: dict[str, str]) -> TrainConfig:
    """Defaults < TOML (`args["config"]` or TRAINER_CONFIG) < environment < parsed flags, not
    yet validated (`trainer.plan` needs neither shards nor a run folder)."""
    config = TrainConfig()
    config_file = args.pop("config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_file:
        apply_toml(config, config_file)
        config.config = str(config_file)
    apply_environment(config, environ)
    settable = _settable()
    for name, text in args.items():
        section, field_name, kind = settable[name]
        _set(config, section, field_name, _convert(text, kind, "--" + name))
    return config


def load_config(
    argv: list[str] | None = None, environ: dict[str, str] | None = None
) -> TrainConfig:
    """Resolve defaults < TOML < environment/.env < flags into one validated TrainConfig."""
    environ = read_environment(environ)
    config = resolve_layers(vars(build_parser().parse_args(argv)), environ)
    if not config.output_dir:
        config.output_dir = str(Path(environ.get("RUNS_DIR") or "runs") / config.run_name)
    config.validate()
    return config


def write_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=False) + "\n")


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from its to_dict() form (a run folder's config.json)."""
    config = TrainConfig()
    for key, value in values.items():
        if key in SECTIONS:
            section = getattr(config, key)
            for name, item in value.items():
                setattr(section, name, item)
        else:
            setattr(config, key, value)
    return config
