"""The Whisper model: loading for training, the decoder inputs built from stored targets, the loss.

Why the model is loaded in float32: transformers 5 loads a checkpoint in the dtype its
config.json names, and the hub's Whisper checkpoints say float16. A float16 model would train
without float32 master weights; autocast gives the float16 speed instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("trainer")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _help(text: str, **kwargs: Any):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ModelConfig:
    name_or_path: str = _help(
        "Whisper checkpoint to fine-tune: hub id or folder. A folder without weights (such as "
        "the tiny preset) is initialised from its config.json with init_seed",
        default="openai/whisper-large-v3-turbo",
    )
    language: str = _help("transcript language, fixed in the generation config", default="de")
    task: str = _help("Whisper task, fixed in the generation config", default="transcribe")
    freeze_encoder: bool = _help(
        "train the decoder only (saves the encoder's gradients and optimiser state)",
        default=False,
    )
    gradient_checkpointing: bool = _help(
        "recompute activations in the backward pass (less memory, ~1/3 more compute)",
        default=True,
    )
    attn_implementation: str = _help("attention kernel: sdpa or eager", default="sdpa")
    dropout: float | None = _help(
        "override the checkpoint's dropout (None keeps it; the hub's Whisper models use 0.0)",
        default=None,
    )
    init_seed: int = _help("seed for initialising a model that has no weights", default=0)


def has_weights(name_or_path: str) -> bool:
    """True for hub ids (from_pretrained will fetch them) and for folders holding weights."""
    path = Path(name_or_path)
    if not path.is_dir():
        return True
    return any((path / name).exists() for name in WEIGHT_FILES)


def load_model(config: ModelConfig, for_training: bool = True):
    """WhisperForConditionalGeneration in float32 with SDPA; returns (model, processor)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(config.name_or_path)
    # Whisper's layers copy the dropout rate from the config when built: override it there.
    overrides = {} if config.dropout is None else {"dropout": config.dropout}
    if has_weights(config.name_or_path):
        model = WhisperForConditionalGeneration.from_pretrained(
            config.name_or_path,
            dtype=torch.float32,
            attn_implementation=config.attn_implementation,
            **overrides,
        )
    else:
        log.warning(
            "%s holds no weights: initialising a random model from its config.json (seed %d)",
            config.name_or_path,
            config.init_seed,
        )
        model_config = WhisperConfig.from_pretrained(config.name_or_path, **overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            model = WhisperForConditionalGeneration._from_config(
                model_config,
                dtype=torch.float32,
                attn_implementation=config.attn_implementation,
            )
    configure_generation(model, processor.tokenizer, config.language, config.task)
    if for_training:
        model.config.use_cache = False  # the KV cache is useless with teacher forcing
        if config.freeze_encoder:
            model.model.encoder.requires_grad_(False)
        if config.gradient_checkpointing:
            kwargs = {"use_reentrant": False}  # the reentrant variant breaks with DDP no_sync
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model, processor


def window_frames(model_config) -> int:
    """Log-mel frames the encoder of a WhisperConfig takes: 3000 (30 s) for released Whispers."""
    return 2 * int(model_config.max_source_positions)


def configure_generation(model, tokenizer, language: str, task: str) -> None:
    """Fix language and task (a forced prefix); timestamps off by default but predictable.

    A model initialised from a bare config has a default generation config without the
    language table Whisper's generate() needs, so every id is taken from the tokenizer.
    `return_timestamps` stays False (the per-utterance evaluation decodes without them), while
    what `generate(..., return_timestamps=True)` needs is set as in openai/whisper-*'s
    generation_config.json: `no_timestamps_token_id` (timestamps follow it),
    `max_initial_timestamp_index` 50 (the first timestamp at most 1.00 s),
    `prev_sot_token_id` (prompts), and `begin_suppress_tokens` (no blank or end token first)
    where the model has none. CTranslate2's converter copies the suppress lists into the export;
    faster-whisper takes the timestamp ids from the tokenizer and its own arguments.
    """
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    vocab = tokenizer.get_vocab()
    generation = model.generation_config
    lang_to_id = {
        f"<|{code}|>": vocab[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in vocab
    }
    if f"<|{language}|>" not in lang_to_id:
        raise ValueError(f"the tokenizer has no language token <|{language}|>")
    generation.lang_to_id = lang_to_id
    generation.task_to_id = {name: vocab[f"<|{name}|>"] for name in ("transcribe", "translate")}
    generation.is_multilingual = True
    generation.no_timestamps_token_id = vocab["<|notimestamps|>"]
    generation.decoder_start_token_id = vocab["<|startoftranscript|>"]
    generation.eos_token_id = vocab["<|endoftext|>"]
    generation.pad_token_id = model.config.pad_token_id
    generation.language = language
    generation.task = task
    generation.return_timestamps = False
    generation.max_initial_timestamp_index = 50
    generation.prev_sot_token_id = vocab["<|startofprev|>"]
    if not getattr(generation, "begin_suppress_tokens", None):
        generation.begin_suppress_tokens = [vocab["Ġ"], vocab["<|endoftext|>"]]
    generation.forced_decoder_ids = None
    generation.max_length = model.config.max_target_positions
    # A config derived from config.json (a model initialised without weights) is saved with
    # `_from_model_config: true`, and transformers then ignores every Whisper field above when
    # RUN/best is loaded again (measured with transformers 5.23): mark it as a config of its own.
    generation._from_model_config = False


def prefix_tokens(tokenizer, language: str, task: str) -> list[int]:
    """<|startoftranscript|><|lang|><|task|><|notimestamps|>, every id from the tokenizer."""
    names = ["<|startoftranscript|>", f"<|{language}|>", f"<|{task}|>", "<|notimestamps|>"]
    return [int(tokenizer.convert_tokens_to_ids(name)) for name in names]


def decoder_inputs_and_labels(
    tokens: torch.Tensor, pad_token_id: int, unlabelled: torch.Tensor | None = None
):
    """Teacher forcing from the full stored sequence (prefix and <|endoftext|> included).

    The input is the sequence without its last token, the label the sequence without its first,
    so <|startoftranscript|> is never doubled and the prefix itself is predicted only from its
    own left context. Label padding stays -100; input padding becomes the pad id (the decoder is
    causal and pads sit at the end, so no real position ever attends to them). `unlabelled`
    [B] masks each row's first labels too: a packed window's prompt is context, not a target.
    """
    inputs = tokens[:, :-1]
    inputs = inputs.masked_fill(inputs == -100, pad_token_id)
    labels = tokens[:, 1:]
    if unlabelled is not None:
        positions = torch.arange(labels.shape[1], device=labels.device)
        is_prompt = positions[None, :] < unlabelled.to(labels.device)[:, None]
        labels = labels.masked_fill(is_prompt, -100)
    return inputs, labels


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy in float32 over non-padding labels, and how many there were."""
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, (labels != -100).sum()
