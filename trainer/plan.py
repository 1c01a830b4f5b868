"""Will it fit, how long will it take: a training plan computed from the real model, on any machine.

    python -m trainer.plan --config config/turbo-2x16gb.toml --gpu rtx-4060-ti-16gb
    python -m trainer --config config/turbo-2x16gb.toml --dry-run      (the same)

The plan takes the trainer's own settings (defaults < TOML < environment < flags), builds the
configured Whisper from its config.json alone (the hub's turbo, large-v3 and base configs ship in
config/models/, so no download is needed) under `FakeTensorMode` (tensors with shapes and dtypes
but no data: turbo costs no RAM and runs in seconds), and runs the trainer's step on it: CPU
autocast in the configured precision, the same `decoder_inputs_and_labels` and `token_loss`,
gradient checkpointing as `load_model` enables it, two micro-batches of forward and backward.

What is measured, not assumed:
- weights, gradients and AdamW states from the parameters that exist and require gradients,
  with ZeroRedundancyOptimizer's own greedy partition for `zero1`;
- activations: every tensor the step allocates is tracked from allocation to release (a torch
  dispatch mode with a finaliser per storage), so the peak includes what autograd saves, the
  float16 copies autocast makes of the weights, the layer recomputed under checkpointing, the
  logits and their float32 copy for the loss, and the backward's temporaries. The second
  micro-batch is the one measured: gradients already exist then, as in every micro-batch after
  the first of a step. Saved-tensor hooks report what autograd keeps at the end of the forward;
- FLOPs with `torch.utils.flop_counter.FlopCounterMode` over the same forward and backward;
- evaluation: the encoder and a decoding step of `generate` at the last position under the same
  autocast, at eval_batch_size x beam_size rows, the KV caches (self- and cross-attention) built
  to full length by a prefill: the peak includes the float16 copies autocast caches of every
  weight for the whole `generate` call (the trainer's decoder wraps it in one autocast).

Every phase's peak per GPU is planned, and the verdict is on the largest, named in the output:
the steady training step; the first step after a resume (the rank's own ZeRO shard loaded into
the optimiser's state on the device, gradients bucket views from the first backward: nothing
beyond the steady step on the device, the loaded shard and the model's first copy in host
memory); the evaluation (model states kept, plus `generate`); the checkpoint write (each rank
writes its own optimiser shard, nothing is gathered on a GPU: model states only on the device;
in host memory, torch.save's one-storage-at-a-time copy and, on rank 0, safetensors' in-memory
serialisation of the weights).

What is assumed (and printed): the GPU table below, a utilisation, a CUDA context and allocator
margin, decoder lengths from a tokens-per-second rate of German speech, and a mean clip length
to turn packed windows into utterances. CPU autocast casts the same operations to half precision
as CUDA autocast for this model (linear, matmul, conv, attention; layer norm, softmax and the
loss stay float32), so the saved dtypes are those of the GPU run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from shard_builder import storage
from shard_builder.contract import ContractError
from trainer.config import TrainConfig, build_parser, read_environment, resolve_layers
from trainer.model import ModelConfig, decoder_inputs_and_labels, token_loss, window_frames
from trainer.runtime.fit import loader_data_config
from trainer.runtime.optim import autocast, resolve_precision

GIB = 2**30
MODELS_DIR = Path(__file__).resolve().parent.parent / "config" / "models"
ALLOCATOR_ROUND = 512  # the CUDA caching allocator hands out multiples of 512 bytes


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    tflops: float  # dense fp16/bf16 tensor throughput with fp32 accumulation (what torch uses)
    link_gbs: float  # GPU-to-GPU bandwidth, GB/s one way, for the gradient all-reduce
    source: str


# Dense (no sparsity) fp16/bf16 tensor-core throughput with fp32 accumulation: PyTorch's half
# GEMMs accumulate in fp32, and GeForce cards run that at half their fp16-accumulate rate.
# Ada and GA10x SMs do 1024 fp16 FLOP/clock with fp16 accumulation (512 FMA, the whitepapers'
# "dense" figure), 512 with fp32 accumulation on GeForce.
GPUS: dict[str, Gpu] = {
    "rtx-4060-ti-16gb": Gpu(
        "GeForce RTX 4060 Ti 16 GB",
        16.0,
        44.1,
        13.0,
        "34 SMs x 2535 MHz boost x 512 FLOP/clk (fp32 accumulate; 88.3 with fp16 accumulate), "
        "NVIDIA Ada whitepaper rates; PCIe 4.0 x8, no P2P",
    ),
    "rtx-3090": Gpu(
        "GeForce RTX 3090",
        24.0,
        71.0,
        25.0,
        "NVIDIA GA102 whitepaper appendix: 71 TFLOPS fp16 tensor with fp32 accumulate "
        "(142 with fp16 accumulate); PCIe 4.0 x16",
    ),
    "rtx-4090": Gpu(
        "GeForce RTX 4090",
        24.0,
        165.2,
        25.0,
        "NVIDIA Ada whitepaper: 165.2 TFLOPS fp16/bf16 tensor with fp32 accumulate "
        "(330.3 with fp16 accumulate); PCIe 4.0 x16, no P2P",
    ),
    "a100-40gb": Gpu(
        "A100 SXM4 40 GB",
        40.0,
        312.0,
        300.0,
        "NVIDIA A100 datasheet: 312 TFLOPS fp16/bf16 tensor, dense; NVLink 600 GB/s",
    ),
    "a100-80gb": Gpu(
        "A100 SXM4 80 GB",
        80.0,
        312.0,
        300.0,
        "NVIDIA A100 datasheet: 312 TFLOPS fp16/bf16 tensor, dense; NVLink 600 GB/s",
    ),
    "h100-80gb": Gpu(
        "H100 SXM5 80 GB",
        80.0,
        989.4,
        450.0,
        "NVIDIA H100 datasheet: 989 TFLOPS fp16/bf16 tensor, dense (1979 with sparsity); "
        "NVLink 900 GB/s",
    ),
}

# Hub ids whose config.json ships in config/models/<last part of the id>/.
OFFLINE_HUB_IDS = (
    "openai/whisper-large-v3-turbo",
    "openai/whisper-large-v3",
    "openai/whisper-base",
)


@dataclass
class PlanOptions:
    gpu: str = "rtx-4060-ti-16gb"
    world_size: int = 2
    utilization: float = 0.4
    train_samples: int = 970_000
    mean_clip_seconds: float = 4.5
    tokens_per_second: float = 4.0
    max_tokens: int = 0  # 0: derived (see target_tokens)
    context_gib: float = 1.0
    fragmentation: float = 0.05
    json: bool = False
    train_samples_source: str = "assumed (--train-samples; flozi00/asr-german-mixed has ~970k)"


# --- settings ---------------------------------------------------------------------------------


def build_plan_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    parser.prog = "python -m trainer.plan"
    parser.description = (
        "Training plan: memory per GPU, FLOPs, step time and hours per epoch, from the real "
        "model built with fake tensors. Takes every trainer setting, plus the options below."
    )
    d = PlanOptions()
    group = parser.add_argument_group("plan")
    group.add_argument("--gpu", default=d.gpu, choices=sorted(GPUS), help="GPU to plan for")
    group.add_argument(
        "--world-size", type=int, default=d.world_size, help="GPUs (ranks) of the run"
    )
    group.add_argument(
        "--utilization",
        type=float,
        default=d.utilization,
        help="share of the GPU's peak tensor throughput the step achieves on executed FLOPs "
        f"(default {d.utilization}: a stated guess until measured, see docs/benchmarks.md)",
    )
    group.add_argument(
        "--train-samples",
        type=int,
        default=None,
        help="utterances in the train split (default: the manifest's num_samples when --shards "
        f"holds built shards, else {d.train_samples})",
    )
    group.add_argument(
        "--mean-clip-seconds",
        type=float,
        default=d.mean_clip_seconds,
        help="mean utterance length, to count utterances per packed window",
    )
    group.add_argument(
        "--tokens-per-second",
        type=float,
        default=d.tokens_per_second,
        help="target tokens per second of German speech (Whisper's BPE), for decoder lengths",
    )
    group.add_argument(
        "--max-tokens",
        type=int,
        default=d.max_tokens,
        help="target tokens of a sample (prefix and end included) to plan memory and FLOPs at; "
        "0 derives it: the longest 30 s utterance unpacked, the decoder's 448 packed",
    )
    group.add_argument(
        "--context-gib",
        type=float,
        default=d.context_gib,
        help="GPU memory outside PyTorch's allocator: CUDA context and kernels, cuBLAS "
        "workspaces, NCCL buffers",
    )
    group.add_argument("--json", action="store_true", default=False, help="print the plan as JSON")
    return parser


def resolve(
    argv: list[str] | None = None, environ: dict[str, str] | None = None
) -> tuple[TrainConfig, PlanOptions]:
    """The trainer's settings (as load_config resolves them, without requiring shards or a run
    folder) and the plan's own options."""
    environ = read_environment(environ)
    args = vars(build_plan_parser().parse_args(argv))
    options = PlanOptions(
        gpu=args.pop("gpu"),
        world_size=args.pop("world_size"),
        utilization=args.pop("utilization"),
        mean_clip_seconds=args.pop("mean_clip_seconds"),
        tokens_per_second=args.pop("tokens_per_second"),
        max_tokens=args.pop("max_tokens"),
        context_gib=args.pop("context_gib"),
        json=args.pop("json"),
    )
    train_samples = args.pop("train_samples")
    config = resolve_layers(args, environ)
    config.data = loader_data_config(config)  # batch_size auto: plan the reference batch
    config.data.validate()
    config.optim.validate()
    if options.world_size < 1 or not 0 < options.utilization <= 1:
        raise ValueError("--world-size must be >= 1 and --utilization in (0, 1]")
    if train_samples is not None:
        options.train_samples = train_samples
        options.train_samples_source = "--train-samples"
    elif config.data.shards:
        location = config.data.train_dir()
        manifest = split_manifest(location)
        if manifest is not None:
            options.train_samples = int(manifest["num_samples"])
            options.train_samples_source = f"{location}/manifest.json"
    return config, options


