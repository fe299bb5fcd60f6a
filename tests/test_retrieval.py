import copy
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from conftest import ROOT

from mg2_pipeline import CLMPModel, CLMPProcessor, Melody
from mg2_pipeline.feature_extraction_clmp import CLMPFeatureExtractor
from mg2_pipeline.presets import clmp_config, minilm_path
from mg2_pipeline.retrieval import MelodyRetriever, clmp_fingerprint

SOURCES = ("essen", "oneill", "bach")


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :k]


def filled_retriever(count: int = 300, dim: int = 16, seed: int = 0, **kwargs) -> tuple[MelodyRetriever, np.ndarray]:
    vectors = unit_vectors(count, dim, seed)
    melodies = [Melody.from_notes([[60 + i % 24, 0.0, 0.25 + 0.01 * (i % 50)], [67, 0.5, 1.0]]) for i in range(count)]
    metadata = [{"title": f"tune {i}", "source": SOURCES[i % 3], "tempo_bpm": 100.0 + i} for i in range(count)]
    retriever = MelodyRetriever(dim=dim, M=16, ef_construction=200, ef_search=64, initial_capacity=8, **kwargs)
    retriever.add(vectors, melodies, metadata)
    return retriever, vectors


def test_search_returns_ranked_hits_with_melodies_metadata_and_stored_embeddings():
    retriever, vectors = filled_retriever()
    out = retriever.search(vectors[:5], k=3)
    assert out.ids.shape == (5, 3) and out.scores.shape == (5, 3) and out.embeddings.shape == (5, 3, 16)
    np.testing.assert_array_equal(out.ids[:, 0], np.arange(5))  # each stored vector finds itself first
    np.testing.assert_allclose(out.scores[:, 0], 1.0, atol=1e-5)
    assert np.all(np.diff(out.scores, axis=1) <= 1e-6)
    np.testing.assert_allclose(out.embeddings[:, 0], vectors[:5], atol=1e-6)
    hit = out.melodies[2][0]
    assert hit.id == 2 and hit.metadata == {"title": "tune 2", "source": "bach", "tempo_bpm": 102.0}
    assert hit.melody == retriever.get(2)[0] and hit.melody.notes[0, 0] == 62
    # a single (dim,) query and a torch tensor are accepted
    assert retriever.search(torch.from_numpy(vectors[7]), k=1).ids.tolist() == [[7]]
    assert retriever.id_of(hit.melody) == 2


def test_save_load_round_trip_gives_the_same_results_and_keeps_growing(tmp_path):
    retriever, vectors = filled_retriever()
    queries = unit_vectors(20, 16, seed=1)
    before = retriever.search(queries, k=5)
    retriever.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "embeddings.safetensors", "index.bin", "melodies.parquet"]
    loaded = MelodyRetriever.from_pretrained(tmp_path)
    after = loaded.search(queries, k=5)
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_allclose(before.scores, after.scores, atol=1e-6)
    assert [[h.metadata for h in row] for row in before.melodies] == [
        [h.metadata for h in row] for row in after.melodies
    ]
    assert [[h.melody for h in row] for row in before.melodies] == [[h.melody for h in row] for row in after.melodies]
    assert len(loaded) == 300 and loaded.config.M == 16 and loaded.config.ef_search == 64
    new_ids = loaded.add(queries[:2], [Melody.from_string("C5:1")] * 2, [{"source": "new"}] * 2)
    assert new_ids.tolist() == [300, 301]
    assert loaded.search(queries[1], k=1).ids.tolist() == [[301]]


def test_exclusion_and_metadata_filters():
    retriever, vectors = filled_retriever()
    # one collection for every query
    out = retriever.search(vectors[:4], k=2, exclude_ids=[0, 1, 2, 3])
    assert not set(out.ids.ravel()) & {0, 1, 2, 3}
    # one collection per query: each query loses only its own melody (as in training)
    out = retriever.search(vectors[:4], k=1, exclude_ids=[[0], [1], [2], [3]])
    unfiltered = retriever.search(vectors[:4], k=2)
    np.testing.assert_array_equal(out.ids[:, 0], unfiltered.ids[:, 1])
    # metadata filters, exact for the small eligible set
    out = retriever.search(vectors[:6], k=4, where={"source": "oneill"})
    assert {hit.metadata["source"] for row in out.melodies for hit in row} == {"oneill"}
    oneill = np.flatnonzero(np.arange(300) % 3 == 1)
    np.testing.assert_array_equal(out.ids, oneill[exact_top_k(vectors[oneill], vectors[:6], 4)])
    out = retriever.search(vectors[:6], k=3, where={"source": ["essen", "bach"]}, exclude_ids=[0, 2])
    assert all(
        hit.metadata["source"] in ("essen", "bach") and hit.id not in (0, 2) for row in out.melodies for hit in row
    )
    with pytest.raises(ValueError, match="only 100 melodies are eligible"):
        retriever.search(vectors[0], k=101, where={"source": "bach"})


