"""The training loop, top to bottom: setup / train / evaluate / save_checkpoint / cleanup.

One process per device (torchrun), or a single plain process. Everything a resumed run needs
to continue bit-exactly (weights, AdamW moments, scaler, scheduler, RNG states of every rank,
the data position) goes into each checkpoint; see checkpoint.py for the layout.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from shard_builder import contract
from shard_builder.storage import ShardFetchError
from trainer.config import TrainConfig, write_config
from trainer.data.loader import TrainData, check_split, pad_features_to_full
from trainer.data.packing import PackedTrainData, WindowTargets, window_features_to_full
from trainer.evaluate import HFDecoder, evaluate_split
from trainer.model import decoder_inputs_and_labels, load_model, token_loss, window_frames
from trainer.runtime import checkpoint as ckpt
from trainer.runtime import distributed, elastic, fit, gpu, preemption
from trainer.runtime.distributed import Dist
from trainer.runtime.memory_phases import PhasePeaks
from trainer.runtime.optim import (
    TrainingDiverged,
    autocast,
    build_optimizer,
    build_scheduler,
    check_overflow,
    is_sharded,
    make_scaler,
    optimizer_checkpoint_state,
    parameter_names,
    resolve_precision,
    restore_optimizer,
    warmup_warning,
)
from trainer.watch import sysmetrics
from trainer.watch.metrics import RunLogger, format_report

# Test hooks (read once at setup): make rank 0's loss infinite on the first attempt at the given
# optimiser step, or SIGKILL rank 0 half-way through the given step.
INF_HOOK = "TRAINER_DEBUG_INF_AT_STEP"
KILL_HOOK = "TRAINER_DEBUG_KILL_AT_STEP"


@dataclass
class TrainState:
    """The counters a checkpoint restores. `epoch`/`batch_in_epoch` name the next batch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int = -1
    skipped_steps: int = 0
    consecutive_skips: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0


@dataclass
class Run:
    config: TrainConfig
    info: Dist
    run_dir: Path
    logger: RunLogger
    model: Any  # the unwrapped WhisperForConditionalGeneration (save, generate)
    ddp: Any  # what the forward goes through: DDP(model), or the model itself
    processor: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    precision: str
    train_data: TrainData
    eval_dir: Path
    window_frames: int  # what every batch is padded to: the encoder's input length
    total_steps: int
    state: TrainState
    hooks: dict[str, int]
    fit: fit.Accumulator  # one optimiser step in micro-batches that fit the card
    stop: preemption.Stopper | None = None  # signal handlers and the clock, while training


def main(config: TrainConfig) -> int:
    preemption.forget_last_stop(config.output_dir)
    try:
        run = setup(config)
    except (ValueError, ShardFetchError) as error:  # shards that do not fit or cannot be
        # fetched, a resume that cannot be exact, ...
        print(f"error: {error}", flush=True)
        distributed.cleanup_distributed()
        return 2
    try:
        return train(run)  # 0, or preemption.EXIT_STOPPED after a stop on a signal
    except TrainingDiverged as error:
        run.logger.logger.error("%s", error)
        return 3
    finally:
        cleanup(run)


# --- setup ------------------------------------------------------------------------------------