def split_manifest(location: str | Path) -> dict[str, Any] | None:
    """The train split's manifest where there is one (only its sample count is used)."""
    if storage.is_url(location):
        with contextlib.suppress(ContractError):
            return storage.read_manifest(location)
        return None
    path = Path(location) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


# --- the model, with fake tensors -------------------------------------------------------------


def model_config_dir(name_or_path: str) -> Path:
    """The folder with the model's config.json: the folder itself, or the copy for a hub id."""
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    offline = MODELS_DIR / name_or_path.rstrip("/").split("/")[-1]
    if (offline / "config.json").is_file():
        return offline
    raise ValueError(
        f"no config.json for {name_or_path!r}: pass a folder holding the model's config.json "
        f"(offline copies exist for {', '.join(OFFLINE_HUB_IDS)})"
    )


def build_fake_model(config: ModelConfig, fake_mode):
    """WhisperForConditionalGeneration as load_model prepares it for training, on fake tensors."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    overrides = {} if config.dropout is None else {"dropout": config.dropout}
    model_config = WhisperConfig.from_pretrained(model_config_dir(config.name_or_path), **overrides)
    with fake_mode:
        model = WhisperForConditionalGeneration._from_config(
            model_config, dtype=torch.float32, attn_implementation=config.attn_implementation
        )
    model.config.use_cache = False
    if config.freeze_encoder:
        model.model.encoder.requires_grad_(False)
    if config.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    return model


# --- model states -----------------------------------------------------------------------------


def zero_partition(numels: list[int], world_size: int) -> list[list[int]]:
    """Indices of the parameters each rank owns, as ZeroRedundancyOptimizer partitions one
    parameter group: largest first, each to the rank with the fewest elements so far."""
    order = sorted(range(len(numels)), key=lambda i: numels[i], reverse=True)  # stable, as torch
    owned: list[list[int]] = [[] for _ in range(world_size)]
    sizes = [0] * world_size
    for index in order:
        rank = sizes.index(min(sizes))
        owned[rank].append(index)
        sizes[rank] += numels[index]
    return owned


def adamw_state_bytes(numels: list[int]) -> int:
    """exp_avg and exp_avg_sq in float32, plus AdamW's float32 `step` tensor per parameter."""
    return sum(8 * n + 4 for n in numels)


