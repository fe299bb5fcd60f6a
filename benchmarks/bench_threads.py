#!/usr/bin/env python
"""How training and generation slow down when another busy process shares the cores, per OpenMP thread setting.

    python benchmarks/bench_threads.py [--repeats 8]

Each workload runs in a fresh process, alone and beside one competing process that keeps a core busy, under each
setting: torch's default (one thread per core, idle threads spin), `OMP_WAIT_POLICY=PASSIVE` (idle threads sleep),
shorter spins (`GOMP_SPINCOUNT`), one thread, and `mg2_pipeline.threads.fit_threads` (what the training recipes and
`mg2 generate` call: the cores other processes leave free). Workloads: a `small` MG2 UNet training step
(batch 8 of 2.56 s crops, forward, backward, AdamW) and a `small` pipeline generating 2.56 s in 4 steps. Reported:
seconds per iteration, the slow-down beside the competitor (contended / alone) and the contended time against torch's
default alone, the figure that should stay near 2 (the competitor takes one of the two cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKLOAD = r"""
import json, os, sys, time
import torch
from mg2_pipeline.presets import build_pipeline
from mg2_pipeline.threads import fit_threads

kind, repeats = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
pipe = build_pipeline("small")
pipe.set_progress_bar_config(disable=True)
unet = pipe.unet
if kind == "train":
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    latents = torch.randn(8, unet.config.in_channels, 256 // pipe.vae_scale_factor, 64 // pipe.vae_scale_factor)
    text = pipe.encode_text(["a jig on fiddle"] * 8, "cpu")
    condition = torch.cat([text, text], -1)
    states, mask = pipe.encode_text_states(["a jig on fiddle"] * 8, "cpu")

    def step():
        loss = unet(latents, torch.tensor([500] * 8), encoder_hidden_states=states, encoder_attention_mask=mask,
                    class_labels=condition).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
else:
    def step():
        pipe("a jig on fiddle", melody="G4:0.5 A4:0.5 B4:1 D5:1", audio_length_in_s=2.56, num_inference_steps=4,
             generator=torch.Generator().manual_seed(0))
if os.environ.get("MG2_BENCH_FIT_THREADS"):  # as the training recipes start and `mg2 generate` does
    fit_threads()
step()  # warm-up
start = time.perf_counter()
for _ in range(repeats):
    step()
print(json.dumps({"seconds": (time.perf_counter() - start) / repeats, "threads": torch.get_num_threads()}))
"""
COMPETITOR = "while True: pass"
DEFAULT = "default (threads spin)"
SETTINGS = {
    DEFAULT: {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "one thread": {"OMP_NUM_THREADS": "1"},
    "fit_threads (MG2's)": {"MG2_BENCH_FIT_THREADS": "1"},
}


def run_workload(kind: str, repeats: int, env: dict) -> dict:
    clean = {
        key: value
        for key, value in os.environ.items()
        if key not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")
    }
    result = subprocess.run(
        [sys.executable, "-c", WORKLOAD, kind, str(repeats)],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=3600,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--workloads", nargs="+", default=["train", "generate"], choices=["train", "generate"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)

    rows = []
    for kind in args.workloads:
        for name in args.settings:
            env = SETTINGS[name]
            alone = run_workload(kind, args.repeats, env)
            competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR])
            try:
                time.sleep(1)
                contended = run_workload(kind, args.repeats, env)
            finally:
                competitor.kill()
                competitor.wait()
            rows.append(
                {
                    "workload": kind,
                    "setting": name,
                    "threads": alone["threads"],
                    "alone_s": round(alone["seconds"], 3),
                    "contended_s": round(contended["seconds"], 3),
                    "slow_down": round(contended["seconds"] / alone["seconds"], 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    print(f"\ncores: {len(os.sched_getaffinity(0))}; competitor: one process keeping a core busy\n")
    default_alone = {row["workload"]: row["alone_s"] for row in rows if row["setting"] == DEFAULT}
    print(
        "| workload | setting | threads | s / iteration alone | beside a busy process | slow-down | vs default alone |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        against = (
            f"{row['contended_s'] / default_alone[row['workload']]:.2f}×" if row["workload"] in default_alone else "–"
        )
        print(
            f"| {row['workload']} | {row['setting']} | {row['threads']} | {row['alone_s']:.3f} | "
            f"{row['contended_s']:.3f} | {row['slow_down']:.2f}× | {against} |"
        )
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