def setup(config: TrainConfig) -> Run:
    allocator = gpu.configure_allocator()  # before anything initialises CUDA
    info = distributed.setup_distributed(config.device)
    run_dir = Path(config.output_dir)
    logger = RunLogger(run_dir, info.rank, config.log, config.to_dict())
    _quiet_transformers()
    logger.info("rank %d of %d on %s", info.rank, info.world_size, info.device)
    if info.device.type == "cuda" and info.is_main:
        logger.info("CUDA allocator: %s", allocator)

    model, processor = load_model(config.model)
    tokenizer = processor.tokenizer
    fingerprint = contract.tokenizer_fingerprint(tokenizer.get_vocab())
    # Shards at a URL are fetched into the local cache first (one download per machine).
    fetch_progress = info.is_main and config.log.progress
    train_dir = config.data.local_split_dir(config.data.train_dir(), fetch_progress)
    eval_dir = config.data.local_split_dir(config.data.eval_dir(), fetch_progress)
    # Refuse shards made for another model before any step is taken on them.
    n_mels, frames = model.config.num_mel_bins, window_frames(model.config)
    check_split(train_dir, n_mels, fingerprint, frames)
    check_split(eval_dir, n_mels, fingerprint, frames)

    latest = ckpt.latest_checkpoint(run_dir) if config.checkpoint.resume else None
    if info.is_main:
        ckpt.remove_temporaries(run_dir)
    rng_states = training = None
    if latest is not None:  # read first: on another number of GPUs it sets grad_accum
        training, rng_states = ckpt.load_training_files(latest)
        config = elastic.resume_config(config, training, info.world_size, logger, latest)

    precision = resolve_precision(config.optim.precision, info.device)
    train_data = make_train_data(config, train_dir, info, tokenizer, frames, model.config)
    if info.is_main:
        logger.info("%s", train_data.describe(0))
    per_epoch = train_data.batches_per_epoch() // config.optim.grad_accum
    if per_epoch < 1 and config.optim.max_steps == 0:
        raise ValueError("an epoch holds fewer batches than grad_accum: set max_steps")
    total_steps = config.optim.max_steps or math.ceil(config.optim.epochs * per_epoch)
    if info.is_main and (warning := warmup_warning(config.optim.warmup_steps, total_steps)):
        logger.warning("%s", warning)

    state = TrainState()
    if latest is not None:
        _check_same_data_order(training["data_signature"], train_data.order_signature(), latest)
        ckpt.load_model_weights(model, latest)
        state = TrainState(**{k: training[k] for k in asdict(TrainState())})
        state.batch_in_epoch = elastic.local_batch_in_epoch(training, info.world_size)
        logger.info(
            "resuming from %s: step %d, epoch %d, batch %d of the epoch",
            latest,
            state.step,
            state.epoch,
            state.batch_in_epoch,
        )
    elif info.is_main:
        logger.info("starting a new run in %s", run_dir)

    model.to(info.device)
    model.train()
    ddp = wrap_for_ddp(model, info) if info.enabled else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(
        trainable, config.optim, info.device, config.optim.zero1 and info.enabled
    )
    scheduler = build_scheduler(optimizer, config.optim, total_steps)
    scaler = make_scaler(precision, info.device)
    if latest is not None:
        names = parameter_names(optimizer, model)
        sharded = is_sharded(optimizer)
        saved = ckpt.load_optimizer_state(latest, info.rank, info.world_size, sharded, names)
        restore_optimizer(optimizer, *saved)
        scheduler.load_state_dict(training["scheduler"])
        if scaler is not None and training.get("scaler"):
            scaler.load_state_dict(training["scaler"])
        # Last, so nothing above draws from the restored streams.
        restore = rng_states[info.rank % len(rng_states)]
        ckpt.restore_rng(restore, info.device)
    else:
        random.seed(config.seed + info.rank)
        np.random.seed(config.seed + info.rank)
        torch.manual_seed(config.seed + info.rank)
    resumed_micro_batch = training.get("micro_batch_size") if training else None
    choice = fit.fit_micro_batch(config, info, model, optimizer, precision, resumed_micro_batch)

    if info.is_main:
        write_config(config, run_dir / "config.json")
        logger.info(
            "%s: %.1fM parameters (%.1fM trainable), precision %s, %d rank(s) x batch %d x "
            "accumulation %d = %d samples per step; %d batches per epoch per rank, %d steps",
            config.model.name_or_path,
            sum(p.numel() for p in model.parameters()) / 1e6,
            sum(p.numel() for p in trainable) / 1e6,
            precision,
            info.world_size,
            choice.micro_batch,
            choice.accumulation,
            info.world_size * choice.windows,
            train_data.batches_per_epoch(),
            total_steps,
        )
        logger.info("batch: %s", choice.describe(info.world_size))
    names = (INF_HOOK, KILL_HOOK, fit.OOM_HOOK)
    hooks = {name: int(os.environ[name]) for name in names if name in os.environ}
    return Run(
        config,
        info,
        run_dir,
        logger,
        model,
        ddp,
        processor,
        optimizer,
        scheduler,
        scaler,
        precision,
        train_data,
        eval_dir,
        frames,
        total_steps,
        state,
        hooks,
        fit.Accumulator(
            choice, info, ddp, model, model.config.pad_token_id, logger, hooks.get(fit.OOM_HOOK)
        ),
    )