def model_state_bytes(model, world_size: int, zero1: bool) -> dict[str, Any]:
    """Bytes of weights, gradients and AdamW states per rank, from the model's parameters."""
    params = list(model.parameters())  # shared (tied) weights once, as the optimiser sees them
    trainable = [p.numel() for p in params if p.requires_grad]
    if zero1 and world_size > 1:
        optimizer = [
            adamw_state_bytes([trainable[i] for i in owned])
            for owned in zero_partition(trainable, world_size)
        ]
    else:
        optimizer = [adamw_state_bytes(trainable)] * world_size
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(trainable),
        "weights": sum(p.numel() * p.element_size() for p in params),
        # One fp32 copy, also under DDP: the trainer's gradients are views into DDP's
        # all-reduce buckets (loop.wrap_for_ddp, gradient_as_bucket_view).
        "gradients": 4 * sum(trainable),
        "optimizer_per_rank": optimizer,
        "optimizer": max(optimizer),
        # torch.save copies a device tensor to the host one storage at a time: exp_avg (or
        # exp_avg_sq) of the largest parameter is the most a checkpoint write holds at once
        "largest_state_tensor": 4 * max(trainable, default=0),
    }


# --- activations and FLOPs, measured ----------------------------------------------------------


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of every storage an operation creates, from creation until it is freed."""

    def __init__(self, ignore: set[int] | None = None) -> None:
        super().__init__()
        self.ignore = ignore or set()  # storages that exist before the step (the weights)
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in torch.utils._pytree.tree_leaves(out):
            if isinstance(item, torch.Tensor):
                self._track(item)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.ignore:
            return
        size = -(-storage.nbytes() // ALLOCATOR_ROUND) * ALLOCATOR_ROUND
        self.live[key] = size
        self.now += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter():
    """FlopCounterMode that also counts the CPU attention kernel (on CUDA the flash and
    memory-efficient kernels, which the counter knows, do the same matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
        },
    )


@dataclass
class Measured:
    batch_size: int
    target_tokens: int
    activation_peak: int  # bytes above weights, gradients and optimiser states
    kept_after_forward: int  # bytes alive when the forward (and the loss) end
    saved_by_autograd: int  # of those, what saved-tensor hooks saw (not parameters)
    logits: int  # the logits in the autocast dtype plus their float32 copy for the loss
    flops: int  # executed by one micro-batch's forward and backward (recompute included)


