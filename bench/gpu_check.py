"""The GPU path proven on whatever GPU is at hand, in one run: `bash bench/gpu_check.sh`.

With CUDA: turbo's shape (config/models/whisper-large-v3-turbo/config.json, random weights, the
tiny preset's tokenizer) on shards built from demo/corpus at 128 mel bins and 30 s windows; the
real trainer (`python -m torch.distributed.run --nproc_per_node 2 -m trainer`) with its defaults
(packed, fp16 + GradScaler, ZeRO-1, accumulation 12, gradient checkpointing; micro-batch
GPU_CHECK_BATCH_SIZE, default `auto`) as two ranks sharing the GPU over gloo, each capped at a
16 GB card's memory (TRAINER_MEMORY_FRACTION, trainer/runtime/gpu_sharing.py); a few steps, an
evaluation and a checkpoint, rank 0 SIGKILLed mid-step (TRAINER_DEBUG_KILL_AT_STEP), a resume to
the end with another evaluation and checkpoint; the peak memory of every phase and rank
(RUN/memory/, trainer/runtime/memory_phases.py) beside `trainer.plan`'s prediction; then
bench/bench_gpu.py: windows/s and MFU of the project's step against Hugging Face's
Seq2SeqTrainer, and utterances/s from the plan's utterances per window.

Without CUDA: the same sequence on the CPU with the tiny preset (config/demo-tiny.toml,
config/models/tiny-whisper-de; ZeRO-1 and gradient checkpointing on, accumulation 2), so that the
script cannot rot; no memory figures (there is no CUDA allocator to read).

Writes WORK/summary.json (printed at the end) and exits 1 when any phase fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY = REPO / "config" / "models" / "tiny-whisper-de"
TURBO_CONFIG = REPO / "config" / "models" / "whisper-large-v3-turbo" / "config.json"
DEMO_CORPUS = REPO / "demo" / "corpus"
GIB = 2**30

MAX_STEPS, SAVE_EVERY, KILL_AT = 4, 2, 3  # checkpoint at 2, killed in 3, resumed to 4
PLANNED_GPU = "rtx-4060-ti-16gb"  # the card each rank is held to
PHASES = ("first_step", "training_step", "evaluation", "checkpoint_write")
PHASES += ("first_step_after_resume",)


# --- the pieces -------------------------------------------------------------------------------


def turbo_shaped_model(folder: Path) -> Path:
    """A model folder without weights: turbo's config.json, the tiny preset's tokenizer and
    generation config, a 128-bin 30 s feature extractor. The trainer initialises it randomly
    (model.load_model: a folder without weights), the shard builder reads its bins and tokenizer.
    The tokenizer has the pre-v3 layout (ids up to 51864); turbo's 51866 embedding rows hold it."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(TINY, folder)
    shutil.copy(TURBO_CONFIG, folder / "config.json")
    extractor = {"feature_size": 128, "chunk_length": 30, "n_samples": 480000}
    extractor["nb_max_frames"] = 3000
    for name, section in (
        ("preprocessor_config.json", None),
        ("processor_config.json", "feature_extractor"),  # transformers 5 reads this one first
    ):
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            (config[section] if section else config).update(extractor)
            path.write_text(json.dumps(config, indent=2))
    return folder


def memory_fraction(total_bytes: int, card_gib: float, context_gib: float) -> float:
    """Share of this device's memory that leaves a rank what PyTorch's allocator gets on a
    `card_gib` card once the CUDA context (`context_gib`, as trainer.plan assumes) is taken."""
    usable = (card_gib - context_gib) * GIB
    if usable <= 0 or usable > total_bytes:
        raise ValueError(
            f"a {card_gib:g} GiB card does not fit in this {total_bytes / GIB:.1f} GiB device"
        )
    return usable / total_bytes


