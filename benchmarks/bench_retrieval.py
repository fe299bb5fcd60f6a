#!/usr/bin/env python
"""Melody retrieval at scale: MG2's `MelodyRetriever` (hnswlib) vs faiss `IndexHNSWFlat`, both against exact search.

    python benchmarks/bench_retrieval.py                       # N = 100 000 and 1 000 000 random 512-d vectors
    python benchmarks/bench_retrieval.py --sizes 100000 --index checkpoints/melody-index-small --clmp checkpoints/clmp-small

For each N, in one run: build time and in-memory size of each index (same M and ef_construction),
then for each ef_search: single-query latency p50/p99 (one thread), batch-64 queries/s (all threads),
recall@1 and recall@10 against exact numpy search. "ours (raw)" is the hnswlib index inside the
retriever; "ours" is `MelodyRetriever.search`, which also returns the stored melodies and metadata.
With `--index` (a retriever saved by build_index.py) the real melody embeddings are the base and the
CLMP text embeddings of the test captions are the queries.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import numpy as np
from tqdm.auto import tqdm

from mg2_pipeline.melody import Melody
from mg2_pipeline.retrieval import MelodyRetriever


def file_megabytes(path: str) -> float:
    size = os.path.getsize(path) / 2**20
    os.remove(path)
    return size


def normalised(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int, chunk: int = 200_000) -> np.ndarray:
    """Exact inner-product top-k, scanning the base in chunks (the ground truth)."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in tqdm(range(0, len(base), chunk), desc="exact search", leave=False):
        scores = queries @ base[start : start + chunk].T
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        best_ids = np.concatenate([best_ids, top + start], axis=1)
        keep = np.argsort(-best_scores, axis=1)[:, :k]
        best_scores, best_ids = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_ids, keep, 1)
    return best_ids


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def measure(search_one, search_batch, queries: np.ndarray, truth: np.ndarray, batch: int = 64) -> dict:
    latencies, found = [], []
    for query in queries:
        start = time.perf_counter()
        found.append(search_one(query))
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    for offset in range(0, len(queries), batch):
        search_batch(queries[offset : offset + batch])
    qps = len(queries) / (time.perf_counter() - start)
    found = np.stack(found)
    return {
        "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
        "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
        "batch64_qps": qps,
        "recall@1": recall(found, truth, 1),
        "recall@10": recall(found, truth, 10),
    }


def bench(name: str, base: np.ndarray, queries: np.ndarray, args) -> list[dict]:
    truth = exact_top_k(base, queries, 10)
    rows = bench_ours(name, base, queries, truth, args)
    gc.collect()  # the first index is freed before the peer's is built
    rows += bench_faiss(name, base, queries, truth, args)
    gc.collect()
    return rows


def bench_ours(name: str, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, args) -> list[dict]:
    """The retriever (hnswlib inside): raw hnswlib and `MelodyRetriever.search`, per `--ef_search`."""
    dim = base.shape[1]
    rows = []
    start = time.perf_counter()
    retriever = MelodyRetriever(dim=dim, M=args.M, ef_construction=args.ef_construction, initial_capacity=len(base))
    placeholder = Melody.from_notes([[60, 0.0, 0.5]])
    for offset in tqdm(range(0, len(base), 100_000), desc=f"{name}: hnswlib build", leave=False):
        chunk = base[offset : offset + 100_000]
        retriever.add(chunk, [placeholder] * len(chunk), [{"n": offset + i} for i in range(len(chunk))])
    build_s = time.perf_counter() - start
    index = retriever._index
    index.save_index(os.path.join(args.scratch_dir, "hnswlib.bin"))
    # in memory: the graph with its vectors, plus the retriever's own copy of the normalised embeddings
    ours_build = {
        "build_s": build_s,
        "memory_mb": file_megabytes(os.path.join(args.scratch_dir, "hnswlib.bin"))
        + retriever._embeddings.nbytes / 2**20,
    }
    for ef in args.ef_search:
        index.set_ef(ef)
        raw = measure(
            lambda q: index.knn_query(q[None], k=10, num_threads=1)[0][0],
            lambda qs: index.knn_query(qs, k=10),
            queries,
            truth,
        )
        rows.append(
            {"data": name, "N": len(base), "library": "ours (raw hnswlib)", "ef_search": ef, **ours_build, **raw}
        )
        wrapped = measure(
            lambda q: retriever.search(q, k=10).ids[0], lambda qs: retriever.search(qs, k=10), queries, truth
        )
        rows.append(
            {
                "data": name,
                "N": len(base),
                "library": "ours (MelodyRetriever.search)",
                "ef_search": ef,
                **ours_build,
                **wrapped,
            }
        )
    return rows