def wrap_for_ddp(model: torch.nn.Module, info) -> DistributedDataParallel:
    """DDP whose gradients live in its all-reduce buckets instead of beside them: one fp32
    copy of the gradients per GPU, not two (3 GiB less per GPU for turbo).

    DDP turns only gradients that exist when it is built into bucket views; one first created
    under no_sync is an ordinary tensor beside the bucket until a synchronised backward. So
    they are created here, as zeros, and zero_gradients keeps them in place.
    """
    for param in model.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def zero_gradients(optimizer, under_ddp: bool) -> None:
    """Under DDP the gradients are views into its all-reduce buckets: zeroed in place they stay
    there; set to None, the next accumulation (under no_sync) would allocate a second copy."""
    optimizer.zero_grad(set_to_none=not under_ddp)


def make_train_data(config, split: Path, info, tokenizer, frames: int, model_config):
    """Samples one by one (TrainData) or packed into full windows (PackedTrainData)."""
    data = fit.loader_data_config(config)  # batch_size auto: the reference batch
    # Page-locked batches only help a copy to a GPU: key on the run's device, not on whether
    # some GPU exists.
    data = replace(data, pin_memory=data.pin_memory and info.device.type == "cuda")
    if not config.data.pack:
        return TrainData(split, data, info.rank, info.world_size, config.optim.grad_accum)
    targets = WindowTargets(
        tokenizer, config.model.language, config.model.task, model_config.max_target_positions
    )
    progress = info.is_main and config.log.progress
    cache = Path(config.output_dir) / "pack-index"
    rank, world, accum = info.rank, info.world_size, config.optim.grad_accum
    return PackedTrainData(split, data, rank, world, targets, frames, progress, cache, accum)


def model_inputs(batch: dict, device: torch.device, window: int, pad_id: int):
    """(input features [B, n_mels, window], decoder inputs, labels) on the device."""
    features = batch["features"].to(device, non_blocking=True)
    if "unlabelled" in batch:  # packed windows
        features = window_features_to_full(features, window)
    else:
        features = pad_features_to_full(features, batch["pad_values"], window, batch["num_frames"])
    inputs, labels = decoder_inputs_and_labels(
        batch["tokens"].to(device), pad_id, batch.get("unlabelled")
    )
    return features, inputs, labels


def _check_same_data_order(saved: dict, current: dict, folder: Path) -> None:
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differing:
        raise ValueError(
            f"{folder} was written with a different data order ({', '.join(differing)} "
            "changed), so its data position means other samples here. Resume with the same "
            "shards, data streams, global batch (ranks x grad_accum), batch size, bucket buffer "
            "and seed (the number of GPUs may change, see trainer/runtime/elastic.py), or start a "
            "new run folder."
        )


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generate() warns on every eval batch otherwise
    hf_logging.disable_progress_bar()  # save_pretrained's bar would cut through ours


# --- train ------------------------------------------------------------------------------------


def batch_stream(train_data: TrainData, epoch: int, start_batch: int):
    """(epoch, batch index, batches in that epoch, batch) from a data position on, across
    epoch boundaries (packed epochs differ in length)."""
    while True:
        per_epoch = train_data.batches_per_epoch(epoch)
        for index, batch in enumerate(train_data.batches(epoch, start_batch), start_batch):
            yield epoch, index, per_epoch, batch
        epoch, start_batch = epoch + 1, 0


