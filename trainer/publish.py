"""Publish a trained model on the Hugging Face hub, each folder with its model card.

    python -m trainer.publish --model runs/turbo-de/best \
        --ct2 models/whisper-large-v3-turbo-german-ct2 --repo-id USER/whisper-large-v3-turbo-german

The Hugging Face folder (RUN/best, or a checkpoint RUN/checkpoints/step-N without its optimiser
and RNG files) goes to --repo-id; the CTranslate2 folder (trainer.export) to a second repo,
--ct2-repo-id, by default the same name with `-ct2`. A second repo and not a branch: both
folders hold a `config.json` that means different things (transformers' and CTranslate2's), so
they cannot share one tree, and a branch is out of reach of RealtimeSTT, which passes only a
model name to faster-whisper (`WhisperModel(model_size_or_path=...)`, no revision; 1.1.2).
faster-whisper's own loader fetches only the files it needs from such a repo.

Each folder gets its README.md first (trainer.model_card: metadata with the WER table, training
configuration and time, usage). --dry-run writes the cards and lists what would be uploaded,
without any network access. The token is huggingface_hub's own (HF_TOKEN, `.env`, or a saved
login); HF_ENDPOINT points it at another hub.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shard_builder.config import load_dotenv_file
from trainer.model_card import DEFAULT_LICENSE, CardError, gather_inputs, make_card, write_card

# What a checkpoint holds beside the Hugging Face files: needed to resume, not to use the model.
TRAINING_ONLY = ("optimizer.pt", "training.pt", "rng.pt", "state.json", "run_config.json")
HF_REQUIRED = ("config.json", "model.safetensors")
CT2_REQUIRED = ("config.json", "model.bin", "tokenizer.json", "preprocessor_config.json")


class PublishError(RuntimeError):
    """The folders cannot be published as asked."""


def _help(text: str, **kwargs: Any):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class PublishConfig:
    model: str = _help(
        "Hugging Face Whisper folder to publish, RUN/best or RUN/checkpoints/step-N; its run "
        "folder supplies the card's training facts",
        default="",
    )
    repo_id: str = _help("hub repo for the Hugging Face folder, USER/NAME", default="")
    ct2: str = _help("CTranslate2 folder from trainer.export to publish as well", default="")
    ct2_repo_id: str = _help(
        "hub repo for the CTranslate2 folder (default: REPO_ID-ct2)", default=""
    )
    eval_report: str = _help(
        "evaluation report JSON from `trainer.evaluate --output` for the card's WER table "
        "(default: RUN/eval/step-B.json, the training-time evaluation of the best step B)",
        default="",
    )
    license: str = _help(
        "licence of the published weights (a hub licence id); check the base model's and the "
        "dataset's terms",
        default=DEFAULT_LICENSE,
    )
    base_model: str = _help(
        "hub id of the model the run started from (default: the run's model when it is a hub id)",
        default="",
    )
    dataset: list[str] = _help(
        "hub dataset id(s) trained on (default: the shards' source when it came from the hub)",
        default_factory=list,
    )
    private: bool = _help("create the repos as private", default=False)
    skip_hf: bool = _help(
        "upload only the CTranslate2 folder (the card still links both)", default=False
    )
    commit_message: str = _help("commit message on the hub", default="Upload model")
    dry_run: bool = _help(
        "write the cards and list the files that would be uploaded; no network", default=False
    )

    def validate(self) -> None:
        if not self.model or not self.repo_id:
            raise PublishError("--model and --repo-id are required")
        for repo in (self.repo_id, self.ct2_repo_id):
            if repo and repo.count("/") != 1:
                raise PublishError(f"{repo!r} is not a hub repo id of the form USER/NAME")
        if self.skip_hf and not self.ct2:
            raise PublishError("--skip-hf leaves nothing to upload without --ct2")
        if self.ct2 and not self.ct2_repo_id:
            self.ct2_repo_id = f"{self.repo_id}-ct2"
        if self.ct2_repo_id == self.repo_id:
            raise PublishError(
                "--ct2-repo-id must differ from --repo-id: both folders hold a config.json"
            )


# --- folders --------------------------------------------------------------------------------


def upload_files(folder: Path, ignored: tuple[str, ...] = ()) -> list[str]:
    """Paths relative to `folder` of what is uploaded: every file but hidden and `ignored` ones."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        hidden = any(part.startswith(".") for part in relative.parts)
        if path.is_file() and relative.name not in ignored and not hidden:
            files.append(relative.as_posix())
    return files


def check_folder(folder: Path, required: tuple[str, ...], what: str) -> None:
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder")
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise PublishError(f"{folder} is no {what} folder: it has no {', '.join(missing)}")


@dataclass
class Target:
    folder: Path
    repo_id: str
    files: list[str]
    card: Path


def prepare(config: PublishConfig) -> list[Target]:
    """Write each folder's card; returns what to upload where."""
    model = Path(config.model)
    check_folder(model, HF_REQUIRED, "Hugging Face model")
    ct2 = Path(config.ct2) if config.ct2 else None
    if ct2 is not None:
        check_folder(ct2, CT2_REQUIRED, "CTranslate2 (trainer.export)")
    common = dict(
        license=config.license,
        eval_report=config.eval_report or None,
        base_model=config.base_model or None,
        datasets=config.dataset or None,
        hf_repo_id=config.repo_id,
        ct2_repo_id=config.ct2_repo_id or None,
        ct2_folder=ct2,
    )
    targets = []
    if not config.skip_hf:
        card = make_card(gather_inputs(config.repo_id, "transformers", model, **common))
        targets.append(Target(model, config.repo_id, [], write_card(model, card)))
    if ct2 is not None:
        card = make_card(gather_inputs(config.ct2_repo_id, "ctranslate2", model, **common))
        targets.append(Target(ct2, config.ct2_repo_id, [], write_card(ct2, card)))
    for target in targets:
        target.files = upload_files(target.folder, TRAINING_ONLY)
    return targets


def upload(target: Target, config: PublishConfig) -> str:
    """One commit with every file of the target; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(target.repo_id, private=config.private, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(target.folder / name))
        for name in target.files
    ]
    info = api.create_commit(
        target.repo_id, operations=operations, commit_message=config.commit_message
    )
    return info.commit_url


def publish(config: PublishConfig) -> list[Target]:
    config.validate()
    targets = prepare(config)
    for target in targets:
        size = sum((target.folder / name).stat().st_size for name in target.files)
        print(
            f"{target.repo_id}: {len(target.files)} files, {size / 1e6:.1f} MB from {target.folder}"
        )
        for name in target.files:
            print(f"  {name}")
        print(f"  card: {target.card}")
        if not config.dry_run:
            print(f"  uploaded: {upload(target, config)}")
    if config.dry_run:
        print("dry run: cards written, nothing uploaded")
    return targets


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> PublishConfig:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.publish",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for spec in fields(PublishConfig):
        flag = "--" + spec.name.replace("_", "-")
        if spec.type == "bool":
            parser.add_argument(flag, action="store_true", help=spec.metadata["help"])
        elif spec.name == "dataset":
            parser.add_argument(flag, action="append", default=[], help=spec.metadata["help"])
        else:
            parser.add_argument(
                flag,
                default=spec.default,
                required=spec.name in ("model", "repo_id"),
                help=spec.metadata["help"],
            )
    return PublishConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    load_dotenv_file()  # HF_TOKEN, HF_ENDPOINT, HF_HOME, as the other entry points read them
    config = parse_args(argv)
    try:
        publish(config)
    except (PublishError, CardError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