def test_graph_filter_path_on_a_large_eligible_set(monkeypatch):
    retriever, vectors = filled_retriever(count=2000)
    monkeypatch.setattr("mg2_pipeline.retrieval.EXACT_SEARCH_MAX_CANDIDATES", 10)
    out = retriever.search(vectors[:10], k=5, where={"source": "essen"}, exclude_ids=[0, 3])
    assert all(i % 3 == 0 and i not in (0, 3) for i in out.ids.ravel())
    essen = np.flatnonzero((np.arange(2000) % 3 == 0) & ~np.isin(np.arange(2000), [0, 3]))
    truth = essen[exact_top_k(vectors[essen], vectors[:10], 5)]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(out.ids, truth)])
    assert overlap >= 0.9


def test_concurrent_searches_from_eight_threads_match_sequential_results():
    retriever, _ = filled_retriever(count=2000)
    queries = unit_vectors(64, 16, seed=3)
    expected = retriever.search(queries, k=5).ids
    results, errors = {}, []

    def worker(thread: int):
        try:
            for repeat in range(20):
                row = (thread * 8 + repeat) % 64
                results[(thread, repeat)] = (row, retriever.search(queries[row], k=5).ids[0])
                retriever.search(queries[row], k=2, where={"source": "essen"})
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def writer():
        for start in range(2000, 2400, 50):
            retriever.add(
                unit_vectors(50, 16, seed=start), [Melody.from_string("C4:1")] * 50, [{"source": "late"}] * 50
            )

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)] + [threading.Thread(target=writer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 160 and len(retriever) == 2400
    for row, ids in results.values():
        # melodies added meanwhile may rank among the results; the original ones keep their order
        assert [i for i in ids if i < 2000] == [i for i in expected[row] if i in set(ids)]


def test_recall_at_10_against_exact_search_on_10000_random_vectors():
    vectors = unit_vectors(10_000, 64, seed=4)
    retriever = MelodyRetriever(dim=64, M=32, ef_construction=200, ef_search=128, initial_capacity=10_000)
    retriever.add(vectors, [Melody.from_string("C4:1")] * 10_000)
    queries = unit_vectors(200, 64, seed=5)
    found = retriever.search(queries, k=10).ids
    truth = exact_top_k(vectors, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert recall >= 0.95


def test_refusals(tmp_path):
    retriever, vectors = filled_retriever()
    with pytest.raises(ValueError, match=r"query_embeddings must have shape \(batch, 16\)"):
        retriever.search(np.ones((2, 32), np.float32))
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        retriever.search(vectors[0], k=0)
    with pytest.raises(ValueError, match="finite and non-zero"):
        retriever.search(np.zeros(16, np.float32))
    with pytest.raises(ValueError, match="per-query collections for 2 queries"):
        retriever.search(vectors[:2], exclude_ids=[[1], [2], [3]])
    with pytest.raises(ValueError, match="2 embeddings for 1 melodies"):
        retriever.add(vectors[:2], [Melody.from_string("C4:1")])
    with pytest.raises(ValueError, match="index is empty"):
        MelodyRetriever(dim=16).search(vectors[0])
    with pytest.raises(ValueError, match="ef_search must be an integer >= 1"):
        MelodyRetriever(dim=16, ef_search=0)

    retriever.save_pretrained(tmp_path / "good")
    # a file failing its checksum
    tampered = tmp_path / "tampered"
    retriever.save_pretrained(tampered)
    with open(tampered / "index.bin", "r+b") as handle:
        handle.seek(200)
        byte = handle.read(1)
        handle.seek(200)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="index.bin fails its checksum"):
        MelodyRetriever.from_pretrained(tampered)
    # an index whose count disagrees with the store
    miscounted = tmp_path / "miscounted"
    retriever.save_pretrained(miscounted)
    config = json.loads((miscounted / "config.json").read_text())
    config["count"] = 299
    (miscounted / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config says 299 melodies, but the index holds 300"):
        MelodyRetriever.from_pretrained(miscounted)


def test_clmp_fingerprint_refuses_another_model_and_survives_half_precision():
    torch.manual_seed(0)
    model = CLMPModel(clmp_config("tiny"))
    torch.manual_seed(1)
    other = CLMPModel(clmp_config("tiny"))
    retriever = MelodyRetriever(dim=32, clmp_fingerprint=clmp_fingerprint(model))
    retriever.check_clmp(model)
    retriever.check_clmp(copy.deepcopy(model).to(torch.bfloat16))
    retriever.check_clmp(copy.deepcopy(model).to(torch.float16))
    with pytest.raises(ValueError, match="built with the CLMP whose fingerprint is"):
        retriever.check_clmp(other)


def test_build_index_embeds_deduplicates_and_searches_a_dataset(tiny_dataset, tmp_path):
    torch.manual_seed(0)
    model = CLMPModel(clmp_config("tiny")).eval()
    from transformers import AutoTokenizer

    processor = CLMPProcessor(
        CLMPFeatureExtractor(max_length_s=4.0), AutoTokenizer.from_pretrained(minilm_path()), max_text_length=16
    )
    model.save_pretrained(tmp_path / "clmp")
    processor.save_pretrained(tmp_path / "clmp")
    output_dir = tmp_path / "index"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "training", "build_index.py"),
            "--clmp",
            str(tmp_path / "clmp"),
            "--dataset",
            tiny_dataset,
            "--splits",
            "train,validation",
            "--output_dir",
            str(output_dir),
            "--M",
            "8",
            "--ef_construction",
            "50",
            "--ef_search",
            "20",
            "--batch_size",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output_dir / "build_summary.json").read_text())
    retriever = MelodyRetriever.from_pretrained(output_dir)
    assert len(retriever) == summary["melodies"] >= 1 and summary["clips"] >= summary["melodies"]
    assert retriever.config.M == 8 and retriever.config.ef_search == 20 and retriever.config.dim == 32
    retriever.check_clmp(model)

    from mg2_pipeline.data import load_mg2_dataset

    row = next(iter(load_mg2_dataset(tiny_dataset, "train")))
    own_id = retriever.id_of(row["melody_tokens"])
    assert own_id is not None
    hit = retriever.get(own_id)
    assert hit[1]["title"] == row["title"] and hit[1]["source"] == row["source"]
    assert hit[1]["tune_type"] == row["tune_type"] and hit[1]["meter"] == row["meter"]
    with torch.no_grad():
        melody = processor(melody=[Melody(np.asarray(row["melody_notes"]))], return_tensors="pt")
        embedding = model.get_melody_features(melody["melody_input_ids"], melody["melody_attention_mask"])
        text = processor(text=["a jig on fiddle"], return_tensors="pt")
        query = model.get_text_features(text["input_ids"], text["attention_mask"])
    assert retriever.search(embedding, k=1).ids[0, 0] == own_id
    assert own_id not in retriever.search(embedding, k=3, exclude_ids=[own_id]).ids
    out = retriever.search(query, k=min(3, len(retriever)))
    assert out.melodies[0][0].metadata["split"] in ("train", "validation")

    # How well retrieval fits the test captions and the hand-written prompts, with and without the prompt's facts
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "training", "evaluate_retrieval.py"),
            "--clmp",
            str(tmp_path / "clmp"),
            "--index",
            str(output_dir),
            "--dataset",
            tiny_dataset,
            "--split",
            "test",
            "--prompts",
            os.path.join(ROOT, "benchmarks", "retrieval_prompts.jsonl"),
            "--output_json",
            str(tmp_path / "fit.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fit = json.loads((tmp_path / "fit.json").read_text())
    for name in ("test captions", "hand-written prompts"):
        nearest, matching = fit[name]["nearest melody"], fit[name]["matching the prompt's facts"]
        assert set(nearest) == set(matching) and all(0 <= value["share"] <= 1 for value in matching.values())
        if "tune_type" in matching:  # a tune type the index has is always the top-1's when the prompt names it
            assert matching["tune_type"]["share"] == 1.0
        for lacked in [key for key in matching if key.endswith("the index lacks: not claimed")]:
            assert matching[lacked]["share"] == 1.0  # nothing to find: no hit claims it
    assert 0 < fit["chance: a random index melody shares the collection"]["overall"] <= 1


def facts_retriever() -> tuple[MelodyRetriever, np.ndarray]:
    """Nine melodies: jigs, reels and waltzes in a few meters and keys."""
    vectors = unit_vectors(9, 16, seed=3)
    kinds = [
        ("jig", "6/8", "D major"),
        ("jig", "6/8", "G major"),
        ("jig", "9/8", "D major"),
        ("slip jig", "9/8", "A minor"),
        ("reel", "4/4", "D major"),
        ("reel", "2/2", "Bb major"),
        ("waltz", "3/4", "F# major"),
        ("waltz", "3/4", "D major"),
        ("air", "3/4", "C# minor"),
    ]
    metadata = [
        {
            "title": f"{kind} {i}",
            "tune_type": kind,
            "meter": meter,
            "key": key,
            "origin": "Scottish" if i == 6 else "Irish",
        }
        for i, (kind, meter, key) in enumerate(kinds)
    ]
    retriever = MelodyRetriever(dim=16, M=16, ef_construction=64, ef_search=32)
    retriever.add(vectors, [Melody.from_notes([[60 + i, 0.0, 0.5]]) for i in range(9)], metadata)
    return retriever, vectors


@pytest.mark.parametrize(
    "prompt, facts",
    [
        (
            "A lively Irish jig played on fiddle at 120 BPM in D major, in 6/8 time",
            {"tune_type": "jig", "origin": "Irish", "meter": "6/8", "key": "D major"},
        ),
        ("a Scottish waltz", {"tune_type": "waltz", "origin": "Scottish"}),
        ("two slip jigs in 9 / 8", {"tune_type": "slip jig", "meter": "9/8"}),
        ("Reels in B flat major", {"tune_type": "reel", "key": "Bb major"}),
        ("a waltz in G♭ major", {"tune_type": "waltz", "key": "F# major"}),
        ("a sad air in c-sharp minor", {"tune_type": "air", "key": "C# minor"}),
        ("a march in 5/4 in E major", {}),  # nothing the index knows
        ("jigsaw reelection", {}),  # words, not tune types
    ],
)
def test_prompt_facts_are_read_as_the_index_spells_them(prompt, facts):
    assert facts_retriever()[0].prompt_facts(prompt) == facts


def test_search_matching_keeps_the_facts_it_can_and_gives_up_the_key_then_the_meter():
    retriever, vectors = facts_retriever()
    query = vectors[[4]]  # the D major reel's own embedding

    def best(prompt, k=1):
        hits = retriever.search_matching(query, [prompt], k=k).melodies[0]
        return [hit.metadata["title"] for hit in hits], hits[0].metadata["matched_facts"]

    def nearest(where, k=1):
        return [hit.metadata["title"] for hit in retriever.search(query, k=k, where=where).melodies[0]]

    assert best("a jig in 6/8 in G major") == (["jig 1"], {"tune_type": "jig", "meter": "6/8", "key": "G major"})
    jig_68 = {"tune_type": "jig", "meter": "6/8"}
    assert best("a jig in 6/8 in Bb major") == (nearest(jig_68), jig_68)  # no Bb jig: the key goes first
    assert best("a jig in 3/4 in F# major") == (nearest({"tune_type": "jig"}), {"tune_type": "jig"})  # then the meter
    assert best("a Scottish waltz in 3/4") == (
        ["waltz 6"],
        {"tune_type": "waltz", "origin": "Scottish", "meter": "3/4"},
    )
    assert best("a Scottish jig") == (nearest({"tune_type": "jig"}), {"tune_type": "jig"})  # then the origin
    assert best("a jig", k=3)[1] == {"tune_type": "jig"}
    titles, matched = best("a jig", k=4)  # three jigs first, then the nearest other melody
    assert titles[:3] == nearest({"tune_type": "jig"}, k=3) and matched == {"tune_type": "jig"}
    assert titles[3] == next(title for title in nearest(None, k=9) if not title.startswith("jig"))
    assert best("a march") == (["reel 4"], {})  # nothing the prompt names: plain nearest neighbour
    plain = retriever.search(query, k=1).melodies[0][0]
    assert plain.metadata["title"] == "reel 4" and "matched_facts" not in plain.metadata
    with pytest.raises(ValueError, match="prompts has 2 entries but query_embeddings has 1 rows"):
        retriever.search_matching(query, ["a", "b"])