def trainer_flags(cuda: bool, model: Path, shards: Path, batch: str) -> list[str]:
    """Settings of both trainer runs (and of the plan): the defaults on CUDA, the tiny preset on
    the CPU; short runs either way."""
    common = ["--model", str(model), "--shards", str(shards), "--batch-size", batch]
    common += ["--max-steps", str(MAX_STEPS), "--save-every", str(SAVE_EVERY)]
    common += ["--eval-every", str(SAVE_EVERY), "--warmup-steps", "0", "--keep-last", "3"]
    common += ["--num-workers", "1", "--log-every", "1", "--progress", "false"]
    common += ["--tensorboard", "false", "--eval-limit", "16", "--packed-eval-windows", "4"]
    if cuda:  # everything else as config/turbo-2x16gb.toml (the built-in defaults)
        return common + ["--device", "cuda"]
    return [
        "--config",
        str(REPO / "config" / "demo-tiny.toml"),
        *common,
        "--device",
        "cpu",
        "--zero1",
        "true",
        "--gradient-checkpointing",
        "true",
        "--grad-accum",
        "2",
        "--bucket-buffer",
        "16",
        "--eval-batch-size",
        "8",
        "--max-new-tokens",
        "8",
    ]


def torchrun(port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] + [
        "--master_port",
        str(port),
        "-m",
        "trainer",
    ]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def batch_in_log(output: str) -> int | None:
    """The micro-batch the trainer ran with, from its setup line ("... x batch 2 x accumulation
    12 ..."): with `--batch-size auto` only the trainer knows it."""
    found = re.findall(r"rank\(s\) x batch (\d+) x accumulation", output)
    return int(found[-1]) if found else None


def measured_peaks(records: dict[int, list[dict]]) -> dict[str, dict]:
    """phase -> the largest allocated and reserved bytes over ranks and occurrences, with the
    rank and step that set it."""
    peaks: dict[str, dict] = {}
    for rank, lines in records.items():
        for line in lines:
            best = peaks.get(line["phase"])
            if best is None or line["allocated"] > best["allocated"]:
                peaks[line["phase"]] = {
                    "allocated": line["allocated"],
                    "reserved": max(line["reserved"], (best or {}).get("reserved", 0)),
                    "rank": rank,
                    "step": line["step"],
                }
            else:
                best["reserved"] = max(best["reserved"], line["reserved"])
    return peaks


def beside_plan(measured: dict[str, dict], plan: dict | None) -> list[dict]:
    """One row per phase: measured peak (allocated, reserved) beside the plan's allocated peak
    (its totals add a fragmentation margin and the CUDA context on top)."""
    rows = []
    for phase in PHASES:
        got = measured.get(phase)
        planned_name = "training_step" if phase == "first_step" else phase
        planned = (plan or {}).get("phases", {}).get(planned_name)
        row = {"phase": phase, "planned_as": planned_name}
        if got:
            row["measured_allocated_gib"] = round(got["allocated"] / GIB, 3)
            row["measured_reserved_gib"] = round(got["reserved"] / GIB, 3)
            row["rank"], row["step"] = got["rank"], got["step"]
        if planned:
            row["planned_allocated_gib"] = round(planned["allocated"] / GIB, 3)
            row["planned_total_gib"] = round(planned["total"] / GIB, 3)
        if got and planned:
            row["measured_over_planned"] = round(got["allocated"] / planned["allocated"], 3)
        rows.append(row)
    return rows


