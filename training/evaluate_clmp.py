#!/usr/bin/env python
"""Cross-modal retrieval of a trained CLMP (or CLAP baseline) on an MG2 split, as the paper's Table 2.

    python training/evaluate_clmp.py --model checkpoints/clmp-small --dataset data/mg2-folk --output_json results.json

Every clip of the split is one query in each direction, with its own caption / audio / melody as
the single positive among all clips: R@1, R@5, R@10 and mAP@10 (mean of 1/rank when rank <= 10).
`--match_prompt_facts` adds the row `T2M+facts`: text → melody as the pipeline retrieves, among the split's melodies
whose tune type, origin, meter and key match what the caption names (`MelodyRetriever.search_matching`).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from mg2_pipeline import CLMPModel, CLMPProcessor, Melody, MelodyRetriever
from mg2_pipeline.data import MG2Example, load_mg2_dataset, streaming_dataloader
from mg2_pipeline.retrieval import PROMPT_FACTS

# direction → (query modality, target modality), in the paper's order
DIRECTIONS = {
    "W2T": ("audio", "text"),
    "T2W": ("text", "audio"),
    "W2M": ("audio", "melody"),
    "M2W": ("melody", "audio"),
    "T2M": ("text", "melody"),
    "M2T": ("melody", "text"),
}


def retrieval_metrics(queries: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Row i of `queries` has row i of `targets` as its only positive; embeddings are L2-normalised."""
    similarity = queries @ targets.t()
    positive = similarity.diagonal().unsqueeze(1)
    return rank_metrics((similarity > positive).sum(dim=1) + 1)  # 1 = the positive is the nearest target


def rank_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """R@1, R@5, R@10 and mAP@10 from the rank of each query's positive (anything > 10 counts as missed)."""
    metrics = {f"R@{k}": (ranks <= k).float().mean().item() for k in (1, 5, 10)}
    metrics["mAP@10"] = (
        torch.where(ranks <= 10, 1.0 / ranks.float(), torch.zeros_like(ranks, dtype=torch.float)).mean().item()
    )
    return metrics


@torch.no_grad()
def embed_split(
    model: CLMPModel, processor: CLMPProcessor, dataset_path: str, split: str, batch_size: int, max_clips: int | None
) -> dict[str, torch.Tensor]:
    transform = MG2Example(
        clip_seconds=processor.feature_extractor.max_length_s,
        tokenizer=processor.tokenizer,
        max_text_length=processor.max_text_length,
        max_melody_length=processor.melody_max_length,
    )
    loader = streaming_dataloader(
        load_mg2_dataset(dataset_path, split=split), batch_size, transform, shuffle_buffer_size=0
    )
    embeds = {name: [] for name in model.config.modalities}
    embeds["clip_id"] = []
    seen = 0
    for batch in tqdm(loader, desc=f"Embedding {split}", unit="batch"):
        embeds["clip_id"] += batch["clip_id"]
        embeds["text"].append(model.get_text_features(batch["input_ids"], batch["attention_mask"]))
        embeds["audio"].append(model.get_audio_features(batch["log_mel"]))
        if "melody" in embeds:
            embeds["melody"].append(
                model.get_melody_features(batch["melody_input_ids"], batch["melody_attention_mask"])
            )
        seen += len(batch["clip_id"])
        if max_clips and seen >= max_clips:
            break
    clip_ids = embeds.pop("clip_id")[:max_clips]
    return {"clip_id": clip_ids, **{name: torch.cat(values)[: len(clip_ids)] for name, values in embeds.items()}}


def facts_retrieval_metrics(embeds: dict, dataset_path: str, split: str) -> dict[str, float]:
    """T2M as the pipeline retrieves: each caption among the split's melodies matching the facts it names."""
    rows = {
        row["clip_id"]: row
        for row in load_mg2_dataset(dataset_path, split=split).select_columns(
            ["clip_id", "caption", "melody_notes", *PROMPT_FACTS]
        )
    }
    ordered = [rows[clip_id] for clip_id in embeds["clip_id"]]
    retriever = MelodyRetriever(dim=embeds["melody"].shape[1], M=16, ef_construction=200, ef_search=64)
    retriever.add(
        embeds["melody"],
        [Melody(np.asarray(row["melody_notes"])) for row in ordered],
        [{name: row[name] for name in PROMPT_FACTS} for row in ordered],
    )
    k = min(10, len(ordered))
    hits = retriever.search_matching(embeds["text"], [row["caption"] for row in ordered], k=k)
    found = hits.ids == np.arange(len(ordered))[:, None]
    return rank_metrics(torch.from_numpy(np.where(found.any(1), found.argmax(1) + 1, 11)))


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'direction':<10} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'mAP@10':>7}"]
    for direction, metrics in results.items():
        lines.append(
            f"{direction:<10} " + " ".join(f"{metrics[key]:>7.4f}" for key in ("R@1", "R@5", "R@10", "mAP@10"))
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A folder saved by train_clmp.py (model + processor).")
    parser.add_argument("--dataset", default="data/mg2-folk")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_clips", type=int, default=None)
    parser.add_argument(
        "--match_prompt_facts", action="store_true", help="Add T2M among the melodies matching each caption's facts."
    )
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)

    model = CLMPModel.from_pretrained(args.model).eval()
    processor = CLMPProcessor.from_pretrained(args.model)
    embeds = embed_split(model, processor, args.dataset, args.split, args.batch_size, args.max_clips)
    results = {
        direction: retrieval_metrics(embeds[query], embeds[target])
        for direction, (query, target) in DIRECTIONS.items()
        if query in embeds and target in embeds
    }
    if args.match_prompt_facts and "melody" in embeds:
        results["T2M+facts"] = facts_retrieval_metrics(embeds, args.dataset, args.split)
    print(f"{os.path.basename(os.path.normpath(args.model))} on {args.split} ({len(embeds['text'])} clips)")
    print(format_table(results))
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
