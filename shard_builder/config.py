"""The builder's settings: defaults for the real dataset, overridable from `.env` and flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


def _default_workers() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class BuilderConfig:
    out: str = _help("output folder; one subfolder per split (default: $SHARDS_DIR)", default="")
    dataset: str = _help(
        "hub dataset id, a local folder of parquet files laid out like the hub repo "
        "(data/train-*.parquet), or a folder written by datasets' save_to_disk",
        default="flozi00/asr-german-mixed",
    )
    revision: str | None = _help("hub revision (branch, tag or commit) to read", default=None)
    splits: list[str] = _help("splits to build", default_factory=lambda: ["train", "test"])
    model: str = _help(
        "Whisper model (hub id or folder) whose mel bin count, tokenizer and prefix tokens "
        "the shards are made for",
        default="openai/whisper-large-v3-turbo",
    )
    language: str = _help("transcript language (the <|xx|> prefix token)", default="de")
    task: str = _help("Whisper task token: transcribe or translate", default="transcribe")
    audio_column: str = _help("column holding the audio {bytes, path}", default="audio")
    text_column: str = _help("column holding the transcript", default="transkription")
    source_column: str = _help("column naming each row's origin (optional)", default="source")
    workers: int = _help(
        "worker processes (1 = build in this process)", default_factory=_default_workers
    )
    shard_size: int = _help(
        "input rows per shard. Boundaries by row index keep every shard a pure function of its "
        "rows (resume, --part and any worker count give the same bytes); 1000 rows is ~130 MB "
        "for 5 s clips at 128 bins",
        default=1000,
    )
    part: str = _help(
        "I/N: build only shards whose index %% N == I (N machines, one output)", default="0/1"
    )
    limit: int | None = _help("use only the first N rows of each split (trials)", default=None)
    long_audio: str = _help(
        "a clip longer than the model's window: split (cut at pauses into pieces that fit, "
        "each with its own part of the transcript, found by --align-model; docs/shards.md) or "
        "reject (counted as too_long)",
        default="split",
    )
    align_model: str = _help(
        "Whisper model (hub id or folder) that finds where the transcript of a long clip is cut "
        "(empty: --model). Its window must hold the --model's",
        default="",
    )
    align_method: str = _help(
        "how a long clip's transcript is cut: likelihood (where --align-model best explains each "
        "piece's audio; checks that the transcript matches) or sentences (no model: at sentence "
        "ends, matched by speaking rate; trusts the transcript; for the demo's random-weight "
        "preset). docs/shards.md",
        default="likelihood",
    )
    align_max_error: float = _help(
        "sentences method: the chosen sentence end must lie within this many seconds of speech "
        "of where the speaking rate puts the cut, and the next nearest this much further",
        default=0.75,
    )
    min_pause: float = _help("shortest silence, in seconds, a long clip may be cut in", default=0.3)
    align_min_margin: float = _help(
        "a cut's chosen word boundary must beat every other by this many nats, or the clip is "
        "rejected as too_long_unaligned",
        default=3.0,
    )
    align_min_logprob: float = _help(
        "every piece's text must have at least this mean log-probability per token under the "
        "aligner, or the clip is rejected as too_long_unaligned",
        default=-2.5,
    )

    @property
    def aligner_name(self) -> str:
        return self.align_model or self.model

    @property
    def part_index(self) -> int:
        return int(self.part.split("/")[0])

    @property
    def part_count(self) -> int:
        return int(self.part.split("/")[1])

    def validate(self) -> None:
        if not self.out:
            raise ValueError("no output folder: pass --out or set SHARDS_DIR in .env")
        try:
            index, count = self.part_index, self.part_count
        except (ValueError, IndexError):
            raise ValueError(f"--part must look like I/N, got {self.part!r}") from None
        if not 0 <= index < count:
            raise ValueError(f"--part {self.part}: need 0 <= I < N")
        if self.shard_size < 1 or self.workers < 1:
            raise ValueError("--shard-size and --workers must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be at least 1")
        if self.long_audio not in ("split", "reject"):
            raise ValueError(f"--long-audio must be split or reject, got {self.long_audio!r}")
        if self.min_pause <= 0:
            raise ValueError("--min-pause must be positive")
        if self.align_method not in ("likelihood", "sentences"):
            raise ValueError(
                f"--align-method must be likelihood or sentences, got {self.align_method!r}"
            )
        if self.align_max_error <= 0:
            raise ValueError("--align-max-error must be positive")


def load_dotenv_file() -> None:
    """Let .env fill in the variables the environment does not set: the .env of the working
    directory (or a parent), else the repository's. Every entry point calls it first, since
    huggingface_hub reads HF_HOME once, when it is first imported. (python-dotenv without a path
    searches from the calling module's folder only, so a .env beside the user's runs would be
    missed.)"""
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True) or find_dotenv())


def parse_args(argv: list[str] | None = None) -> BuilderConfig:
    load_dotenv_file()
    parser = argparse.ArgumentParser(
        prog="python -m shard_builder",
        description="Build Whisper-ready WebDataset shards (trimmed float16 log-mel + tokens).",
    )
    defaults = BuilderConfig()
    defaults.out = os.environ.get("SHARDS_DIR", "")
    for spec in fields(BuilderConfig):
        flag = "--" + spec.name.replace("_", "-")
        default = getattr(defaults, spec.name)
        if spec.name == "splits":
            parser.add_argument(flag, nargs="+", default=default, help=spec.metadata["help"])
        else:
            kind = int if spec.name in ("workers", "shard_size", "limit") else str
            if spec.name in (
                "min_pause",
                "align_min_margin",
                "align_min_logprob",
                "align_max_error",
            ):
                kind = float
            parser.add_argument(
                flag,
                type=kind,
                default=default,
                help=spec.metadata["help"] + f" (default: {default})",
            )
    config = BuilderConfig(**vars(parser.parse_args(argv)))
    config.validate()
    return config
