"""Fit the micro-batch to the card the run is on, and fall back when a step runs out of memory.

Three numbers, kept apart on purpose:

- the loader batch: the windows the data stream groups into one batch (`--batch-size N`, or
  `fit.reference_batch_size` under `--batch-size auto`). It is part of the data order
  (`order_signature`), so it never changes during a run;
- the windows per optimiser step per rank: loader batch x grad_accum. Fixed for the run too:
  one optimiser step always trains on the same windows, whatever the card;
- the micro-batch: the windows one forward/backward holds. Chosen here, and only ever a divisor
  of the windows per step (accumulation = windows per step / micro-batch), so every step splits
  into equal micro-batches. A size that does not divide is lowered to the largest one that does
  (24 windows per step: 5 fits, 4 is used with accumulation 6).

At setup (`fit_micro_batch`), `--batch-size auto` on CUDA measures a real forward and backward
at the worst-case window (every frame of the encoder's input, every decoder position) for a
few candidate sizes, adds the optimiser state that is not allocated yet, and keeps the largest
size that leaves `fit.memory_margin_gib` of the memory this process may still use. All ranks
take the smallest rank's answer. A resumed run starts from the micro-batch it had (stored in the
checkpoint) and only goes lower if that no longer fits. On the CPU, `auto` is the reference batch.

During training (`Accumulator`), one optimiser step's windows are gathered first and split into
micro-batches of the current size. An out-of-memory error in a micro-batch is agreed on by all
ranks (a one-int all-reduce after each micro-batch, and before the last micro-batch's backward,
where DDP all-reduces the gradients); then every rank drops the step's gradients, halves the
micro-batch, doubles the accumulation and redoes the step from the same windows and the same
RNG state. Limits: an out-of-memory error inside the last micro-batch's backward under DDP
cannot be retried (DDP's gradient all-reduce is already in flight on the other ranks) and
stops the run with a clear error; the optimiser step itself is not retried either (the
measurement counts its state). Resume from a checkpoint then, at the stored micro-batch.

Why a redone step needs one extra forward under DDP: a rank whose synchronised forward finished
has told DDP's reducer to expect a backward; a rank that ran out of memory inside it has not.
Left so, the first rank's next backward, even under no_sync, all-reduces alone and the ranks
fall out of step (seen with two gloo ranks). One synchronised forward and backward of a single
zero window on every rank brings all reducers to the same state; its gradients are zeroed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from trainer.data.loader import IGNORE_INDEX
from trainer.model import token_loss, window_frames
from trainer.runtime import distributed
from trainer.runtime.optim import autocast

AUTO = "auto"
GIB = 2**30
# Test hook (read once at setup): rank 0's forward raises torch.OutOfMemoryError in the last
# micro-batch of the given optimiser step, once (inside DDP's forward, as a real one would).
OOM_HOOK = "TRAINER_DEBUG_OOM_AT_STEP"


def _help(text: str, **kwargs: Any):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class FitConfig:
    reference_batch_size: int = _help(
        "with batch_size auto: the batch the windows per optimiser step are counted from "
        "(reference_batch_size x grad_accum per rank, whatever micro-batch the card fits), "
        "the loader's batch, and the micro-batch on the CPU",
        default=2,
    )
    memory_margin_gib: float = _help(
        "with batch_size auto: GiB left free at the worst-case window, for what the "
        "measurement does not see (evaluation, the checkpoint write, fragmentation, other "
        "processes)",
        default=1.0,
    )

    def validate(self, batch_size: int | str, bucket_buffer: int) -> None:
        if self.reference_batch_size < 1:
            raise ValueError("reference_batch_size must be at least 1")
        if self.memory_margin_gib < 0:
            raise ValueError("memory_margin_gib must be >= 0")
        if batch_size == AUTO and bucket_buffer % self.reference_batch_size:
            raise ValueError(
                f"bucket_buffer {bucket_buffer} is not a multiple of reference_batch_size "
                f"{self.reference_batch_size} (the loader's batch under batch_size auto)"
            )


class CannotFit(ValueError):
    """Not even one window fits, or an out-of-memory error cannot be retried safely."""


# --- the numbers ------------------------------------------------------------------------------


def loader_batch_size(batch_size: int | str, fit: FitConfig) -> int:
    """The batch the data stream groups: --batch-size N, or the reference batch under auto."""
    return fit.reference_batch_size if batch_size == AUTO else int(batch_size)


def loader_data_config(config):
    """config.data with the loader's numeric batch in place of `auto` (for TrainData)."""
    return replace(config.data, batch_size=loader_batch_size(config.data.batch_size, config.fit))