def train(run: Run) -> int:
    config, info, state = run.config, run.info, run.state
    stop = run.stop = preemption.Stopper(config.checkpoint, info, run.logger, run.run_dir)
    accum = config.optim.grad_accum
    stream = batch_stream(run.train_data, state.epoch, state.batch_in_epoch)
    pad_id = run.model.config.pad_token_id
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    max_norm = config.optim.max_grad_norm if config.optim.max_grad_norm > 0 else float("inf")
    sample_log = _open_sample_log(run) if config.log.sample_log else None
    window = _Window()
    monitor = sysmetrics.SystemMonitor(
        config.system, info, run.run_dir, run.eval_dir, config.data.num_workers
    )
    bar = _progress_bar(run)
    started = time.perf_counter()
    start_step = state.step
    peaks = PhasePeaks(run.run_dir, info.rank, info.device, session_start=state.step)

    def forward(micro: fit.MicroBatch):
        with autocast(run.precision, info.device):
            logits = run.ddp(input_features=micro.features, decoder_input_ids=micro.inputs).logits
        summed, count = token_loss(logits, micro.labels)
        loss = summed / count.clamp(min=1) / micro.accumulation
        first_attempt = state.consecutive_skips == 0  # a skipped step is tried again
        hooked = run.hooks.get(INF_HOOK) == state.step + 1
        if micro.last and info.is_main and first_attempt and hooked:
            loss = loss * float("inf")  # test hook: an overflow on one rank only
        return loss, summed, count

    def backward(loss: torch.Tensor, micro: fit.MicroBatch) -> None:
        (run.scaler.scale(loss) if run.scaler else loss).backward()
        if micro.index == 0 and info.is_main and run.hooks.get(KILL_HOOK) == state.step + 1:
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die mid-step

    if config.eval.eval_at_start and state.step == 0:
        with peaks.phase("evaluation", state.step):
            evaluate(run)

    while state.step < run.total_steps:
        step_started = time.perf_counter()
        parts, keys = [], []
        for _ in range(accum):  # one optimiser step's loader batches, split by run.fit
            waited = time.perf_counter()
            # DataLoader draws its worker seed from the global torch RNG whenever an epoch's
            # loader starts; fork so dropout's stream does not depend on where a run resumed.
            with torch.random.fork_rng(devices=[]):
                epoch, index, per_epoch, batch = next(stream)
            window.data_wait += time.perf_counter() - waited
            keys.extend(batch["keys"])
            parts.append(model_inputs(batch, info.device, run.window_frames, pad_id))
        loss_sum, tokens = run.fit.run(state.step + 1, parts, forward, backward)
        samples = len(keys)
        # The position of the next batch is what a checkpoint after this step must restore.
        state.epoch, state.batch_in_epoch = (
            (epoch + 1, 0) if index + 1 >= per_epoch else (epoch, index + 1)
        )

        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)  # clip the true gradients, not scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        # Gradients are all-reduced, so every rank sees the same norm; the explicit all-reduce
        # of the flag makes the skip decision identical even if that ever stopped being true.
        # The same all-reduce agrees on a stop (a signal on any rank) and on the clock.
        found_inf = stop.agree(state.step + 1, not bool(torch.isfinite(grad_norm)))
        if run.scaler is not None:
            run.scaler.step(run.optimizer)  # skips the update itself when it saw inf/NaN
            run.scaler.update()
        elif not found_inf:
            run.optimizer.step()
        zero_gradients(run.optimizer, under_ddp=run.ddp is not run.model)
        # A skipped step is not a step: neither the schedule nor the counter moves, so
        # max_steps counts applied updates and warm-up starts at the first one (fp16 skips the
        # first few while the GradScaler finds its scale). Its batches are consumed all the same.
        if not found_inf:
            run.scheduler.step()
            state.step += 1
            peaks.step_done(state.step)
        state.consecutive_skips = state.consecutive_skips + 1 if found_inf else 0
        state.skipped_steps += int(found_inf)
        state.samples_seen += samples * info.world_size
        state.tokens_seen += tokens * info.world_size
        if found_inf:
            run.logger.warning(
                "step %d: inf/NaN gradients, optimiser step skipped and tried again with the "
                "next batches (%d skipped so far)",
                state.step + 1,
                state.skipped_steps,
            )
        if sample_log is not None:
            sample_log.write(
                json.dumps(
                    {
                        "iteration": state.step + state.skipped_steps,
                        "step": state.step,
                        "keys": keys,
                        "skipped": found_inf,
                        "loss": loss_sum / max(1, tokens),
                    }
                )
                + "\n"
            )
        scale = run.scaler.get_scale() if run.scaler is not None else None
        check_overflow(state.step + int(found_inf), state.consecutive_skips, scale, config.optim)

        step_seconds = time.perf_counter() - step_started
        window.add(loss_sum, tokens, samples, step_seconds, None if found_inf else float(grad_norm))
        if found_inf:
            continue  # the same step again: nothing below is due twice
        if bar is not None:
            bar.update(1)
        if state.step % config.log.log_every == 0 or state.step == run.total_steps:
            metrics = window.flush(info)
            metrics.update(
                lr=run.scheduler.get_last_lr()[0],
                loss_scale=scale,
                skipped_steps=state.skipped_steps,
                epoch=state.epoch,
            )
            if info.device.type == "cuda":  # the same on every rank: all join the gather
                readings = distributed.gather_objects(info, gpu.memory_reading(info.device))
                metrics.update(gpu.memory_metrics(readings))
            run.logger.scalars(state.step, metrics)
            monitor.log(state.step, metrics["data_wait_fraction"], run.logger)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
            run.logger.step_line("step %d: %s", state.step, _brief(metrics), console=bar is None)

        last = state.step == run.total_steps
        every = config.eval.eval_every
        if last or (every > 0 and state.step % every == 0 and not stop.stopping):
            with peaks.phase("evaluation", state.step):
                evaluate(run)
        save_every = config.checkpoint.save_every
        if last or (save_every > 0 and state.step % save_every == 0) or stop.checkpoint_due:
            with peaks.phase("checkpoint_write", state.step), stop.checkpointing(step_seconds):
                save_checkpoint(run)
        if stop.stopping and not last:
            break

    stream.close()
    if bar is not None:
        bar.close()
    if sample_log is not None:
        sample_log.close()
    if state.step < run.total_steps:
        return stop.stopped(state.step, ckpt.latest_checkpoint(run.run_dir))
    elapsed = time.perf_counter() - started
    steps_done = state.step - start_step
    run.logger.info(
        "done: %d steps (%d this session in %.0f s, %.2f s/step), %d skipped, %d samples seen; "
        "best %s %s at step %d; best model in %s",
        state.step,
        steps_done,
        elapsed,
        elapsed / max(1, steps_done),
        state.skipped_steps,
        state.samples_seen,
        config.eval.best_metric,
        "n/a" if state.best_metric is None else f"{100 * state.best_metric:.2f} %",
        state.best_step,
        run.run_dir / ckpt.BEST,
    )
    return 0


