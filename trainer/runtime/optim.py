"""Optimiser, learning-rate schedule, mixed precision and the guard against a collapsing scale."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.runtime import gpu


def _help(text: str, **kwargs: Any):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class OptimConfig:
    lr: float = _help("peak learning rate of AdamW", default=1e-5)
    warmup_steps: int = _help("optimiser steps of linear warm-up from 0 to lr", default=500)
    schedule: str = _help("decay after warm-up: linear, cosine or constant", default="linear")
    min_lr_ratio: float = _help("the decay ends at lr * min_lr_ratio", default=0.0)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    beta1: float = _help("AdamW beta1", default=0.9)
    beta2: float = _help("AdamW beta2", default=0.999)
    adam_eps: float = _help("AdamW epsilon", default=1e-8)
    max_grad_norm: float = _help(
        "clip the global gradient norm to this (0 = no clipping)", default=1.0
    )
    grad_accum: int = _help("micro-batches per optimiser step (per device)", default=12)
    max_steps: int = _help(
        "optimiser steps to train; 0 = derive from `epochs` and the batches per epoch", default=0
    )
    epochs: float = _help("epochs to train when max_steps is 0", default=2.0)
    precision: str = _help(
        "auto (fp16 on CUDA, as the original project; fp32 elsewhere), fp16 (autocast + "
        "GradScaler), bf16 (autocast, no scaler) or fp32",
        default="auto",
    )
    zero1: bool = _help(
        "shard the AdamW state across ranks (ZeroRedundancyOptimizer): ~8 bytes/parameter "
        "less per GPU on two ranks (ignored in a single process)",
        default=True,
    )
    fused: bool = _help("use the fused AdamW kernel on CUDA", default=True)
    max_consecutive_skips: int = _help(
        "stop when this many optimiser steps in a row had inf/NaN gradients", default=20
    )
    min_loss_scale: float = _help(
        "stop when the fp16 loss scale falls below this (gradients are garbage)", default=1e-4
    )

    def validate(self) -> None:
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule must be linear, cosine or constant, not {self.schedule!r}")
        if self.precision not in ("auto", "fp16", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, fp16, bf16 or fp32, not {self.precision!r}")
        if self.grad_accum < 1:
            raise ValueError("grad_accum must be at least 1")


class TrainingDiverged(RuntimeError):
    """Gradients keep overflowing: continuing would train on garbage."""


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        gpu.check_bf16(device)
    return precision


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 has float32's exponent range and does not."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for the optimiser step with index `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    decay = cosine if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def warmup_warning(warmup_steps: int, total_steps: int) -> str | None:
    """What is wrong with a warm-up this long for a run this long, or None when it fits.

    Warm-up at or past the end of the run means the peak lr is never reached (or only at the
    last step) and the decay never starts. More than half the run still leaves little time at
    the peak and for the decay: usually --max-steps was lowered for a short run and
    --warmup-steps kept its default.
    """
    if warmup_steps <= 0 or total_steps <= 0 or 2 * warmup_steps <= total_steps:
        return None
    steps = f"warm-up ({warmup_steps} optimiser steps)"
    advice = "lower --warmup-steps or raise --max-steps (or --epochs when max_steps is 0)"
    if warmup_steps > total_steps:
        reached = total_steps / warmup_steps
        return (
            f"{steps} is longer than the run ({total_steps} steps): the learning rate never "
            f"reaches --lr (it climbs to {reached:.0%} of it) and never decays; {advice}"
        )
    if warmup_steps == total_steps:
        return (
            f"{steps} is as long as the run ({total_steps} steps): the learning rate reaches "
            f"--lr only at the last step and never decays; {advice}"
        )
    return (
        f"{steps} takes {warmup_steps / total_steps:.0%} of the run ({total_steps} steps): the "
        f"learning rate reaches --lr late and has little time to decay; {advice}"
    )


def build_optimizer(
    params: list[torch.nn.Parameter], config: OptimConfig, device: torch.device, zero1: bool
) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {
        "lr": config.lr,
        "betas": (config.beta1, config.beta2),
        "eps": config.adam_eps,
        "weight_decay": config.weight_decay,
    }
    if config.fused and device.type == "cuda":
        kwargs["fused"] = True
    if zero1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def is_sharded(optimizer: torch.optim.Optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimiser that holds this rank's AdamW state: ZeRO's inner one, or the optimiser."""
    return optimizer.optim if is_sharded(optimizer) else optimizer


