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
- FLOPs with `torch.utils.flop_counter.FlopCounterMode` over the same forward and backward.

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
from trainer.fit import loader_data_config
from trainer.model import ModelConfig, decoder_inputs_and_labels, token_loss, window_frames
from trainer.optim import autocast, resolve_precision

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
    measured = measure_micro_batch(model, fake_mode, config.data.batch_size, tokens, precision)
    return assemble(config, options, gpu, precision, model, states, measured, tokens)


def assemble(config, options, gpu, precision, model, states, measured, tokens) -> dict[str, Any]:
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


def fixes(config: TrainConfig, options: PlanOptions) -> list[tuple[str, TrainConfig]]:
    """Changes in order of cost, each on top of the ones before: ZeRO-1 (a little
    communication), a smaller micro-batch with more accumulation (the same effective batch,
    less throughput), gradient checkpointing (~1/3 more compute), a frozen encoder (a different
    training: the decoder only)."""
    steps: list[tuple[str, TrainConfig]] = []
    current = config

    def changed(description: str, **sections: dict[str, Any]) -> None:
        nonlocal current
        updated = replace(current)
        for section, values in sections.items():
            setattr(updated, section, replace(getattr(current, section), **values))
        current = updated
        steps.append((description, current))

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
    ):
        value = getattr(getattr(candidate, section), name)
        if value != getattr(getattr(config, section), name):
            text = str(value).lower() if isinstance(value, bool) else str(value)
            flags.append(f"--{name.replace('_', '-')} {text}")
    return " ".join(flags)


def verdict(config: TrainConfig, options: PlanOptions, plan: dict[str, Any]) -> dict[str, Any]:
    memory = plan["memory_bytes"]
    if plan["fits"]:
        return {"fits": True, "headroom": memory["headroom"], "fix": None}
    for _, candidate in fixes(config, options):
        attempt = make_plan(candidate, options)
        if attempt["fits"]:
            return {
                "fits": False,
                "short_by": -memory["headroom"],
                "fix": changed_flags(config, candidate),
                "fix_total": attempt["memory_bytes"]["total"],
                "fix_headroom": attempt["memory_bytes"]["headroom"],
                "fix_hours_per_epoch": attempt["hours_per_epoch"],
            }
    return {
        "fits": False,
        "short_by": -memory["headroom"],
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
        "Memory per GPU (the fullest rank):",
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
    if v["fits"]:
        lines.append(f"Verdict: FITS, with {v['headroom'] / GIB:.2f} GiB headroom per GPU.")
    elif v["fix"]:
        lines.append(
            f"Verdict: DOES NOT FIT ({v['short_by'] / GIB:.2f} GiB short). Cheapest change that "
            f"fits: {v['fix']} ({v['fix_total'] / GIB:.2f} GiB, "
            f"{v['fix_headroom'] / GIB:.2f} GiB headroom, {v['fix_hours_per_epoch']:.1f} h per "
            "epoch)."
        )
    else:
        lines.append(
            f"Verdict: DOES NOT FIT ({v['short_by'] / GIB:.2f} GiB short), and {v['note']}."
        )
    lines.append("Assumptions: " + "; ".join(plan["assumptions"]) + ".")
    lines.append(f"GPU figures: {plan['gpu_source']}.")
    return "\n".join(lines)


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
