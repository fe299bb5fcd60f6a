#!/usr/bin/env python
"""Training throughput of each recipe at the `small` preset, 1 vs 2 processes, in one run.

    python benchmarks/bench_training.py --clmp checkpoints/clmp-small --retriever checkpoints/melody-index

Each script runs `--steps` steps with training/configs/small.yaml through `accelerate launch` (CPU;
2 processes via `--multi_gpu` with ACCELERATE_USE_CPU). Reported from each run's training_summary.json:
steps/s, samples/s (global), loss at the start and the end, and the 2-process/1-process speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "training", "configs", "small.yaml")
LOSS_KEYS = {"train_clmp": None, "train_vae": "l1", "train_vocoder": "mel_l1", "train_mg2": "loss"}


def launch(script: str, arguments: list[str], processes: int) -> dict:
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    command += (
        ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--cpu", "--num_processes", "1"]
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    with tempfile.TemporaryDirectory() as output_dir:
        result = subprocess.run(
            command
            + [
                os.path.join(ROOT, "training", f"{script}.py"),
                "--config",
                CONFIG,
                "--output_dir",
                output_dir,
                "--report_to",
                "none",
                *arguments,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{script} failed:\n{result.stderr[-3000:]}")
        with open(os.path.join(output_dir, "training_summary.json")) as handle:
            return json.load(handle)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/mg2-folk")
    parser.add_argument("--clmp", required=True, help="A trained small CLMP (train_clmp.py output).")
    parser.add_argument("--retriever", required=True, help="Its melody index (build_index.py output).")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", default="benchmarks/results/training.json")
    args = parser.parse_args(argv)

    common = [
        "--dataset",
        args.dataset,
        "--max_train_steps",
        str(args.steps),
        "--checkpointing_steps",
        str(10 * args.steps),
    ]
    scripts = {
        "train_clmp": common,
        "train_vae": common,
        "train_vocoder": common,
        "train_mg2": common
        + ["--clmp", args.clmp, "--retriever", args.retriever, "--validation_steps", str(10 * args.steps)],
    }
    rows = []
    for script, arguments in scripts.items():
        results = {processes: launch(script, arguments, processes) for processes in (1, 2)}
        for processes, summary in results.items():
            steps_per_second = summary["steps"] / summary["seconds"]
            key = LOSS_KEYS[script]
            rows.append(
                {
                    "script": script,
                    "processes": processes,
                    "steps_per_second": steps_per_second,
                    "samples_per_second": summary["samples_per_second"],
                    "loss_start": summary.get(f"{key}_first_10") if key else None,
                    "loss_end": summary.get(f"{key}_last_10") if key else None,
                    "speedup_vs_1_process": summary["samples_per_second"] / results[1]["samples_per_second"],
                }
            )
        print(
            f"{script}: "
            + ", ".join(f"{r['processes']} proc {r['samples_per_second']:.2f} samples/s" for r in rows[-2:]),
            flush=True,
        )
    print("| script | processes | steps/s | samples/s | × vs 1 process |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['script']} | {r['processes']} | {r['steps_per_second']:.3f} | {r['samples_per_second']:.2f} | {r['speedup_vs_1_process']:.2f} |"
        )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
