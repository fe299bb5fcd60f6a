#!/usr/bin/env python
"""Data throughput, measured against its peer in the same run.

1. Rendering: audio seconds produced per wall second by `prepare_data.render_tune` (music21 parse +
   tinysoundfont render + FLAC encode), one process.
2. Loading: clips/s from Parquet to collated log-mel batches, the streamed loader
   (`load_mg2_dataset(streaming=True)` + shuffle buffer + `streaming_dataloader`) against an in-memory
   loader (the same rows held in a list, a map-style DataLoader with the same transform and collate).
   Target: streamed >= 90 % of in-memory.

    python benchmarks/bench_data.py --dataset_dir data/mg2-folk
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))

from mg2_pipeline.data import MG2Example, collate_examples, data_files, load_mg2_dataset, streaming_dataloader  # noqa: E402


def bench_rendering(num_tunes: int, seed: int) -> dict:
    import prepare_data

    args = prepare_data.parse_args(["--clips_per_tune", "1", "--seed", str(seed)])
    tunes = prepare_data.list_corpus_tunes()
    chosen = [tunes[i] for i in np.random.default_rng(seed).permutation(len(tunes))[:num_tunes]]
    synth = prepare_data.SoundFontSynth()
    start = time.perf_counter()
    clips = sum(len(prepare_data.render_tune(tune, args, synth)) for tune in chosen)
    elapsed = time.perf_counter() - start
    return {
        "tunes": num_tunes,
        "clips": clips,
        "seconds": round(elapsed, 2),
        "audio_seconds_per_wall_second": round(clips * args.clip_seconds / elapsed, 1),
    }


class InMemoryClips(torch.utils.data.Dataset):
    def __init__(self, rows, transform):
        self.rows, self.transform = rows, transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.transform(self.rows[index])


def clips_per_second(loader, num_clips: int) -> float:
    iterator = iter(loader)
    for _ in range(2):  # worker start-up, first shard open and shuffle-buffer fill are not throughput
        next(iterator)
    start, seen = time.perf_counter(), 0
    for batch in itertools.islice(iterator, num_clips // loader.batch_size):
        seen += len(batch["clip_id"])
    return seen / (time.perf_counter() - start)


def bench_loading(dataset_dir: str, num_clips: int, batch_size: int, num_workers: int, repeats: int) -> dict:
    train_files = data_files(dataset_dir)["train"]
    rows, needed = [], num_clips + 3 * batch_size
    for path in train_files:
        rows.extend(pq.read_table(path).to_pylist())
        if len(rows) >= needed:
            break
    rows = rows[:needed]
    transform = MG2Example()
    results = {"streamed": [], "in_memory": []}
    for _ in range(repeats):  # interleaved, so machine noise hits both alike
        streamed = streaming_dataloader(
            load_mg2_dataset(dataset_dir, split="train"),
            batch_size=batch_size,
            example_transform=transform,
            shuffle_buffer_size=256,
            num_workers=num_workers,
        )
        results["streamed"].append(clips_per_second(streamed, num_clips))
        in_memory = torch.utils.data.DataLoader(
            InMemoryClips(rows, transform),
            batch_size=batch_size,
            shuffle=True,
            collate_fn=collate_examples,
            num_workers=num_workers,
        )
        results["in_memory"].append(clips_per_second(in_memory, num_clips))
    streamed_rate, memory_rate = float(np.median(results["streamed"])), float(np.median(results["in_memory"]))
    return {
        "num_workers": num_workers,
        "batch_size": batch_size,
        "clips": num_clips,
        "streamed_clips_per_s": round(streamed_rate, 1),
        "in_memory_clips_per_s": round(memory_rate, 1),
        "streamed_over_in_memory": round(streamed_rate / memory_rate, 3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", default="data/mg2-folk")
    parser.add_argument("--render_tunes", type=int, default=60)
    parser.add_argument("--num_clips", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = {"rendering": bench_rendering(args.render_tunes, args.seed), "loading": []}
    print(json.dumps(report["rendering"]))
    for num_workers in (0, 2):
        report["loading"].append(
            bench_loading(args.dataset_dir, args.num_clips, args.batch_size, num_workers, args.repeats)
        )
        print(json.dumps(report["loading"][-1]))
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/bench_data.json", "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
