"""Stopping without losing work: a signal asks, the ranks agree, a checkpoint is written.

SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (what SLURM's `--signal` sends) only record a request.
Each rank receives a signal at its own moment (torchrun forwards the one it got to every worker a
few milliseconds apart; a SIGINT may reach one worker only), so nothing is decided when it
arrives: once per optimiser step every rank puts its request into the all-reduce the loop makes
anyway (the inf/NaN flag), and every rank reads the same answer at the same step. They finish
that step, write a checkpoint at it and exit with EXIT_STOPPED; running the same command again
resumes there. A second Ctrl-C stops at once (KeyboardInterrupt).

The same all-reduce carries rank 0's clock: with checkpoint.save_every_minutes, a checkpoint is
also due once that much wall time has passed since the last one (measured on rank 0 only, so
that the ranks cannot disagree about it).

torchrun answers SIGTERM/SIGINT by sending the same signal to its workers and SIGKILLs those
still running after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30): a step plus a
checkpoint must fit in that. The first checkpoint measures it and warns when they do not.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.runtime import distributed
from trainer.runtime.distributed import Dist

# sysexits.h EX_TEMPFAIL, "try again later": the run stopped on request with a checkpoint and the
# same command resumes it. torchrun itself returns 1 whenever a worker exits non-zero (and on a
# signal of its own); its failure report names each worker's "exitcode: 75". STOPPED_FILE tells a
# script either way.
EXIT_STOPPED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
STOPPED_FILE = "stopped.json"  # RUN/stopped.json: written on such a stop, removed when a run starts
GRACE_VARIABLE = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
DEFAULT_GRACE_S = 30.0
# Test hook "STEP:RANK:SIGNAL[:parent]": at the agreement of optimiser step STEP, rank RANK sends
# SIGNAL to itself (or to its parent, the torchrun launcher) and waits until it has arrived here.
SIGNAL_HOOK = "TRAINER_DEBUG_SIGNAL_AT_STEP"


def ignore_in_loader_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: leave stopping to the training process.

    A terminal's Ctrl-C goes to the whole foreground process group and SLURM signals every
    process of a job step, loader workers included; a worker that died of it (torch's workers
    exit on KeyboardInterrupt) would make the step's next batch fail before the checkpoint. A
    worker still exits when its training process does (torch's watchdog sees the parent go),
    and on a SIGTERM from it: multiprocessing ends the workers left at exit (after an error or a
    second Ctrl-C) with terminate(), a SIGTERM, and then waits for them.
    """
    del worker_id
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # Blocked, so that it waits for a thread that can see who sent it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from_parent, daemon=True).start()


def _exit_on_sigterm_from_parent() -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == os.getppid():
            os._exit(0)


def forget_last_stop(run_dir: str | Path) -> None:
    """Remove RUN/stopped.json as a session starts: a run that then fails (a refused resume, a
    crash) must not look stopped, or a script would requeue it for ever."""
    (Path(run_dir) / STOPPED_FILE).unlink(missing_ok=True)


def _name(number: int) -> str:
    return signal.Signals(number).name


@dataclass
class _Hook:
    step: int
    rank: int
    number: int
    to_parent: bool

    @classmethod
    def parse(cls, text: str | None) -> _Hook | None:
        if not text:
            return None
        step, rank, name, *target = text.split(":")
        return cls(int(step), int(rank), int(signal.Signals[name]), target == ["parent"])


