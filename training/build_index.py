#!/usr/bin/env python
"""Build the melody database: embed every melody of a dataset split with a CLMP checkpoint into a `MelodyRetriever`.

    python training/build_index.py --clmp checkpoints/clmp-small --dataset data/mg2-folk --output_dir checkpoints/melody-index

Rows are streamed (audio is never decoded); identical melodies (same token string) are stored once,
with the number of clips that share them in `clip_count`. The retriever records the CLMP's fingerprint,
so a pipeline refuses to query it with another CLMP.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from mg2_pipeline.data import SPLITS, load_mg2_dataset
from mg2_pipeline.melody import Melody
from mg2_pipeline.modeling_clmp import CLMPModel
from mg2_pipeline.processing_clmp import CLMPProcessor
from mg2_pipeline.retrieval import MelodyRetriever, clmp_fingerprint

METADATA_COLUMNS = ("title", "source", "key", "tempo_bpm", "meter", "tune_type", "origin", "tune_id", "clip_id")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clmp", required=True, help="A CLMP folder saved by train_clmp.py (model + processor).")
    parser.add_argument("--dataset", default="data/mg2-folk", help="An MG2 dataset folder or Hub dataset id.")
    parser.add_argument("--splits", default="train", help="Comma-separated splits whose melodies fill the index.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--M", type=int, default=32, help="HNSW graph degree (the original: 32).")
    parser.add_argument("--ef_construction", type=int, default=2048, help="HNSW build beam (the original: 2048).")
    parser.add_argument("--ef_search", type=int, default=128, help="HNSW search beam (the original: 128).")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_melodies", type=int, default=None, help="Stop after this many distinct melodies.")
    args = parser.parse_args(argv)
    args.splits = [split.strip() for split in args.splits.split(",") if split.strip()]
    for split in args.splits:
        if split not in SPLITS:
            parser.error(f"--splits: {split!r} is not one of {SPLITS}")
    for name in ("M", "ef_construction", "ef_search", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def distinct_melodies(dataset_path: str, splits: list[str], limit: int | None):
    """`(tokens, Melody, metadata)` for each distinct melody of the splits, first occurrence first; counts skipped rows."""
    seen: dict[str, dict] = {}
    skipped = 0
    for split in splits:
        rows = load_mg2_dataset(dataset_path, split=split).select_columns(
            ["melody_tokens", "melody_notes", *METADATA_COLUMNS]
        )
        for row in tqdm(rows, desc=f"Reading {split} melodies", unit="clip"):
            tokens = row["melody_tokens"]
            if tokens in seen:
                seen[tokens]["metadata"]["clip_count"] += 1
                continue
            try:
                melody = Melody(np.asarray(row["melody_notes"], dtype=np.float64))
            except ValueError:
                skipped += 1
                continue
            metadata = {key: row[key] for key in METADATA_COLUMNS if row.get(key) not in (None, "")}
            seen[tokens] = {"melody": melody, "metadata": {**metadata, "split": split, "clip_count": 1}}
            if limit and len(seen) >= limit:
                return seen, skipped
    return seen, skipped


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    model = CLMPModel.from_pretrained(args.clmp).eval()
    processor = CLMPProcessor.from_pretrained(args.clmp)
    melodies, skipped = distinct_melodies(args.dataset, args.splits, args.max_melodies)
    if not melodies:
        raise SystemExit(f"No melodies in splits {args.splits} of {args.dataset}.")

    retriever = MelodyRetriever(
        dim=model.config.projection_dim,
        M=args.M,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        clmp_fingerprint=clmp_fingerprint(model),
        initial_capacity=len(melodies),
    )
    items = list(melodies.items())
    with tqdm(total=len(items), desc="Embedding and indexing", unit="melody") as progress:
        for start in range(0, len(items), args.batch_size):
            batch = items[start : start + args.batch_size]
            encoded = processor(melody=[entry["melody"] for _, entry in batch], return_tensors="pt")
            embeddings = model.get_melody_features(encoded["melody_input_ids"], encoded["melody_attention_mask"])
            retriever.add(
                embeddings, [entry["melody"] for _, entry in batch], [entry["metadata"] for _, entry in batch]
            )
            progress.update(len(batch))
    retriever.save_pretrained(args.output_dir)
    summary = {
        "melodies": len(retriever),
        "clips": sum(entry["metadata"]["clip_count"] for entry in melodies.values()),
        "skipped_rows": skipped,
        "splits": args.splits,
        "clmp": os.path.abspath(args.clmp),
        "clmp_fingerprint": retriever.config.clmp_fingerprint,
    }
    with open(os.path.join(args.output_dir, "build_summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print(
        f"Indexed {summary['melodies']} distinct melodies from {summary['clips']} clips "
        f"({skipped} rows skipped) into {args.output_dir}"
    )
    return retriever


if __name__ == "__main__":
    main()
