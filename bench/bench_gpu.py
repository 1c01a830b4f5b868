"""The trainer's step on a GPU, against Hugging Face's Seq2SeqTrainer, next to trainer.plan.

    python bench/bench_gpu.py --model openai/whisper-large-v3-turbo --batch-size 4 --steps 8

Both train the same model (built from its config.json with random weights: no download) on the
same synthetic batches (random 30 s log-mel windows and random targets of --tokens tokens),
with the same micro-batch, precision, gradient checkpointing and no accumulation, one process.
Ours: the project's step (`pad_features_to_full`-sized inputs, `decoder_inputs_and_labels`,
autocast, `token_loss`, GradScaler, fused AdamW). Theirs: `Seq2SeqTrainer.train()` with
`fp16`/`bf16` and `gradient_checkpointing` set. Reported per run: samples/s (after --warmup
steps), MFU against the GPU's dense peak (FLOPs counted by trainer.plan), and
`torch.cuda.max_memory_allocated`, beside what `trainer.plan` predicts for one GPU
(`--world-size 1`, no context margin). Without CUDA it says so and exits 0, unless `--device cpu`
asks for the same comparison on the CPU (fp32; bench/gpu_check.sh's CPU mode, to keep the script
working: its figures say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def synthetic_batch(config, batch: int, tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    features = torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions)
    ids = torch.randint(0, config.vocab_size, (batch, tokens))
    return features.to(device), ids.to(device)


def build(args, device):
    from trainer.model import ModelConfig
    from trainer.plan import build_fake_model

    torch.manual_seed(0)
    config = ModelConfig(
        name_or_path=args.model, gradient_checkpointing=args.checkpointing == "true"
    )
    return build_fake_model(config, torch.device("cpu")).to(device)


def run_ours(args, device) -> dict:
    from trainer.model import decoder_inputs_and_labels, token_loss
    from trainer.runtime.optim import autocast

    model = build(args, device)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda"
    )
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    features, ids = synthetic_batch(model.config, args.batch_size, args.tokens, device)
    inputs, labels = decoder_inputs_and_labels(ids, model.config.pad_token_id)
    reset_peak(device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            synchronize(device)
            started = time.perf_counter()
        with autocast(args.precision, device):
            logits = model(input_features=features, decoder_input_ids=inputs).logits
        summed, count = token_loss(logits, labels)
        loss = summed / count
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = time.perf_counter() - started
    result = {
        "samples_per_s": args.steps * args.batch_size / seconds,
        "max_memory_allocated": max_allocated(device),
    }
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def max_allocated(device) -> int | None:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


def run_hf(args, device) -> dict:
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    model = build(args, device)
    features, ids = synthetic_batch(model.config, args.batch_size, args.tokens, "cpu")
    rows = [
        {"input_features": features[i % args.batch_size], "labels": ids[i % args.batch_size, 1:]}
        for i in range(args.batch_size * (args.warmup + args.steps))
    ]

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, index):
            return rows[index]

    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step == args.warmup:
                synchronize(device)
                marks["start"] = time.perf_counter()

    training = Seq2SeqTrainingArguments(
        output_dir=str(Path(args.workdir) / "hf"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-5,
        fp16=args.precision == "fp16",
        bf16=args.precision == "bf16",
        gradient_checkpointing=args.checkpointing == "true",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        use_cpu=device.type == "cpu",
        max_grad_norm=1.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Seq2SeqTrainer(model=model, args=training, train_dataset=Data(), callbacks=[Clock()])
    reset_peak(device)
    trainer.train()
    synchronize(device)
    seconds = time.perf_counter() - marks["start"]
    return {
        "samples_per_s": args.steps * args.batch_size / seconds,
        "max_memory_allocated": max_allocated(device),
    }


def predicted(args) -> dict:
    from trainer import plan

    argv = ["--model", args.model, "--batch-size", str(args.batch_size)]
    argv += ["--grad-accum", "1", "--precision", args.precision, "--world-size", "1"]
    argv += ["--gradient-checkpointing", args.checkpointing, "--max-tokens", str(args.tokens)]
    argv += ["--context-gib", "0", "--bucket-buffer", str(args.batch_size)]
    config, options = plan.resolve(argv, environ={})
    options.fragmentation = 0.0
    return plan.make_plan(config, options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="openai/whisper-large-v3-turbo")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=125, help="target tokens per sample")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--checkpointing", default="true", choices=["true", "false"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense peak")
    parser.add_argument("--workdir", default="/tmp/bench_gpu")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: only to exercise it"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured (run it on a GPU machine).")
        return 0
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    plan_figures = predicted(args)
    flops_per_sample = plan_figures["model_flops_per_step_per_gpu"] / args.batch_size
    peak = args.peak_tflops or plan_figures["peak_tflops"]
    results = {"ours": run_ours(args, device)}
    if not args.skip_hf:
        results["seq2seq_trainer"] = run_hf(args, device)
    print(f"{name}; {args.model}, batch {args.batch_size}, {args.tokens} tokens, {args.precision}")
    print(f"checkpointing {args.checkpointing}; MFU against {peak:g} TFLOP/s dense")
    predicted_gib = plan_figures["memory_bytes"]["allocated_peak"] / 2**30
    for label, figures in results.items():
        mfu = figures["samples_per_s"] * flops_per_sample / (peak * 1e12)
        figures["mfu"] = mfu if device.type == "cuda" else None
        memory = figures["max_memory_allocated"]
        print(
            f"  {label:16s} {figures['samples_per_s']:7.2f} samples/s  "
            + (f"MFU {mfu:5.1%}  " if device.type == "cuda" else "")
            + (f"max_memory_allocated {memory / 2**30:6.2f} GiB " if memory is not None else "")
            + f"(plan: {predicted_gib:.2f} GiB)"
        )
    print(json.dumps({"device": name, "args": vars(args), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