def bench_faiss(name: str, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, args) -> list[dict]:
    """The peer: faiss HNSW, same graph settings, inner product on the same normalised vectors."""
    import faiss

    dim = base.shape[1]
    rows = []
    start = time.perf_counter()
    faiss_index = faiss.IndexHNSWFlat(dim, args.M, faiss.METRIC_INNER_PRODUCT)
    faiss_index.hnsw.efConstruction = args.ef_construction
    for offset in tqdm(range(0, len(base), 100_000), desc=f"{name}: faiss build", leave=False):
        faiss_index.add(base[offset : offset + 100_000])
    build_s = time.perf_counter() - start
    faiss.write_index(faiss_index, os.path.join(args.scratch_dir, "faiss.bin"))
    faiss_build = {"build_s": build_s, "memory_mb": file_megabytes(os.path.join(args.scratch_dir, "faiss.bin"))}

    def faiss_one(query):
        faiss.omp_set_num_threads(1)
        ids = faiss_index.search(query[None], 10)[1][0]
        faiss.omp_set_num_threads(args.threads)
        return ids

    for ef in args.ef_search:
        faiss_index.hnsw.efSearch = ef
        result = measure(faiss_one, lambda qs: faiss_index.search(qs, 10), queries, truth)
        rows.append(
            {"data": name, "N": len(base), "library": "faiss IndexHNSWFlat", "ef_search": ef, **faiss_build, **result}
        )
    return rows


def real_melody_data(index_dir: str, clmp_dir: str, dataset: str, max_queries: int):
    """Base: the stored melody embeddings of a saved retriever; queries: CLMP text embeddings of test captions."""
    import torch

    from mg2_pipeline import CLMPModel, CLMPProcessor
    from mg2_pipeline.data import load_mg2_dataset

    retriever = MelodyRetriever.from_pretrained(index_dir)
    base = retriever._embeddings[: len(retriever)]
    model, processor = CLMPModel.from_pretrained(clmp_dir).eval(), CLMPProcessor.from_pretrained(clmp_dir)
    retriever.check_clmp(model)
    captions = [
        row["caption"]
        for row, _ in zip(load_mg2_dataset(dataset, "test").select_columns(["caption"]), range(max_queries))
    ]
    with torch.no_grad():
        text = processor(text=captions, return_tensors="pt")
        queries = model.get_text_features(text["input_ids"], text["attention_mask"]).numpy()
    return normalised(base), normalised(queries)


def format_table(rows: list[dict]) -> str:
    header = "| data | N | library | ef_search | build s | index MB | p50 ms | p99 ms | batch-64 q/s | R@1 | R@10 |"
    lines = [header, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['N']:,} | {r['library']} | {r['ef_search']} | {r['build_s']:.1f} | {r['memory_mb']:.0f} | "
            f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['batch64_qps']:.0f} | {r['recall@1']:.3f} | {r['recall@10']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--M", type=int, default=32)
    parser.add_argument(
        "--ef_construction",
        type=int,
        default=200,
        help="The original's 2048 would take hours per million vectors on 2 cores; 200 is the libraries' usual default.",
    )
    parser.add_argument("--ef_search", default="16,32,64,128,256,512")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--index", default=None, help="A saved MelodyRetriever (build_index.py) for the real-data rows."
    )
    parser.add_argument(
        "--clmp", default=None, help="The CLMP the index was built with (its text tower makes the queries)."
    )
    parser.add_argument("--dataset", default="data/mg2-folk")
    parser.add_argument("--output", default="benchmarks/results/retrieval.json")
    parser.add_argument(
        "--scratch_dir", default="benchmarks/results", help="Where index files are written to be measured."
    )
    args = parser.parse_args(argv)
    args.ef_search = [int(ef) for ef in args.ef_search.split(",")]
    sizes = [int(size) for size in args.sizes.split(",") if size]
    import faiss

    faiss.omp_set_num_threads(args.threads)

    rows = []
    rng = np.random.default_rng(0)
    if args.index:
        base, queries = real_melody_data(args.index, args.clmp, args.dataset, args.queries)
        rows += bench("melodies", base, queries, args)
        print(format_table(rows), flush=True)
    for size in sizes:
        base = normalised(rng.standard_normal((size, args.dim), dtype=np.float32))
        queries = normalised(rng.standard_normal((args.queries, args.dim), dtype=np.float32))
        rows += bench("random", base, queries, args)
        del base
        print(format_table(rows), flush=True)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"args": vars(args), "rows": rows}, handle, indent=2)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