def last_json_line(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def trainer_throughput(run_dir: Path) -> dict | None:
    """The real trainer's own utterances/s (metrics.jsonl, last training row): two ranks
    sharing one GPU over gloo, so a check that it runs, not a speed figure."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [row for row in rows if row.get("kind") == "train"]
    if not train:
        return None
    last = train[-1]
    return {k: last.get(k) for k in ("step", "samples_per_s", "step_seconds", "loss_scale")}


# --- running phases ---------------------------------------------------------------------------


class Check:
    def __init__(self, work: Path, timeout_scale: float) -> None:
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.timeout_scale = timeout_scale
        self.started = time.monotonic()
        self.phases: list[dict] = []

    def run(self, name: str, command: list[str], env: dict, timeout: float) -> tuple[int, str]:
        """Run one phase in its own process group; its output goes to WORK/logs/NAME.log."""
        began = time.monotonic()
        print(f"[{began - self.started:6.0f} s] {name}: {' '.join(command[:6])} ...", flush=True)
        log = self.logs / f"{name}.log"
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = process.communicate(timeout=timeout * self.timeout_scale)
            code = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            output += f"\n[gpu_check] timed out after {timeout * self.timeout_scale:.0f} s\n"
            code = 124
        log.write_text(output)
        self.phases.append(
            {"name": name, "seconds": round(time.monotonic() - began, 1), "returncode": code}
        )
        return code, output

    def verdict(self, ok: bool, why: str = "") -> bool:
        """Record whether the last phase passed; a failure prints the end of its log."""
        phase = self.phases[-1]
        phase["ok"] = ok
        if not ok:
            phase["why"] = why
        mark = "ok" if ok else f"FAILED: {why}"
        print(f"         {phase['name']}: {mark} ({phase['seconds']} s)")
        log = self.logs / f"{phase['name']}.log"
        if not ok and log.is_file():
            tail = log.read_text().splitlines()[-30:]
            print(f"         last lines of {log}:\n" + "\n".join("           " + t for t in tail))
        return ok


def sequence(check: Check, cuda: bool, batch: str, summary: dict) -> bool:
    """Every phase in order; False at the first that fails."""
    env, model = environment(cuda, summary)
    shards, run_dir = check.work / "shards", check.work / "run"
    if not build_shards(check, env, model, shards):
        return False
    used = train_kill_resume(check, cuda, env, model, shards, run_dir, batch)
    if used is False:
        return False
    summary["batch_size"] = used
    summary["trainer_throughput"] = trainer_throughput(run_dir)
    predicted = planned(check, cuda, env, model, shards, str(used or batch), summary)
    if predicted is None or not memory_beside_plan(check, cuda, run_dir, predicted, summary):
        return False
    return bench(check, cuda, env, model, used or 2, predicted, summary)


def environment(cuda: bool, summary: dict) -> tuple[dict, Path]:
    """The phases' environment and the model folder: on CUDA two gloo ranks on one GPU, each
    held to the planned card; on the CPU the tiny preset."""
    from trainer import plan
    from trainer.runtime import gpu_sharing

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RUNS_DIR", None)
    env.pop("SHARDS_DIR", None)
    if not cuda:
        env["OMP_NUM_THREADS"] = "1"
        summary["model"] = str(TINY)
        return env, TINY
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    card = float(os.environ.get("GPU_CHECK_CARD_GIB", plan.GPUS[PLANNED_GPU].memory_gib))
    fraction = memory_fraction(total, card, plan.PlanOptions().context_gib)
    env[gpu_sharing.BACKEND_VARIABLE] = "gloo"
    env[gpu_sharing.FRACTION_VARIABLE] = f"{fraction:.6f}"
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.setdefault("OMP_NUM_THREADS", "4")
    summary["memory_cap"] = {"card_gib": card, "fraction": fraction, "of_bytes": total}
    model = turbo_shaped_model(Path(summary["work"]) / "model")
    summary["model"] = str(model)
    return env, model


def build_shards(check: Check, env: dict, model: Path, shards: Path) -> bool:
    workers = str(min(8, os.cpu_count() or 1))
    command = [sys.executable, "-m", "shard_builder", "--dataset", str(DEMO_CORPUS)]
    command += ["--model", str(model), "--out", str(shards), "--shard-size", "64"]
    code, _ = check.run("shards", command + ["--workers", workers], env, 600)
    return check.verdict(code == 0, f"shard builder exit {code}")


def train_kill_resume(check, cuda, env, model, shards, run_dir, batch) -> int | None | bool:
    """Train with rank 0 killed in step KILL_AT, then resume to MAX_STEPS. Returns the
    micro-batch the trainer ran with (None if its log does not say), False on a failure."""
    flags = trainer_flags(cuda, model, shards, batch) + ["--output-dir", str(run_dir)]
    killed_env = {**env, "TRAINER_DEBUG_KILL_AT_STEP": str(KILL_AT)}
    code, output = check.run("train_until_killed", torchrun(free_port()) + flags, killed_env, 900)
    saved = (run_dir / "checkpoints" / f"step-{SAVE_EVERY}").is_dir()
    later = (run_dir / "checkpoints" / f"step-{MAX_STEPS}").exists()
    evaluated = (run_dir / "eval" / f"step-{SAVE_EVERY}.json").is_file()
    why = f"exit {code}, checkpoint step-{SAVE_EVERY} {saved}, eval {evaluated}, ran on {later}"
    if not check.verdict(code not in (0, 124) and saved and evaluated and not later, why):
        return False
    used = batch_in_log(output)

    code, output = check.run("resume", torchrun(free_port()) + flags, env, 900)
    resumed = f"checkpoints/step-{SAVE_EVERY}" in output and "resuming from" in output
    finished = (run_dir / "checkpoints" / f"step-{MAX_STEPS}").is_dir()
    why = f"exit {code}, resumed from step {SAVE_EVERY} {resumed}, step-{MAX_STEPS} {finished}"
    if not check.verdict(code == 0 and resumed and finished, why):
        return False
    return batch_in_log(output) or used


def planned(check, cuda, env, model, shards, batch: str, summary: dict) -> dict | None:
    """trainer.plan's JSON for the same settings, on the card each rank was held to."""
    flags = trainer_flags(cuda, model, shards, batch)
    command = [sys.executable, "-m", "trainer.plan", *flags, "--gpu", PLANNED_GPU]
    code, output = check.run("plan", command + ["--world-size", "2", "--json"], env, 300)
    predicted = _plan_json(output) if code == 0 else None
    if not check.verdict(predicted is not None, f"trainer.plan exit {code}"):
        return None
    keys = ("gpu", "batch_size", "grad_accum", "peak_phase", "peak_total", "headroom", "phases")
    summary["plan"] = {k: predicted.get(k) for k in keys}
    return predicted


def memory_beside_plan(check, cuda, run_dir: Path, predicted: dict, summary: dict) -> bool:
    from trainer.runtime import memory_phases

    measured = measured_peaks(memory_phases.read_records(run_dir))
    summary["memory"] = beside_plan(measured, predicted)
    if not cuda:  # no CUDA allocator, nothing recorded
        return True
    missing = [phase for phase in PHASES if phase not in measured]
    check.phases.append({"name": "memory_records", "seconds": 0.0, "returncode": 0})
    return check.verdict(not missing, f"no peak recorded for {', '.join(missing)}")


def bench(check, cuda, env, model, batch: int, predicted: dict, summary: dict) -> bool:
    """bench/bench_gpu.py at the run's micro-batch: the project's step and Seq2SeqTrainer."""
    command = [sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--model", str(model)]
    command += ["--batch-size", str(batch), "--workdir", str(check.work / "bench")]
    if cuda:
        command += ["--tokens", str(predicted.get("target_tokens", 448)), "--steps", "8"]
        peak = dense_peak_tflops(summary["device"])
        summary["mfu_peak_tflops"] = peak  # None: against the planned card's (bench_gpu's default)
        command += ["--peak-tflops", str(peak)] if peak else []
    else:
        command += ["--device", "cpu", "--precision", "fp32", "--tokens", "40", "--steps", "2"]
        command += ["--warmup", "1"]
    if not _has_accelerate():
        command.append("--skip-hf")
        summary["seq2seq_trainer_skipped"] = "accelerate is not installed (Trainer needs it)"
    code, output = check.run("bench_gpu", command, env, 600)
    result = last_json_line(output) if code == 0 else None
    if not check.verdict(result is not None and "results" in result, f"bench_gpu exit {code}"):
        return False
    per_window = 1.0  # one utterance per window unpacked
    if "windows_per_step" in predicted:
        per_window = predicted["utterances_per_step"] / predicted["windows_per_step"]
    summary["throughput"] = {
        label: throughput_row(figures, per_window) for label, figures in result["results"].items()
    }
    summary["throughput_note"] = (
        f"bench_gpu.py: one process, micro-batch {batch}, synthetic 30 s windows of "
        f"{result['args']['tokens']} target tokens; utterances/s = windows/s x "
        f"{per_window:.2f} utterances per window (trainer.plan's assumption when packed)"
    )
    return True


# Dense fp16/bf16 tensor peaks with fp32 accumulation, by a part of the CUDA device name
# (datasheets; H200 SXM has H100 SXM's compute). trainer.plan's GPU table holds the same figures.
DENSE_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "RTX 4090": 165.2}
DENSE_PEAK_TFLOPS |= {"RTX 3090": 71.0, "RTX 4060 Ti": 44.1}


def dense_peak_tflops(device_name: str) -> float | None:
    for part, tflops in DENSE_PEAK_TFLOPS.items():
        if part.lower() in device_name.lower():
            return tflops
    return None


def throughput_row(figures: dict, per_window: float) -> dict:
    memory = figures.get("max_memory_allocated")
    return {
        "windows_per_s": figures["samples_per_s"],
        "utterances_per_s": figures["samples_per_s"] * per_window,
        "mfu": figures.get("mfu"),
        "max_memory_allocated_gib": None if memory is None else memory / GIB,
    }


def _plan_json(output: str) -> dict | None:
    """trainer.plan --json's object (warnings on stderr may come before it)."""
    start = output.find('{\n  "model"')
    if start < 0:
        return None
    try:
        return json.loads(output[start:])
    except json.JSONDecodeError:
        return None


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(REPO / "out" / "gpu-check"), help="output folder")
    parser.add_argument("--mode", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument(
        "--timeout-scale", type=float, default=1.0, help="multiply every phase's time limit"
    )
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() if args.mode == "auto" else args.mode == "cuda"
    if cuda and not torch.cuda.is_available():
        print("gpu_check: --mode cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    batch = os.environ.get("GPU_CHECK_BATCH_SIZE", "auto" if cuda else "8")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    summary: dict = {
        "work": str(work),
        "mode": "cuda" if cuda else "cpu",
        "device": torch.cuda.get_device_name(0) if cuda else "CPU (no CUDA)",
        "torch": torch.__version__,
        "batch_size_requested": batch,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    check = Check(work, args.timeout_scale)
    try:
        ok = sequence(check, cuda, batch, summary)
    except Exception as error:  # a phase that cannot even start: still write the summary
        ok = False
        summary["error"] = f"{type(error).__name__}: {error}"
    summary["phases"] = check.phases
    summary["ok"] = ok
    summary["seconds"] = round(time.monotonic() - check.started, 1)
    path = work / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    print(f"summary: {path}")
    return 0 if ok else 1


def print_summary(summary: dict) -> None:
    print(f"\ngpu_check on {summary['device']} ({summary['mode']}): ", end="")
    print("all phases passed" if summary["ok"] else "FAILED", f"in {summary['seconds']} s")
    if summary.get("error"):
        print(f"  error: {summary['error']}")
    for row in summary.get("memory", []):
        if "measured_allocated_gib" in row:
            print(
                f"  {row['phase']:26s} measured {row['measured_allocated_gib']:6.2f} GiB "
                f"allocated, {row['measured_reserved_gib']:6.2f} reserved; plan "
                f"{row.get('planned_allocated_gib', float('nan')):6.2f} allocated, "
                f"{row.get('planned_total_gib', float('nan')):6.2f} total"
            )
    for label, figures in summary.get("throughput", {}).items():
        mfu = "" if figures["mfu"] is None else f", MFU {figures['mfu']:.1%}"
        print(
            f"  {label:16s} {figures['windows_per_s']:8.2f} windows/s, "
            f"{figures['utterances_per_s']:8.2f} utterances/s{mfu}"
        )


if __name__ == "__main__":
    sys.exit(main())