class _Window:
    """Sums over the steps since the last log line (local to this rank until flushed)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss = self.tokens = self.samples = self.seconds = self.data_wait = 0.0
        self.norms: list[float] = []
        self.steps = 0

    def add(
        self, loss: float, tokens: int, samples: int, seconds: float, norm: float | None
    ) -> None:
        self.loss += loss
        self.tokens += tokens
        self.samples += samples
        self.seconds += seconds
        self.steps += 1
        if norm is not None:
            self.norms.append(norm)

    def flush(self, info: Dist) -> dict[str, float]:
        loss, tokens, samples, wait = distributed.all_reduce_sum(
            info, [self.loss, self.tokens, self.samples, self.data_wait]
        )
        seconds = max(self.seconds, 1e-9)
        metrics = {
            "loss": loss / max(1.0, tokens),  # mean per target token over all ranks
            "grad_norm": sum(self.norms) / len(self.norms) if self.norms else float("nan"),
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
            "data_wait_fraction": wait / info.world_size / seconds,
            "step_seconds": seconds / max(1, self.steps),
        }
        self.reset()
        return metrics


def _brief(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float | int))


def _progress_bar(run: Run):
    if not (run.info.is_main and run.config.log.progress):
        return None
    from tqdm import tqdm

    return tqdm(
        total=run.total_steps, initial=run.state.step, unit="step", dynamic_ncols=True, desc="train"
    )


def _open_sample_log(run: Run):
    folder = run.run_dir / "debug"
    folder.mkdir(parents=True, exist_ok=True)
    return open(folder / f"samples-rank{run.info.rank}.jsonl", "a", buffering=1)


# --- evaluate ---------------------------------------------------------------------------------


def evaluate(run: Run) -> None:
    """WER on the eval split (the headline, per utterance) and, with eval.packed_eval, the packed
    timestamped figures; a new best is saved as RUN/best (a plain HF folder)."""
    from trainer.evaluate import evaluate_packed

    config, state = run.config, run.state
    decoder = HFDecoder(
        run.model, run.processor.tokenizer, config.model.language, config.model.task, run.precision
    )
    windows: list[dict] = []
    # The eval loader may draw from the global RNG too; keep training's streams untouched.
    with torch.random.fork_rng(devices=[]):
        report, utterances = evaluate_split(
            decoder,
            run.eval_dir,
            config.data,
            run.info,
            config.eval.eval_batch_size,
            config.eval.max_new_tokens,
            config.eval.beam_size,
        )
        if config.eval.packed_eval:
            packed, windows = evaluate_packed(
                decoder,
                run.eval_dir,
                run.info,
                config.eval.eval_batch_size,
                config.eval.max_new_tokens,
                config.eval.beam_size,
                limit=config.data.eval_limit,
                max_windows=config.eval.packed_eval_windows,
                gap_seconds=config.eval.packed_gap_seconds,
                language=config.model.language,
                task=config.model.task,
            )
            if report is not None:
                report.update(packed)
    metric = None
    if report is not None:
        metric = report[config.eval.best_metric]
        run.logger.info("evaluation at step %d:\n%s", state.step, format_report(report))
        names = [
            "wer_orthographic",
            "wer_normalised",
            "cer_orthographic",
            "cer_normalised",
            "real_time_factor",
        ]
        if config.eval.packed_eval:
            names += [
                "packed_wer_orthographic",
                "packed_wer_normalised",
                "segment_start_error_median_s",
                "segment_start_within_0_5s",
                "segment_start_missed",
                "packed_segments_per_utterance",
            ]
        values = {k: report[k] for k in names}
        for source, figures in report["per_source"].items():
            values[f"{source}/wer_normalised"] = figures["wer_normalised"]
        run.logger.scalars(state.step, values, kind="eval")
        folder = run.run_dir / "eval"
        folder.mkdir(exist_ok=True)
        (folder / f"step-{state.step}.json").write_text(
            json.dumps(
                {**report, "step": state.step, "utterances": utterances, "packed": windows},
                indent=1,
                ensure_ascii=False,
            )
        )
    metric = distributed.broadcast_object(run.info, metric)
    improved = (
        metric is not None
        and not math.isnan(metric)
        and (state.best_metric is None or metric < state.best_metric)
    )
    if improved and state.step > 0:
        state.best_metric, state.best_step = metric, state.step
        if run.info.is_main:
            ckpt.save_best(run.run_dir, run.model, run.processor)
            run.logger.info(
                "new best %s %.2f %% at step %d -> %s",
                config.eval.best_metric,
                100 * metric,
                state.step,
                run.run_dir / ckpt.BEST,
            )
    run.logger.evaluation(
        state.step, report, utterances, config.eval.best_metric, state.best_metric, state.best_step
    )


# --- save_checkpoint --------------------------------------------------------------------------


def save_checkpoint(run: Run) -> None:
    """Every rank writes its own share of the optimiser state (ZeRO-1); rank 0 the rest."""
    info, state = run.info, run.state
    if info.is_main and (warning := sysmetrics.checkpoint_space_warning(run.run_dir, run.model)):
        run.logger.warning("%s", warning)
    sharded = is_sharded(run.optimizer)
    rng_states = distributed.gather_objects(info, ckpt.capture_rng(info.device))
    training = run_config = None
    if info.is_main:
        training = {
            **asdict(state),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else {},
            "data_signature": run.train_data.order_signature(),
            "world_size": info.world_size,
            # the position in any world size's terms (trainer/runtime/elastic.py)
            "global_batch_in_epoch": state.batch_in_epoch * info.world_size,
            "precision": run.precision,
            # a resume starts from it (trainer/runtime/fit.py)
            "micro_batch_size": run.fit.micro_batch,
        }
        run_config = run.config.to_dict()
    optimizer_state = (
        optimizer_checkpoint_state(run.optimizer, run.model) if sharded or info.is_main else None
    )
    folder = ckpt.save_checkpoint(
        info,
        run.run_dir,
        state.step,
        run.model,
        run.processor,
        optimizer_state,
        sharded,
        training,
        rng_states,
        run_config,
    )
    if info.is_main:
        keep = {state.best_step} if state.best_step >= 0 else set()
        ckpt.prune_checkpoints(run.run_dir, run.config.checkpoint.keep_last, keep)
        run.logger.info("checkpoint written: %s", folder)
    distributed.barrier(info)  # nobody races ahead (or exits) while rank 0 prunes


# --- cleanup ----------------------------------------------------------------------------------


def cleanup(run: Run) -> None:
    run.logger.close()
    distributed.cleanup_distributed()
    if run.stop is not None:
        run.stop.restore()