def measure_micro_batch(
    model, fake_mode, batch_size: int, target_tokens: int, precision: str
) -> Measured:
    """Two micro-batches of the trainer's step on fake tensors; figures of the second."""
    n_mels = model.config.num_mel_bins
    frames = window_frames(model.config)
    vocab = model.config.vocab_size
    pad_id = model.config.pad_token_id
    device = torch.device("cpu")
    param_storages = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    tracker = LiveBytes(ignore=param_storages)
    counter = flop_counter()
    result: dict[str, int] = {}
    with fake_mode, tracker:
        for micro in range(2):
            measured = micro == 1
            features = torch.randn(batch_size, n_mels, frames)
            tokens = torch.randint(0, vocab, (batch_size, target_tokens))
            inputs, labels = decoder_inputs_and_labels(tokens, pad_id)
            start = tracker.now
            tracker.peak = start
            saved: dict[int, int] = {}

            def pack(tensor: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
                key = tensor.untyped_storage()._cdata
                if key not in param_storages:
                    saved[key] = tensor.untyped_storage().nbytes()
                return tensor

            with counter if measured else _null():
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                    with autocast(precision, device):
                        logits = model(input_features=features, decoder_input_ids=inputs).logits
                    summed, count = token_loss(logits, labels)
                    loss = summed / count.clamp(min=1)
                kept = tracker.now - start
                logits_bytes = logits.numel() * (logits.element_size() + 4)
                loss.backward()
            del features, tokens, inputs, labels, logits, summed, count, loss
            if measured:
                result = {
                    "activation_peak": tracker.peak - start,
                    "kept_after_forward": kept,
                    "saved_by_autograd": sum(saved.values()),
                    "logits": logits_bytes,
                }
    for param in model.parameters():
        param.grad = None
    return Measured(
        batch_size=batch_size,
        target_tokens=target_tokens,
        flops=int(counter.get_total_flops()),
        **result,
    )


@dataclass
class Generation:
    rows: int  # sequences decoded at once: eval_batch_size x beam_size
    positions: int  # decoder positions at the last step (prefix + max_new_tokens)
    peak: int  # bytes above the model states, the larger of the encoder's and the last step's
    encoder_peak: int
    first_step_peak: int  # the prefix's step: its logits at every prefix position
    decode_peak: int  # the last step
    kv_cache: int  # self- and cross-attention keys and values at the last step
    weight_copies: int  # the half-precision weight copies autocast caches for the call


_GENERATION: dict[tuple, Generation] = {}


def measure_generation(
    model_config: ModelConfig, batch_size: int, beams: int, positions: int, precision: str
) -> Generation:
    """`generate`'s peak on fake tensors, memoised (it does not depend on training settings)."""
    key = (model_config.name_or_path, model_config.attn_implementation, batch_size, beams)
    key += (positions, precision)
    if key not in _GENERATION:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode()
        model = build_fake_model(replace(model_config, gradient_checkpointing=False), fake_mode)
        _GENERATION[key] = _measure_generation(
            model, fake_mode, batch_size, beams, positions, precision
        )
    return _GENERATION[key]


def _measure_generation(model, fake_mode, batch_size, beams, positions, precision) -> Generation:
    """The encoder, the first decoding step (the prefix), and the last step, with caches of
    `positions - 1` tokens.

    generate() copies the input features, runs the encoder once and keeps its output (expanded
    to every beam); the first step computes logits at every prefix position; each step appends
    one position to the caches, so the last step holds the most cache. The caches are filled by
    a prefill whose own activations are released before that step is measured (generate never
    holds them). Under autocast, generate() runs in one autocast region: each float32 weight is
    cast to half precision once and the copy is kept until the region ends.
    """
    import inspect

    parameters = inspect.signature(model.forward).parameters
    cache_argument = "cache" if "cache" in parameters else "past_key_values"  # older releases
    params = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    tracker = LiveBytes(ignore=params)
    rows = batch_size * beams
    model.eval()
    with fake_mode, tracker, torch.no_grad(), autocast(precision, torch.device("cpu")):
        features = torch.randn(batch_size, model.config.num_mel_bins, window_frames(model.config))
        inputs = features.clone()  # generate() concatenates the input features: one copy
        encoded = model.model.encoder(inputs).last_hidden_state
        encoder_peak = tracker.peak
        if beams > 1:
            encoded = encoded.repeat_interleave(beams, dim=0)
        prefix = torch.zeros(rows, min(DECODE_PREFIX, positions - 1), dtype=torch.long)
        first = model(encoder_outputs=(encoded,), decoder_input_ids=prefix, use_cache=True)
        scores = _logits_processing(first.logits)
        first_peak = tracker.peak
        del first, scores, prefix
        prefill = torch.zeros(rows, positions - 1, dtype=torch.long)
        output = model(encoder_outputs=(encoded,), decoder_input_ids=prefill, use_cache=True)
        cache = output[cache_argument]
        del output, prefill
        kv_cache = sum(_bytes(tensor) for tensor in _cache_tensors(cache))
        copies = tracker.now - _bytes(features) - _bytes(inputs) - _bytes(encoded) - kv_cache
        tracker.peak = tracker.now
        step = model(
            encoder_outputs=(encoded,),
            decoder_input_ids=torch.zeros(rows, 1, dtype=torch.long),
            use_cache=True,
            **{cache_argument: cache},
        )
        _logits_processing(step.logits)  # the peak is recorded while they live
        decode_peak = tracker.peak
    model.train()
    return Generation(
        rows=rows,
        positions=positions,
        peak=max(encoder_peak, first_peak, decode_peak),
        encoder_peak=encoder_peak,
        first_step_peak=first_peak,
        decode_peak=decode_peak,
        kv_cache=kv_cache,
        weight_copies=copies,
    )


DECODE_PREFIX = 4  # <|startoftranscript|><|de|><|transcribe|><|notimestamps|>


def _logits_processing(logits: torch.Tensor) -> list[torch.Tensor]:
    """What a greedy generate() step holds at once after the forward (seen on the tiny preset
    with real tensors): the float32 copy of the last position's logits, two masked copies and a
    clone made by the logits processors (suppressed tokens), and an arange over the vocabulary."""
    last = logits[:, -1, :].float()
    masked = [torch.where(last > 0, last, last) for _ in range(2)]
    return [last, *masked, last.clone(), torch.arange(last.shape[-1])]


def _cache_tensors(cache):
    """Keys and values of an EncoderDecoderCache (transformers 5 layers, or 4.x lists)."""
    for part in (cache.self_attention_cache, cache.cross_attention_cache):
        layers = getattr(part, "layers", None)
        if layers is None:
            yield from (*part.key_cache, *part.value_cache)
            continue
        for layer in layers:
            yield from (t for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


def _bytes(tensor: torch.Tensor) -> int:
    return -(-tensor.untyped_storage().nbytes() // ALLOCATOR_ROUND) * ALLOCATOR_ROUND


def eval_positions(config: TrainConfig, max_positions: int) -> int:
    """Decoder positions at evaluation's last step: the 4-token prefix and max_new_tokens."""
    return max(2, min(max_positions, 4 + config.eval.max_new_tokens))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_MODEL_FLOPS: dict[tuple[str, int], int] = {}


def count_model_flops(config: ModelConfig, batch_size: int, target_tokens: int) -> int:
    """FLOPs of one micro-batch's forward and backward without recompute (for MFU); counted
    for one sample, as every sample of a batch costs the same."""
    key = (repr(replace(config, gradient_checkpointing=False)), target_tokens)
    if key not in _MODEL_FLOPS:
        _MODEL_FLOPS[key] = _count_model_flops(config, 1, target_tokens)
    return _MODEL_FLOPS[key] * batch_size


def _count_model_flops(config: ModelConfig, batch_size: int, target_tokens: int) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode()
    model = build_fake_model(replace(config, gradient_checkpointing=False), fake_mode)
    counter = flop_counter()
    with fake_mode, counter:
        features = torch.randn(batch_size, model.config.num_mel_bins, window_frames(model.config))
        tokens = torch.randint(0, model.config.vocab_size, (batch_size, target_tokens))
        inputs, labels = decoder_inputs_and_labels(tokens, model.config.pad_token_id)
        logits = model(input_features=features, decoder_input_ids=inputs).logits
        summed, count = token_loss(logits, labels)
        summed.backward()
    return int(counter.get_total_flops())


# --- the plan ---------------------------------------------------------------------------------


def target_tokens(config: TrainConfig, options: PlanOptions, max_positions: int) -> int:
    """Target tokens per sample that the plan assumes for every sample of a micro-batch.

    Unpacked, a batch is padded to its longest target, and the peak comes from the batch of the
    longest utterances: a 30 s clip at `tokens_per_second`, plus the 4 prefix tokens and
    <|endoftext|>. Packed, the packer fills windows up to the decoder's limit.
    """
    if options.max_tokens:
        tokens = options.max_tokens
    elif config.data.pack:
        tokens = max_positions
    else:
        tokens = 5 + math.ceil(30 * options.tokens_per_second)
    return max(2, min(tokens, max_positions))


def utterances_per_window(config: TrainConfig, options: PlanOptions) -> float:
    low, high = config.data.gap_range()
    return 30.0 / (options.mean_clip_seconds + (low + high) / 2)


def make_plan(config: TrainConfig, options: PlanOptions) -> dict[str, Any]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    gpu = GPUS[options.gpu]
    precision = resolve_precision(config.optim.precision, torch.device("cuda"))
    fake_mode = FakeTensorMode()
    model = build_fake_model(config.model, fake_mode)
    positions = int(model.config.max_target_positions)
    tokens = target_tokens(config, options, positions)
    states = model_state_bytes(model, options.world_size, config.optim.zero1)
    key = (repr(config.model), config.data.batch_size, tokens, precision)
    if key not in _MICRO_BATCH:  # the verdict's attempts that change other settings reuse it
        _MICRO_BATCH[key] = measure_micro_batch(
            model, fake_mode, config.data.batch_size, tokens, precision
        )
    measured = _MICRO_BATCH[key]
    generation = measure_generation(
        config.model,
        config.eval.eval_batch_size,
        config.eval.beam_size,
        eval_positions(config, positions),
        precision,
    )
    plan = assemble(config, options, gpu, precision, model, states, measured, tokens)
    plan["phases"] = phase_peaks(options, gpu, states, measured, generation)
    peak = max(plan["phases"], key=lambda name: plan["phases"][name]["total"])  # first on a tie
    plan["peak_phase"] = peak
    plan["peak_total"] = plan["phases"][peak]["total"]
    plan["headroom"] = plan["phases"][peak]["headroom"]
    plan["fits"] = plan["headroom"] >= 0
    plan["eval_batch_size"] = config.eval.eval_batch_size
    plan["beam_size"] = config.eval.beam_size
    return plan


_MICRO_BATCH: dict[tuple, Measured] = {}

PHASE_TITLES = {
    "training_step": "training step (steady)",
    "first_step_after_resume": "first step after a resume",
    "evaluation": "evaluation (generate)",
    "checkpoint_write": "checkpoint write",
}


def phase_peaks(options: PlanOptions, gpu: Gpu, states, measured, generation) -> dict[str, Any]:
    """Peak bytes per GPU (the fullest rank) of each phase, and host bytes per rank beyond the
    process's own baseline, in PHASE_TITLES' order."""
    weights, gradients, optimizer = states["weights"], states["gradients"], states["optimizer"]
    model_states = weights + gradients + optimizer
    # Under DDP the gradients are bucket views that stay allocated between steps (zeroed in
    # place); a single process sets them to None after each step.
    kept_gradients = gradients if options.world_size > 1 else 0
    device = {
        "training_step": model_states + measured.activation_peak,
        # The shard is loaded into the optimiser's own state on the device and the gradients
        # exist as bucket views from the first backward: no second copy of either.
        "first_step_after_resume": model_states + measured.activation_peak,
        "evaluation": weights + kept_gradients + optimizer + generation.peak,
        # Between steps, activations released; every rank writes its own shard from where it is.
        "checkpoint_write": weights + kept_gradients + optimizer,
    }
    host = {
        "training_step": 0,
        # the model is built and loaded in host memory before it moves to the device, and
        # torch.load(map_location="cpu") holds the rank's optimiser shard until it is loaded
        "first_step_after_resume": weights + optimizer,
        "evaluation": 0,
        # rank 0: safetensors serialises every weight in memory before writing; every rank:
        # torch.save copies one optimiser storage at a time to the host
        "checkpoint_write": weights + states["largest_state_tensor"],
    }
    notes = {
        "training_step": f"activations {measured.activation_peak / GIB:.2f} GiB at batch "
        f"{measured.batch_size}",
        "first_step_after_resume": "as the steady step on the device; host: the model's "
        "first copy and the loaded optimiser shard",
        "evaluation": f"{generation.rows} rows x {generation.positions} positions: fp16 weight "
        f"copies {generation.weight_copies / GIB:.2f}, KV caches {generation.kv_cache / GIB:.2f}",
        "checkpoint_write": "each rank writes its own shard; host: rank 0's weights in "
        "safetensors plus one optimiser storage",
    }
    context = options.context_gib * GIB
    capacity = gpu.memory_gib * GIB
    phases: dict[str, Any] = {}
    for name in PHASE_TITLES:
        fragmentation = options.fragmentation * device[name]
        total = int(device[name] + fragmentation + context)
        phases[name] = {
            "allocated": int(device[name]),
            "total": total,
            "headroom": int(capacity - total),
            "host_per_rank": int(host[name]),
            "note": notes[name],
        }
    phases["evaluation"]["generation"] = vars(generation)
    return phases


def assemble(config, options, gpu, precision, model, states, measured, tokens) -> dict[str, Any]:
    """The training step's memory breakdown (`memory_bytes`), FLOPs and times."""
    world, batch, accum = options.world_size, config.data.batch_size, config.optim.grad_accum
    allocated = (
        states["weights"] + states["gradients"] + states["optimizer"] + measured.activation_peak
    )
    fragmentation = options.fragmentation * allocated
    context = options.context_gib * GIB
    total = allocated + fragmentation + context
    capacity = gpu.memory_gib * GIB

    executed = measured.flops * accum  # per GPU and optimiser step
    model_flops = (
        count_model_flops(config.model, batch, tokens) * accum
        if config.model.gradient_checkpointing
        else executed
    )
    compute_s = executed / (gpu.tflops * 1e12 * options.utilization)
    # ring all-reduce of the fp32 gradients, and ZeRO-1's broadcast of updated weights; counted
    # as not overlapped with compute (DDP overlaps part of it with the last backward)
    share = 2 * (world - 1) / world if world > 1 else 0.0
    comm_bytes = share * states["gradients"]
    if config.optim.zero1 and world > 1:
        comm_bytes += (world - 1) / world * states["gradients"]
    comm_s = comm_bytes / (gpu.link_gbs * 1e9) if world > 1 else 0.0
    step_s = compute_s + comm_s
    per_step = world * batch * accum
    utterances = per_step * (utterances_per_window(config, options) if config.data.pack else 1)
    samples_s = utterances / step_s
    return {
        "model": config.model.name_or_path,
        "model_config": _shown(model_config_dir(config.model.name_or_path)),
        "gpu": options.gpu,
        "gpu_name": gpu.name,
        "gpu_source": gpu.source,
        "world_size": world,
        "precision": precision,
        "batch_size": batch,
        "grad_accum": accum,
        "gradient_checkpointing": config.model.gradient_checkpointing,
        "freeze_encoder": config.model.freeze_encoder,
        "zero1": config.optim.zero1,
        "pack": config.data.pack,
        "target_tokens": tokens,
        "parameters": states["parameters"],
        "trainable_parameters": states["trainable_parameters"],
        "memory_bytes": {
            "weights": states["weights"],
            "gradients": states["gradients"],
            "optimizer": states["optimizer"],
            "optimizer_per_rank": states["optimizer_per_rank"],
            "activations_peak": measured.activation_peak,
            "activations_kept_after_forward": measured.kept_after_forward,
            "activations_saved_by_autograd": measured.saved_by_autograd,
            "logits": measured.logits,
            "allocated_peak": allocated,
            "fragmentation": int(fragmentation),
            "context": int(context),
            "total": int(total),
            "capacity": int(capacity),
            "headroom": int(capacity - total),
        },
        "fits": total <= capacity,
        "flops_per_step_per_gpu": executed,
        "model_flops_per_step_per_gpu": model_flops,
        "utilization": options.utilization,
        "peak_tflops": gpu.tflops,
        "compute_seconds": compute_s,
        "communication_seconds": comm_s,
        "step_seconds": step_s,
        "windows_per_step" if config.data.pack else "samples_per_step": per_step,
        "utterances_per_step": utterances,
        "samples_per_second": samples_s,
        "mfu": model_flops * world / step_s / (world * gpu.tflops * 1e12),
        "train_samples": options.train_samples,
        "train_samples_source": options.train_samples_source,
        "hours_per_epoch": options.train_samples / samples_s / 3600,
        "assumptions": assumptions(config, options),
    }


def _shown(path: Path) -> str:
    """A path relative to the working directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def assumptions(config: TrainConfig, options: PlanOptions) -> list[str]:
    items = [
        f"utilisation {options.utilization:.0%} of the dense fp16/bf16 tensor peak on executed "
        "FLOPs (recompute included)",
        f"{options.context_gib:g} GiB outside PyTorch's allocator (CUDA context, cuBLAS, NCCL) "
        f"and {options.fragmentation:.0%} of the allocated peak for fragmentation",
        "the gradient all-reduce (and ZeRO-1's weight broadcast) does not overlap compute",
    ]
    if config.data.pack:
        items.append(
            f"a packed window holds {utterances_per_window(config, options):.2f} utterances: "
            f"30 s / (mean clip {options.mean_clip_seconds:g} s + mean gap)"
        )
    elif not options.max_tokens:
        items.append(
            f"{options.tokens_per_second:g} target tokens per second of speech: the longest "
            "batch (30 s clips) sets the peak, and every batch is planned at that length"
        )
    return items


# --- the verdict ------------------------------------------------------------------------------


def fixes(
    config: TrainConfig, options: PlanOptions, plan: dict[str, Any] | None = None
) -> list[tuple[str, TrainConfig]]:
    """Changes in order of cost, each on top of the ones before: a smaller evaluation batch
    when the evaluation alone does not fit (slower evaluation, the same training), ZeRO-1 (a
    little communication), a smaller micro-batch with more accumulation (the same effective
    batch, less throughput), gradient checkpointing (~1/3 more compute), a frozen encoder (a
    different training: the decoder only)."""
    steps: list[tuple[str, TrainConfig]] = []
    current = config

    def changed(description: str, **sections: dict[str, Any]) -> None:
        nonlocal current
        updated = replace(current)
        for section, values in sections.items():
            setattr(updated, section, replace(getattr(current, section), **values))
        current = updated
        steps.append((description, current))

    evaluation = plan["phases"]["evaluation"] if plan else None
    eval_batch = config.eval.eval_batch_size
    while evaluation is not None and evaluation["headroom"] < 0 and eval_batch > 1:
        eval_batch //= 2
        changed(f"--eval-batch-size {eval_batch}", eval={"eval_batch_size": eval_batch})
    if options.world_size > 1 and not config.optim.zero1:
        changed("--zero1 true", optim={"zero1": True})
    batch, accum = config.data.batch_size, config.optim.grad_accum
    while batch > 1:
        batch, accum = batch // 2, accum * 2
        bucket = current.data.bucket_buffer
        changed(
            f"--batch-size {batch} --grad-accum {accum}",
            data={"batch_size": batch, "bucket_buffer": bucket - bucket % batch},
            optim={"grad_accum": accum},
        )
    if not config.model.gradient_checkpointing:
        changed("--gradient-checkpointing true", model={"gradient_checkpointing": True})
    if not config.model.freeze_encoder:
        changed("--freeze-encoder true", model={"freeze_encoder": True})
    return steps


def changed_flags(config: TrainConfig, candidate: TrainConfig) -> str:
    """The command-line flags that turn `config` into `candidate`."""
    flags = []
    for section, name in (
        ("optim", "zero1"),
        ("data", "batch_size"),
        ("optim", "grad_accum"),
        ("data", "bucket_buffer"),
        ("model", "gradient_checkpointing"),
        ("model", "freeze_encoder"),
        ("eval", "eval_batch_size"),
    ):
        value = getattr(getattr(candidate, section), name)
        if value != getattr(getattr(config, section), name):
            text = str(value).lower() if isinstance(value, bool) else str(value)
            flags.append(f"--{name.replace('_', '-')} {text}")
    return " ".join(flags)


def verdict(config: TrainConfig, options: PlanOptions, plan: dict[str, Any]) -> dict[str, Any]:
    """On the largest phase's peak (plan["peak_phase"]), not only the training step's."""
    phase = plan["peak_phase"]
    if plan["fits"]:
        return {"fits": True, "phase": phase, "headroom": plan["headroom"], "fix": None}
    for _, candidate in fixes(config, options, plan):
        attempt = make_plan(candidate, options)
        if attempt["fits"]:
            return {
                "fits": False,
                "phase": phase,
                "short_by": -plan["headroom"],
                "fix": changed_flags(config, candidate),
                "fix_total": attempt["peak_total"],
                "fix_headroom": attempt["headroom"],
                "fix_phase": attempt["peak_phase"],
                "fix_hours_per_epoch": attempt["hours_per_epoch"],
            }
    return {
        "fits": False,
        "phase": phase,
        "short_by": -plan["headroom"],
        "fix": None,
        "note": "nothing the trainer offers makes it fit: a GPU with more memory, or more GPUs "
        "with --zero1 (8-bit AdamW is not offered by the trainer)",
    }


# --- output -----------------------------------------------------------------------------------


def _gib(value: float) -> str:
    return f"{value / GIB:6.2f} GiB"


def format_plan(plan: dict[str, Any]) -> str:
    m = plan["memory_bytes"]
    v = plan["verdict"]
    unit = "windows" if plan["pack"] else "samples"
    lines = [
        f"Training plan for {plan['model']} (config: {plan['model_config']})",
        f"  {plan['parameters'] / 1e6:.1f} M parameters, "
        f"{plan['trainable_parameters'] / 1e6:.1f} M trainable; precision {plan['precision']}; "
        f"gradient checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}; "
        f"zero1 {'on' if plan['zero1'] else 'off'}; pack {'on' if plan['pack'] else 'off'}",
        f"  {plan['world_size']} x {plan['gpu_name']} x batch {plan['batch_size']} {unit} x "
        f"accumulation {plan['grad_accum']}; {plan['target_tokens']} target tokens per "
        f"{unit[:-1]}",
        "",
        "Memory per GPU in the training step (the fullest rank):",
        f"  weights (fp32)                   {_gib(m['weights'])}",
        f"  gradients (fp32)                 {_gib(m['gradients'])}",
        f"  AdamW states{' (ZeRO-1 share)   ' if plan['zero1'] else '                   '}  "
        f"{_gib(m['optimizer'])}",
        f"  activations, measured peak       {_gib(m['activations_peak'])}   (kept after the "
        f"forward {m['activations_kept_after_forward'] / GIB:.2f}, saved by autograd "
        f"{m['activations_saved_by_autograd'] / GIB:.2f}, logits {m['logits'] / GIB:.2f})",
        f"  fragmentation margin             {_gib(m['fragmentation'])}",
        f"  CUDA context, cuBLAS, NCCL       {_gib(m['context'])}",
        f"  total                            {_gib(m['total'])}   of {_gib(m['capacity'])}",
        "",
        "Peak per GPU of every phase (with the same margins; host: per rank, beyond its baseline):",
        *_phase_lines(plan),
        "",
        "Time:",
        f"  FLOPs per optimiser step per GPU {plan['flops_per_step_per_gpu'] / 1e12:8.1f} TFLOP "
        f"({plan['model_flops_per_step_per_gpu'] / 1e12:.1f} without recompute)",
        f"  step time                        {plan['step_seconds']:8.2f} s   "
        f"(compute {plan['compute_seconds']:.2f} s at {plan['utilization']:.0%} of "
        f"{plan['peak_tflops']:g} TFLOP/s, all-reduce {plan['communication_seconds']:.2f} s)",
        f"  utterances per second            {plan['samples_per_second']:8.2f}     "
        f"(MFU {plan['mfu']:.0%})",
        f"  hours per epoch                  {plan['hours_per_epoch']:8.1f}     "
        f"({plan['train_samples']} utterances, {plan['train_samples_source']})",
        "",
    ]
    phase = PHASE_TITLES[v["phase"]]
    if v["fits"]:
        lines.append(
            f"Verdict: FITS, with {v['headroom'] / GIB:.2f} GiB headroom per GPU at the largest "
            f"peak, the {phase}."
        )
    elif v["fix"]:
        lines.append(
            f"Verdict: DOES NOT FIT ({v['short_by'] / GIB:.2f} GiB short in the {phase}). "
            f"Cheapest change that fits: {v['fix']} ({v['fix_total'] / GIB:.2f} GiB at the "
            f"{PHASE_TITLES[v['fix_phase']]}, {v['fix_headroom'] / GIB:.2f} GiB headroom, "
            f"{v['fix_hours_per_epoch']:.1f} h per epoch)."
        )
    else:
        lines.append(
            f"Verdict: DOES NOT FIT ({v['short_by'] / GIB:.2f} GiB short in the {phase}), and "
            f"{v['note']}."
        )
    lines.append("Assumptions: " + "; ".join(plan["assumptions"]) + ".")
    lines.append(f"GPU figures: {plan['gpu_source']}.")
    return "\n".join(lines)


def _phase_lines(plan: dict[str, Any]) -> list[str]:
    lines = []
    for name, phase in plan["phases"].items():
        mark = "  <- largest" if name == plan["peak_phase"] else ""
        host = f"host {phase['host_per_rank'] / GIB:5.2f} GiB" if phase["host_per_rank"] else ""
        lines.append(
            f"  {PHASE_TITLES[name]:32s} {_gib(phase['total'])}   {host:16s} ({phase['note']})"
            f"{mark}"
        )
    return lines


def plan_with_verdict(config: TrainConfig, options: PlanOptions) -> dict[str, Any]:
    plan = make_plan(config, options)
    plan["verdict"] = verdict(config, options, plan)
    return plan


def main(argv: list[str] | None = None) -> int:
    try:
        config, options = resolve(argv)
        plan = plan_with_verdict(config, options)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if options.json:
        print(json.dumps(plan, indent=2))
    else:
        print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