def divisors(windows: int) -> list[int]:
    return [size for size in range(1, windows + 1) if windows % size == 0]


def largest_divisor_at_most(windows: int, limit: int) -> int:
    return max(size for size in divisors(windows) if size <= max(1, limit))


@dataclass
class Choice:
    micro_batch: int
    windows: int  # per rank and optimiser step
    reason: str

    @property
    def accumulation(self) -> int:
        return self.windows // self.micro_batch

    def describe(self, world_size: int) -> str:
        return (
            f"micro-batch {self.micro_batch} x accumulation {self.accumulation} x "
            f"{world_size} rank(s) = {self.windows * world_size} windows per step ({self.reason})"
        )


def search_micro_batch(
    windows: int, budget: int, need: Callable[[int], int | None], start: int | None = None
) -> tuple[int | None, dict[int, int | None]]:
    """The largest divisor b of `windows` with need(b) <= budget, and every need measured.

    `need(b)` is the bytes a step at micro-batch b takes (None: it ran out of memory). From
    `start` (a resumed run's micro-batch) only smaller sizes are tried. Otherwise two small
    sizes give a line (fixed + per window), its prediction is measured, then the search walks
    down until a size fits and up while the next one fits: usually three or four measurements.
    """
    sizes = divisors(windows)
    needs: dict[int, int | None] = {}

    def fits(size: int) -> bool:
        if size not in needs:
            needs[size] = need(size)
        value = needs[size]
        return value is not None and value <= budget

    if start is not None:
        for size in reversed([s for s in sizes if s <= start]):
            if fits(size):
                return size, needs
        return None, needs
    if not fits(1):
        return None, needs
    if len(sizes) == 1 or not fits(sizes[1]):
        return 1, needs
    slope = (needs[sizes[1]] - needs[1]) / (sizes[1] - 1)
    fixed = needs[1] - slope
    index = max(i for i, s in enumerate(sizes) if i <= 1 or fixed + slope * s <= budget)
    while index > 1 and not fits(sizes[index]):
        index -= 1
    while index + 1 < len(sizes) and fits(sizes[index + 1]):
        index += 1
    return sizes[index], needs


# --- measuring on the card --------------------------------------------------------------------


def usable_cuda_bytes(device: torch.device) -> int:
    """Bytes this process can still allocate: the device's free memory plus what our caching
    allocator holds unused, capped by torch.cuda.set_per_process_memory_fraction if set (two
    ranks sharing one GPU each see the whole card's free memory otherwise)."""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    usable = free + torch.cuda.memory_reserved(device) - allocated
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    if fraction < 1.0:
        usable = min(usable, int(fraction * total) - allocated)
    return usable


def missing_optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """AdamW's two moments for this rank's parameters that have no state yet (a fresh run
    allocates them at the first step). ZeRO-1: only the local shard (`optimizer.optim`)."""
    local = getattr(optimizer, "optim", optimizer)
    total = 0
    for group in local.param_groups:
        for param in group["params"]:
            if not local.state.get(param):
                total += 2 * param.numel() * param.element_size()
    return total


def measure_step(model, size: int, precision: str, base: int) -> int | None:
    """Peak bytes above `base` of one forward and backward of `size` worst-case windows on the
    unwrapped model (DDP's hooks do not fire before its first synchronised forward, so this
    needs no other rank); None if it ran out of memory."""
    device = next(model.parameters()).device
    shape = (size, model.config.num_mel_bins, window_frames(model.config))
    positions = int(model.config.max_target_positions)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    peak = None
    try:
        with torch.random.fork_rng(devices=[device]):
            features = torch.zeros(shape, device=device)
            tokens = torch.zeros((size, positions), dtype=torch.long, device=device)
            with autocast(precision, device):
                logits = model(input_features=features, decoder_input_ids=tokens).logits
            summed, count = token_loss(logits, tokens)
            (summed / count).backward()
            del features, tokens, logits, summed, count
            torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    except torch.OutOfMemoryError:
        pass  # handled below, once the exception (and the activations it holds) is gone
    _zero_gradients(model)
    torch.cuda.empty_cache()
    return peak