class Stopper:
    """Signal handlers of this process and the per-step agreement; see the module docstring."""

    def __init__(self, config, info: Dist, logger, run_dir: Path) -> None:
        self.info, self.logger, self.run_dir = info, logger, Path(run_dir)
        self.interval_s = 60.0 * config.save_every_minutes
        self.received = 0  # the first signal this rank got (0: none)
        self.received_at = 0.0
        self.interrupts = 0
        self.signals = [0] * info.world_size  # as agreed at the last step boundary
        self.clock_due = False
        self.last_checkpoint = time.monotonic()
        self.grace_checked = False
        self.announced = False
        self.hook = _Hook.parse(os.environ.get(SIGNAL_HOOK))
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not the main thread: no signal handlers, a signal stops at once")
            return
        for number in SIGNALS:
            self.previous[number] = signal.signal(number, self._on_signal)

    def _on_signal(self, number: int, frame) -> None:
        del frame
        # A second Ctrl-C at torchrun reaches its workers as SIGTERM (the first one as SIGINT).
        at_once = self.interrupts > 0 and number in (signal.SIGINT, signal.SIGTERM)
        self.interrupts += number == signal.SIGINT
        if at_once:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if not self.received:
            self.received, self.received_at = number, time.time()
        again = "again" if number == signal.SIGINT else "twice"
        # os.write: a handler may run while the main thread is inside a print to stderr.
        os.write(
            2,
            f"[rank {self.info.rank}] {_name(number)} received: finishing this optimiser step, "
            f"then a checkpoint and exit (Ctrl-C {again} stops at once)\n".encode(),
        )

    def restore(self) -> None:
        """Put back the handlers found at start. After a stop, SIGTERM and SIGUSR1 are ignored
        instead: torchrun SIGTERMs the workers still running once one has exited, and the
        process is only exiting (Python resets its own handlers to the default, which kills,
        while it shuts down, but leaves an ignored signal ignored)."""
        for number, handler in self.previous.items():
            stopped = self.stopping and number != signal.SIGINT
            signal.signal(number, signal.SIG_IGN if stopped else handler)
        self.previous = {}

    # --- the per-step agreement ---------------------------------------------------------------

    def agree(self, step: int, found_inf: bool) -> bool:
        """The loop's one all-reduce per optimiser step (MAX over ranks): the inf/NaN flag, rank
        0's clock and each rank's signal. Returns the agreed inf/NaN flag."""
        self._fire_hook(step)
        clock = self.info.is_main and 0 < self.interval_s <= time.monotonic() - self.last_checkpoint
        mine = [self.received if r == self.info.rank else 0 for r in range(self.info.world_size)]
        agreed = distributed.max_over_ranks(self.info, [int(found_inf), int(clock), *mine])
        self.clock_due, self.signals = bool(agreed[1]), agreed[2:]
        if self.received and any(self.signals) and not self.announced:
            self.announced = True
            self.logger.warning(
                "%s received at %s; stopping after optimiser step %d with a checkpoint",
                _name(self.received),
                time.strftime("%H:%M:%S", time.localtime(self.received_at)),
                step,
            )
        return bool(agreed[0])

    @property
    def stopping(self) -> bool:
        """Agreed on every rank: finish this step, checkpoint, exit."""
        return any(self.signals)

    @property
    def checkpoint_due(self) -> bool:
        return self.stopping or self.clock_due

    @contextmanager
    def checkpointing(self, step_seconds: float):
        """Around every checkpoint write: restarts the clock; the first one checks that a step
        plus a write fit in torchrun's grace period."""
        started = time.monotonic()
        yield
        self.last_checkpoint = time.monotonic()
        if not self.grace_checked:
            self.grace_checked = True
            warning = grace_warning(step_seconds, self.last_checkpoint - started)
            if warning and self.info.is_main:
                self.logger.warning("%s", warning)

    def stopped(self, step: int, folder: Path | None) -> int:
        """Say what happened and how to go on (rank 0: the log and RUN/stopped.json)."""
        by_rank = {r: _name(n) for r, n in enumerate(self.signals) if n}
        if self.info.is_main:
            record = {
                "step": step,
                "signals": {f"rank {r}": name for r, name in by_rank.items()},
                "checkpoint": str(folder),
                "exit_code": EXIT_STOPPED,
                "stopped_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (self.run_dir / STOPPED_FILE).write_text(json.dumps(record, indent=1) + "\n")
            received = ", ".join(f"{name} on rank {r}" for r, name in by_rank.items())
            self.logger.info(
                "stopped at step %d (%s); checkpoint %s. To resume, run the same command "
                "again. Exit code %d.",
                step,
                received,
                folder,
                EXIT_STOPPED,
            )
        return EXIT_STOPPED

    def _fire_hook(self, step: int) -> None:
        hook = self.hook
        if hook is None or hook.step != step or hook.rank != self.info.rank:
            return
        self.hook = None
        os.kill(os.getppid() if hook.to_parent else os.getpid(), hook.number)
        deadline = time.monotonic() + 30
        while not self.received and time.monotonic() < deadline:  # torchrun forwards it
            time.sleep(0.01)


def grace_warning(
    step_seconds: float, write_seconds: float, environ: dict[str, str] | None = None
) -> str | None:
    """A warning when a step plus a checkpoint write outlast torchrun's shutdown grace period."""
    environ = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in environ:  # not under torchrun
        return None
    grace = float(environ.get(GRACE_VARIABLE, DEFAULT_GRACE_S))
    needed = step_seconds + write_seconds
    if needed <= grace:
        return None
    return (
        f"one optimiser step ({step_seconds:.1f} s) plus a checkpoint write ({write_seconds:.1f} s)"
        f" take {needed:.1f} s, longer than torchrun waits after forwarding a SIGTERM or Ctrl-C "
        f"({grace:.0f} s) before it SIGKILLs the workers: a stop on a signal would lose the "
        f"checkpoint. Set {GRACE_VARIABLE}={int(needed * 2) + 1} (or torchrun --shutdown-timeout)."
    )
