#!/usr/bin/env python
"""Does retrieval fit the prompt? Every caption of a split (and a set of hand-written prompts) against a melody index,
with and without matching the facts the prompt names (`MG2Pipeline(match_prompt_facts=...)`).

    python training/evaluate_retrieval.py --clmp checkpoints/clmp-small --index checkpoints/melody-index \
        --dataset data/mg2-folk --prompts benchmarks/retrieval_prompts.jsonl --output_json retrieval.json

For each way of retrieving, the top-1 melody's
- tune type / meter: the share of the prompts naming one the index holds whose top-1 has it; a prompt naming one the
  index holds no melody of (a hand-written "polka") is counted apart, by whether its top-1 wrongly claims to match it;
- collection: the share whose top-1 comes from the caption clip's collection (`source`), overall and per collection;
and the chance level of the collection share (the index's make-up: the chance a random melody shares the collection).
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from tqdm.auto import tqdm

from mg2_pipeline import CLMPModel, CLMPProcessor
from mg2_pipeline.data import load_mg2_dataset
from mg2_pipeline.retrieval import MelodyRetriever


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clmp", required=True, help="The CLMP folder the index was built with.")
    parser.add_argument("--index", required=True, help="A melody index folder (build_index.py).")
    parser.add_argument("--dataset", default="data/mg2-folk")
    parser.add_argument("--split", default="test")
    parser.add_argument("--prompts", default=None, help="JSON lines of {prompt, tune_type?, meter?, source?}.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output_json", default=None)
    return parser.parse_args(argv)


def fit(retriever: MelodyRetriever, embeddings: torch.Tensor, queries: list[dict], match_prompt_facts: bool) -> dict:
    """Shares of `queries` ({prompt, tune_type?, meter?, source?}) whose top-1 melody has what they ask for."""
    prompts = [query["prompt"] for query in queries]
    hits = retriever.search_matching(embeddings, prompts) if match_prompt_facts else retriever.search(embeddings, k=1)
    counts = collections.defaultdict(lambda: [0, 0])  # name → [matched, asked]
    for query, row in zip(queries, hits.melodies):
        top = row[0].metadata
        for name in ("tune_type", "meter"):
            if query.get(name) and retriever.count({name: query[name]}):
                counts[name][0] += top.get(name) == query[name]
                counts[name][1] += 1
            elif query.get(name):  # nothing to find: the hit must not claim the fact
                counts[f"{name} the index lacks: not claimed"][0] += (
                    top.get("matched_facts", {}).get(name) != query[name]
                )
                counts[f"{name} the index lacks: not claimed"][1] += 1
        if query.get("source"):
            for name in ("collection", f"collection: {query['source']}"):
                counts[name][0] += top.get("source") == query["source"]
                counts[name][1] += 1
    return {name: {"share": matched / asked, "of": asked} for name, (matched, asked) in sorted(counts.items())}


def main(argv=None):
    args = parse_args(argv)
    model = CLMPModel.from_pretrained(args.clmp).eval()
    processor = CLMPProcessor.from_pretrained(args.clmp)
    retriever = MelodyRetriever.from_pretrained(args.index)
    retriever.check_clmp(model)

    rows = load_mg2_dataset(args.dataset, split=args.split).select_columns(["caption", "source", "tune_type", "meter"])
    # A caption asks for its clip's collection, and for its tune type / meter when it names them as the index spells them.
    sets = {
        f"{args.split} captions": [
            {
                "prompt": row["caption"],
                "source": row["source"],
                **{
                    name: row[name]
                    for name in retriever.prompt_facts(row["caption"])
                    if name in ("tune_type", "meter")
                },
            }
            for row in tqdm(rows, desc=f"Reading {args.split} captions", unit="clip")
        ]
    }
    if args.prompts:
        with open(args.prompts) as handle:
            sets["hand-written prompts"] = [json.loads(line) for line in handle if line.strip()]

    results = {}
    with torch.no_grad():
        for name, queries in sets.items():
            batches = [
                processor(
                    text=[query["prompt"] for query in queries[start : start + args.batch_size]], return_tensors="pt"
                )
                for start in range(0, len(queries), args.batch_size)
            ]
            embeddings = torch.cat(
                [model.get_text_features(batch["input_ids"], batch["attention_mask"]) for batch in batches]
            )
            results[name] = {
                "nearest melody": fit(retriever, embeddings, queries, match_prompt_facts=False),
                "matching the prompt's facts": fit(retriever, embeddings, queries, match_prompt_facts=True),
            }
    sources = sorted({query["source"] for queries in sets.values() for query in queries if query.get("source")})
    chance = {source: retriever.count({"source": source}) / len(retriever) for source in sources}
    captions = sets[f"{args.split} captions"]
    chance["overall"] = sum(chance[query["source"]] for query in captions) / len(captions)
    results["chance: a random index melody shares the collection"] = chance

    for name, by_way in results.items():
        print(f"\n{name}")
        for way, shares in by_way.items():
            print(
                f"  {way}: "
                + (
                    ", ".join(f"{key} {value['share']:.3f} (of {value['of']})" for key, value in shares.items())
                    if isinstance(shares, dict)
                    else f"{shares:.3f}"
                )
            )
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