class CudaMemory:
    """What the fit reads from the card; the tests hand fit_micro_batch a fake instead."""

    def __init__(self, model, precision: str) -> None:
        self.model, self.precision = model, precision
        self.device = next(model.parameters()).device

    def usable(self) -> int:
        return usable_cuda_bytes(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def step_peak(self, size: int, base: int) -> int | None:
        return measure_step(self.model, size, self.precision, base)


def fit_micro_batch(
    config, info, model, optimizer, precision: str, resumed: int | None, memory=None
) -> Choice:
    """The micro-batch this run starts with (see the module docstring), the same on all ranks.
    `resumed`: the checkpoint's micro-batch; `memory`: a CudaMemory (or a fake)."""
    requested = config.data.batch_size
    windows = loader_batch_size(requested, config.fit) * config.optim.grad_accum
    if resumed is not None:
        resumed = largest_divisor_at_most(windows, resumed)
    if requested != AUTO:
        if resumed is not None and resumed != requested:
            return Choice(resumed, windows, "kept from the checkpoint")
        return Choice(requested, windows, "set by batch_size")
    if memory is None and info.device.type != "cuda":
        size = resumed or config.fit.reference_batch_size
        reason = f"batch_size auto on {info.device.type}: the reference batch, not measured"
        if resumed is not None:
            reason = f"batch_size auto on {info.device.type}: kept from the checkpoint"
        return Choice(size, windows, reason)
    memory = memory or CudaMemory(model, precision)
    return _measure_and_agree(config, info, model.config, optimizer, memory, windows, resumed)


def _measure_and_agree(config, info, model_config, optimizer, memory, windows, resumed) -> Choice:
    margin = int(config.fit.memory_margin_gib * GIB)
    usable = memory.usable()
    base = memory.allocated()
    later = missing_optimizer_bytes(optimizer)

    def need(size: int) -> int | None:
        peak = memory.step_peak(size, base)
        return None if peak is None else peak + later

    size, needs = search_micro_batch(windows, usable - margin, need, resumed)
    sizes = distributed.gather_objects(info, size)
    measured = ", ".join(
        f"{s}: {'out of memory' if n is None else f'{n / GIB:.1f} GiB'}"
        for s, n in sorted(needs.items())
    )
    shape = f"{window_frames(model_config)} frames x {model_config.max_target_positions} positions"
    if any(s is None for s in sizes):
        raise CannotFit(
            f"batch_size auto: no micro-batch fits on rank(s) "
            f"{[r for r, s in enumerate(sizes) if s is None]}; this rank measured {measured} "
            f"at {shape} against {usable / GIB:.1f} GiB usable less a {margin / GIB:.1f} GiB "
            "margin (freeze the encoder or lower the margin)"
        )
    chosen = min(sizes)
    source = f"from the checkpoint's {resumed}, " if resumed is not None else ""
    reason = (
        f"batch_size auto, {source}measured at {shape}: needs {measured} (optimiser state "
        f"still to come included: {later / GIB:.1f} GiB); {usable / GIB:.1f} GiB usable, "
        f"{margin / GIB:.1f} GiB margin"
    )
    if chosen != size:
        reason += f"; another rank fits only {chosen}"
    return Choice(chosen, windows, reason)


# --- one optimiser step in micro-batches ------------------------------------------------------

Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # features, decoder inputs, labels


@dataclass
class MicroBatch:
    features: torch.Tensor
    inputs: torch.Tensor
    labels: torch.Tensor
    index: int
    accumulation: int  # micro-batches in this step

    @property
    def last(self) -> bool:
        return self.index == self.accumulation - 1


def split_micro_batches(
    parts: Sequence[Part], size: int, pad_id: int, loader_batch: int
) -> list[Part | None]:
    """The step's windows, in order, cut into micro-batches of `size` windows.

    The cut is made on the windows the step would hold if every loader batch were full
    (`loader_batch` each), so every rank gets the same number of micro-batches even when the
    last batches of an epoch are short; a micro-batch whose windows are all missing is None.
    A micro-batch that spans loader batches pads their token rows to the longest (inputs with
    `pad_id`, labels with the ignored label); one that is exactly a loader batch is that batch
    untouched (so `--batch-size N` trains exactly as it did before micro-batches were split).
    """
    if any(part[0].shape[0] > loader_batch for part in parts):
        raise ValueError(f"a loader batch holds more than {loader_batch} windows")
    slots = len(parts) * loader_batch
    if slots % size:
        raise ValueError(f"{slots} windows do not split into micro-batches of {size}")
    chunks: list[Part | None] = []
    for start in range(0, slots, size):
        pieces: dict[int, list[int]] = {}
        for slot in range(start, start + size):
            p, r = divmod(slot, loader_batch)
            if r < parts[p][0].shape[0]:
                pieces.setdefault(p, []).append(r)
        if not pieces:
            chunks.append(None)
        elif len(pieces) == 1:
            ((p, taken),) = pieces.items()
            lo, hi = taken[0], taken[-1] + 1
            whole = lo == 0 and hi == parts[p][0].shape[0]
            chunks.append(parts[p] if whole else tuple(t[lo:hi] for t in parts[p]))
        else:
            chunks.append(
                _joined(
                    [tuple(t[r[0] : r[-1] + 1] for t in parts[p]) for p, r in pieces.items()],
                    pad_id,
                )
            )
    return chunks


def _joined(selected: list[Part], pad_id: int) -> Part:
    length = max(inputs.shape[1] for _, inputs, _ in selected)
    return (
        torch.cat([f for f, _, _ in selected]),
        torch.cat([_pad(i, length, pad_id) for _, i, _ in selected]),
        torch.cat([_pad(lab, length, IGNORE_INDEX) for _, _, lab in selected]),
    )


def _pad(tokens: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tokens, (0, length - tokens.shape[1]), value=value)


Forward = Callable[[MicroBatch], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Backward = Callable[[torch.Tensor, MicroBatch], None]


class Accumulator:
    """Runs one optimiser step's forward/backward passes at the current micro-batch; on an
    agreed out-of-memory error, halves it and redoes the step (the module docstring's limits).

    `forward(micro)` returns (loss to backpropagate, summed token loss, token count);
    `backward(loss, micro)` backpropagates it. Returns the step's summed loss and token count.
    """

    def __init__(self, choice: Choice, info, ddp, model, pad_id: int, logger, oom_at_step=None):
        self.choice, self.info, self.ddp, self.model = choice, info, ddp, model
        self.pad_id, self.logger = pad_id, logger
        self.fallbacks: list[tuple[int, int]] = []  # (step, micro-batch after it)
        self._step = 0
        self._current: MicroBatch | None = None  # what the debug hook looks at
        self._oom_at_step = oom_at_step if info.is_main else None
        if self._oom_at_step is not None:
            model.register_forward_pre_hook(self._debug_out_of_memory)

    @property
    def micro_batch(self) -> int:
        return self.choice.micro_batch

    def run(self, step: int, parts: Sequence[Part], forward: Forward, backward: Backward):
        self._step = step
        rng = _capture_rng(self.info.device)
        while True:
            totals = self._attempt(parts, forward, backward)
            if totals is not None:
                return totals
            self._fall_back(step)
            _restore_rng(rng, self.info.device)  # the redone step draws the same dropout

    def _attempt(self, parts, forward, backward):
        loader_batch = self.choice.windows // len(parts)
        chunks = split_micro_batches(parts, self.micro_batch, self.pad_id, loader_batch)
        summed_total, tokens_total = 0.0, 0
        for index, chunk in enumerate(chunks):
            # A micro-batch with no windows (short batches at an epoch's end) still runs, on one
            # window at zero weight: every rank must go through the same passes (DDP's
            # all-reduce is in the last; the out-of-memory agreement follows each).
            empty = chunk is None
            features, inputs, labels = tuple(t[:1] for t in parts[0]) if empty else chunk
            micro = MicroBatch(features, inputs, labels, index, len(chunks))
            synced = micro.last or self.ddp is self.model
            with nullcontext() if synced else self.ddp.no_sync():
                failed, loss = False, None
                self._current = micro
                try:
                    loss, summed, count = forward(micro)
                    if empty:
                        loss, summed, count = loss * 0.0, summed * 0.0, count * 0
                except torch.OutOfMemoryError:
                    failed = True
                self._current = None
                if micro.last and distributed.any_rank(self.info, failed):
                    self._abort(reset_ddp=self.ddp is not self.model)
                    return None
                if not failed:
                    try:
                        backward(loss, micro)
                    except torch.OutOfMemoryError:
                        if micro.last and self.info.enabled:
                            raise CannotFit(
                                f"step {self._step}: out of memory in the backward of the last "
                                "micro-batch, while DDP all-reduces the gradients: this cannot "
                                "be retried on one rank alone. Resume from the last checkpoint "
                                "(batch_size auto measures again there; a larger "
                                "fit.memory_margin_gib makes it choose smaller)."
                            ) from None
                        failed = True
                    loss = None
                if not failed:
                    # Summed as tensors: no host sync per micro-batch for the log's figures.
                    summed_total = summed_total + summed.detach()
                    tokens_total = tokens_total + count
            # The last micro-batch's own failure here can only be a single process's backward.
            if failed if micro.last else distributed.any_rank(self.info, failed):
                self._abort(reset_ddp=False)
                return None
        return float(summed_total), int(tokens_total)

    def _abort(self, reset_ddp: bool) -> None:
        """Drop the step's partial gradients; after a synchronised forward that some ranks
        finished and others did not, bring DDP's reducer back to the same state everywhere."""
        _zero_gradients(self.model)
        if reset_ddp:
            self._reset_reducer()
        if self.info.device.type == "cuda":
            torch.cuda.empty_cache()

    def _reset_reducer(self) -> None:
        # A rank whose synchronised forward completed expects its backward: its next backward,
        # even under no_sync, would all-reduce alone and hang the others. One synchronised
        # forward and backward of a single zero window on every rank settles it; the gradients
        # it all-reduces are zeroed again.
        config = self.model.config
        device = self.info.device
        features = torch.zeros((1, config.num_mel_bins, window_frames(config)), device=device)
        tokens = torch.zeros((1, 1), dtype=torch.long, device=device)
        logits = self.ddp(input_features=features, decoder_input_ids=tokens).logits
        (logits.float().sum() * 0.0).backward()
        _zero_gradients(self.model)

    def _fall_back(self, step: int) -> None:
        old = self.choice.micro_batch
        if old == 1:
            raise CannotFit(
                f"step {step}: out of memory at micro-batch 1 on at least one rank: not even "
                "one window fits (freeze the encoder, or free the card)"
            )
        new = largest_divisor_at_most(self.choice.windows, old // 2)
        self.choice = Choice(new, self.choice.windows, f"halved at step {step} after OOM")
        self.fallbacks.append((step, new))
        self.logger.warning(
            "step %d: out of memory on at least one rank at micro-batch %d: redoing the step "
            "from the same %d windows per rank at micro-batch %d x accumulation %d",
            step,
            old,
            self.choice.windows,
            new,
            self.choice.accumulation,
        )

    def _debug_out_of_memory(self, module, args) -> None:
        micro = self._current
        if self._step == self._oom_at_step and micro is not None and micro.last:
            self._oom_at_step = None  # once: the redone step goes through
            raise torch.OutOfMemoryError("debug hook: " + OOM_HOOK)


def _zero_gradients(model) -> None:
    # In place: under DDP the gradients are views into its buckets and must stay there.
    for param in model.parameters():
        if param.grad is not None:
            param.grad.zero_()


def _capture_rng(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _restore_rng(states: tuple, device: torch.device) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