PARAM_NAMES = "param_names"  # beside a saved state dict: its parameters' names, per group


def parameter_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[list[str]]:
    """The model.named_parameters names of this rank's optimiser parameters, group by group,
    in the order its state dict indexes them."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [
        [names[id(p)] for p in group["params"]] for group in local_optimizer(optimizer).param_groups
    ]


def optimizer_checkpoint_state(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None
) -> dict[str, Any]:
    """What this rank saves: under ZeRO-1 its own share (the inner optimiser's state dict,
    indexed by its own parameters), else the whole AdamW state; with `model`, the names of the
    parameters (PARAM_NAMES), so that another world size can merge and re-split the shares
    (trainer/runtime/checkpoint.py `load_optimizer_state`).

    Never ZeroRedundancyOptimizer.consolidate_state_dict: it sends every share to one rank as a
    byte tensor on the GPU and loads it there again, the whole state on one card.
    """
    if is_sharded(optimizer):
        # ZeRO hands the wrapper's hyperparameters (the lr the scheduler set after the last
        # step) to the inner optimiser only at the next step: hand them over before saving.
        _copy_hyperparameters(optimizer.param_groups, optimizer.optim.param_groups)
    state = local_optimizer(optimizer).state_dict()
    if model is not None:
        state[PARAM_NAMES] = parameter_names(optimizer, model)
    return state


def _copy_hyperparameters(source_groups: list[dict], target_groups: list[dict]) -> None:
    for source, target in zip(source_groups, target_groups, strict=True):
        target.update({key: value for key, value in source.items() if key != "params"})


def restore_optimizer(
    optimizer: torch.optim.Optimizer, state: dict[str, Any], is_shard: bool
) -> None:
    """Load a checkpoint's optimiser state: every tensor once, on its parameter's device.

    `is_shard`: `state` is indexed like this rank's local optimiser (its own ZeRO-1 shard, or
    one merged by name from the shards of another world size); otherwise it is the whole state
    in the order of the optimiser's own parameters. Without ZeRO-1 both are the same.

    A ZeRO-1 shard goes straight into the inner optimiser, whose own load_state_dict puts each
    tensor on its parameter's device and dtype and `step` where the kernel needs it (on the
    device for fused AdamW). ZeroRedundancyOptimizer.load_state_dict is avoided: it moves every
    `step` to the CPU, which fused AdamW refuses (pytorch/pytorch#124133), and its base-class
    call leaves a second copy of the state in the wrapper's own `state`, never read.
    """
    sharded = is_sharded(optimizer)
    if not sharded:
        optimizer.load_state_dict(state)
        return
    inner = optimizer.optim
    if is_shard:
        inner.load_state_dict(state)
    else:  # one whole state (zero1 was off, or an older checkpoint): ZeRO picks its share
        optimizer.load_state_dict(state)
        optimizer.state.clear()  # the copy ZeRO's base class keeps and never reads
        inner.load_state_dict(inner.state_dict())  # `step` back where the kernel wants it
    # The scheduler sets the lr in the wrapper's groups, which ZeRO copies into the inner
    # optimiser at every step: the wrapper must carry the restored values.
    _copy_hyperparameters(inner.param_groups, optimizer.param_groups)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int):
    def factor(step: int) -> float:
        return lr_factor(
            step, config.warmup_steps, total_steps, config.schedule, config.min_lr_ratio
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_overflow(
    step: int, consecutive_skips: int, loss_scale: float | None, config: OptimConfig
) -> None:
    """Stop with a clear error when skipped steps show the run can no longer recover."""
    if loss_scale is not None and loss_scale < config.min_loss_scale:
        raise TrainingDiverged(
            f"step {step}: the fp16 loss scale collapsed to {loss_scale:.3g} (below "
            f"min_loss_scale={config.min_loss_scale:g}): the gradients overflow even when scaled "
            "down. Try a lower --lr, more --warmup-steps, --precision bf16 (on GPUs that have "
            "it), or resume from an earlier checkpoint."
        )
    if consecutive_skips >= config.max_consecutive_skips:
        raise TrainingDiverged(
            f"step {step}: {consecutive_skips} optimiser steps in a row had inf/NaN gradients "
            f"(max_consecutive_skips={config.max_consecutive_skips}). The model or the data "
            "produce non-finite values: try a lower --lr, --precision fp32 or bf16 to rule out "
            "fp16 overflow, check the shards with scripts/check_shards.py, or resume from an "
            "earlier checkpoint."
        )
