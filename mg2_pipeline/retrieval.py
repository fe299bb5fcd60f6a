"""`MelodyRetriever`: the melody database of MG2 as a saveable pipeline component.

An hnswlib HNSW index over L2-normalised CLMP melody embeddings (cosine space) plus the melody
store: every melody's notes and metadata (title, source, key, tempo, tune id, …). It subclasses
diffusers' `ModelMixin`/`ConfigMixin` so that `DiffusionPipeline.save_pretrained` keeps it, and
overrides `save_pretrained`/`from_pretrained` to write and read its own files:

    retriever/config.json       dims, HNSW settings, count, CLMP fingerprint, file checksums
    retriever/index.bin         the hnswlib index
    retriever/embeddings.safetensors  the normalised embeddings (hnswlib's `get_items` costs ~20 µs per vector);
                                      `embeddings.{variant}.safetensors` when saved with a `variant`
    retriever/melodies.parquet  id, notes, metadata columns
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import diffusers
import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from safetensors.torch import load_file, save_file

# audio is imported directly (not only through melody): diffusers' remote-code loader copies only the modules a
# file imports itself.
from .audio import SAMPLE_RATE  # noqa: F401
from .melody import Melody

INDEX_NAME = "index.bin"
EMBEDDINGS_NAME = "embeddings.safetensors"
STORE_NAME = "melodies.parquet"
CONFIG_NAME = "config.json"
# Filtered searches whose eligible set is at most this large are answered exactly by brute force:
# cheaper than walking the graph with a Python filter, and never short of results.
EXACT_SEARCH_MAX_CANDIDATES = 4096
# Facts a prompt may name that the melody metadata records, in the order `search_matching` keeps them: when no
# melody matches them all it gives up the key first, then the meter, then the origin; the tune type last.
PROMPT_FACTS = ("tune_type", "origin", "meter", "key")
METER_PATTERN = re.compile(r"\b(\d{1,2})\s*/\s*(\d{1,2})\b")
KEY_PATTERN = re.compile(r"\b([A-G])(#|♯|b|♭|-sharp| sharp|-flat| flat)?\s+(major|minor)\b", re.IGNORECASE)
PITCH_CLASSES = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


def key_class(text: str) -> tuple[int, str] | None:
    """`(tonic pitch class, mode)` of the first key named in `text` ("D major", "B flat minor", "F# major"), or None."""
    match = KEY_PATTERN.search(text)
    if match is None:
        return None
    accidental = (match[2] or "").strip(" -").lower()
    shift = 1 if accidental in ("#", "♯", "sharp") else -1 if accidental in ("b", "♭", "flat") else 0
    return (PITCH_CLASSES[match[1].upper()] + shift) % 12, match[3].lower()


def clmp_fingerprint(clmp: torch.nn.Module) -> dict[str, str]:
    """SHA-256 (16 hex digits) of a CLMP model's weights rounded to float16 and to bfloat16.

    Rounding makes the fingerprint independent of the precision the model was loaded in:
    float32 or float16 weights give the same `float16` digest, float32 or bfloat16 the same `bfloat16` one.
    """
    digests = {}
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        sha = hashlib.sha256()
        for key, tensor in sorted(clmp.state_dict().items()):
            if tensor.is_floating_point():
                sha.update(key.encode())
                sha.update(tensor.detach().to("cpu", dtype).contiguous().view(torch.int16).numpy().tobytes())
        digests[name] = sha.hexdigest()[:16]
    return digests


def embeddings_file_name(variant: str | None) -> str:
    """`embeddings.safetensors`, or `embeddings.{variant}.safetensors` (diffusers' variant naming)."""
    return EMBEDDINGS_NAME if variant is None else EMBEDDINGS_NAME.replace(".safetensors", f".{variant}.safetensors")


def _sha256_file(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


@dataclass
class GuidingMelody:
    """A melody that guides a generation, with where it came from: a search hit (its id in the retriever, cosine
    similarity to the query) or the user's own (id and score None, `metadata["source"]`), and metadata."""

    melody: Melody
    id: int | None
    score: float | None
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_played(self) -> Melody:
        """The melody as it guided the pipeline's audio: placed at `metadata["audio_span_s"]`, repeated whole to fill
        it when the pipeline looped it; the melody itself for a plain search hit."""
        if "audio_span_s" not in self.metadata:
            return self.melody
        start, end = self.metadata["audio_span_s"]
        played = self.melody.fit_to(end - start) if end > start else self.melody
        return played.delay(start) if start else played


@dataclass
class RetrievalOutput:
    """`search` results for a batch of `B` queries and `k` hits each, best first."""

    ids: np.ndarray  # (B, k) int64
    scores: np.ndarray  # (B, k) float32 cosine similarities
    embeddings: np.ndarray  # (B, k, dim) float32, L2-normalised stored melody embeddings
    melodies: list[list[GuidingMelody]]


class _ReadWriteLock:
    """Many concurrent searches, or one writer (`add` may resize the index; saving reads it whole)."""

    def __init__(self):
        self._condition = threading.Condition()
        self._readers = 0

    @contextlib.contextmanager
    def reading(self):
        with self._condition:
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def writing(self):
        with self._condition:  # holding the condition's lock keeps new readers out
            self._condition.wait_for(lambda: self._readers == 0)
            yield


class MelodyRetriever(ModelMixin, ConfigMixin):
    """HNSW melody database: `add` melodies with their CLMP embeddings, `search` with query embeddings.

    Args:
        dim: embedding size (the CLMP `projection_dim`).
        M, ef_construction, ef_search: HNSW settings (the original: 32, 2048, 128).
        clmp_fingerprint: `clmp_fingerprint(clmp)` of the CLMP that made the embeddings; queries must
            come from the same model (see `check_clmp`).
        initial_capacity: index slots reserved up front; the index grows as needed.
    """

    config_name = CONFIG_NAME

    @register_to_config
    def __init__(
        self,
        dim: int = 512,
        M: int = 32,
        ef_construction: int = 2048,
        ef_search: int = 128,
        clmp_fingerprint: dict[str, str] | None = None,
        initial_capacity: int = 1024,
    ):
        super().__init__()
        import hnswlib

        for name, value, low in (
            ("dim", dim, 1),
            ("M", M, 2),
            ("ef_construction", ef_construction, 1),
            ("ef_search", ef_search, 1),
            ("initial_capacity", initial_capacity, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        self._index = hnswlib.Index(space="cosine", dim=dim)
        self._index.init_index(max_elements=initial_capacity, M=M, ef_construction=ef_construction)
        self._index.set_ef(ef_search)
        # The embeddings are a buffer, so the retriever follows `pipe.to(dtype)` like every component; the HNSW index
        # itself stays float32 in host memory. Not persistent: `save_pretrained` writes them itself.
        self.register_buffer("embeddings", torch.zeros(initial_capacity, dim), persistent=False)
        self._notes: list[np.ndarray] = []
        self._metadata: list[dict[str, Any]] = []
        self._id_by_tokens: dict[str, int] = {}
        self._column_cache: dict[str, np.ndarray] = {}
        self._lock = _ReadWriteLock()

    def __len__(self) -> int:
        return len(self._notes)

    # ----- building -----

    def add(
        self,
        embeddings: np.ndarray | torch.Tensor,
        melodies: Sequence[Melody],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> np.ndarray:
        """Add melodies with their `(n, dim)` CLMP melody embeddings; returns their new ids."""
        embeddings = self._as_queries(embeddings, "embeddings")
        if len(melodies) != len(embeddings):
            raise ValueError(f"Got {len(embeddings)} embeddings for {len(melodies)} melodies.")
        if metadata is not None and len(metadata) != len(melodies):
            raise ValueError(f"Got {len(metadata)} metadata records for {len(melodies)} melodies.")
        if not all(isinstance(melody, Melody) for melody in melodies):
            raise TypeError("melodies must be `Melody` objects.")
        with self._lock.writing():
            start = len(self)
            ids = np.arange(start, start + len(melodies), dtype=np.int64)
            if start + len(melodies) > len(self.embeddings):
                capacity = max(2 * len(self.embeddings), start + len(melodies))
                self._index.resize_index(capacity)
                self.embeddings = torch.cat(
                    [self.embeddings[:start], self.embeddings.new_zeros(capacity - start, self.config.dim)]
                )
            self._index.add_items(embeddings, ids)
            normalised = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
            self.embeddings[start : start + len(melodies)] = torch.from_numpy(normalised).to(self.embeddings)
            for offset, melody in enumerate(melodies):
                self._notes.append(melody.notes)
                self._metadata.append(dict(metadata[offset]) if metadata is not None else {})
                self._id_by_tokens.setdefault(melody.to_tokens(), start + offset)
            self._column_cache.clear()
        return ids

    def id_of(self, melody: Melody | str) -> int | None:
        """The id of a stored melody (a `Melody` or its token string), or None if it is not stored."""
        tokens = melody.to_tokens() if isinstance(melody, Melody) else melody
        return self._id_by_tokens.get(tokens)

    def get(self, melody_id: int) -> tuple[Melody, dict[str, Any]]:
        """The melody and metadata stored under `melody_id`."""
        if not 0 <= melody_id < len(self):
            raise ValueError(f"melody_id must be in [0, {len(self)}), got {melody_id}.")
        return Melody._from_validated(self._notes[melody_id]), dict(self._metadata[melody_id])

    def check_clmp(self, clmp: torch.nn.Module) -> None:
        """Refuse a CLMP other than the one whose embeddings fill this index."""
        stored = self.config.clmp_fingerprint
        if not stored:
            return
        precision = "bfloat16" if next(clmp.parameters()).dtype == torch.bfloat16 else "float16"
        actual = clmp_fingerprint(clmp)[precision]
        if actual != stored[precision]:
            raise ValueError(
                f"This melody index was built with the CLMP whose fingerprint is {stored[precision]}, but the "
                f"pipeline's CLMP has fingerprint {actual}: embeddings of another model retrieve garbage. "
                "Rebuild the index with `training/build_index.py` for this CLMP."
            )

    # ----- searching -----

    def search(
        self,
        query_embeddings: np.ndarray | torch.Tensor,
        k: int = 1,
        exclude_ids: Iterable[int] | Sequence[Iterable[int]] | None = None,
        where: dict[str, Any] | None = None,
    ) -> RetrievalOutput:
        """The `k` nearest melodies of each query (cosine similarity), best first.

        Args:
            query_embeddings: `(dim,)` or `(B, dim)` CLMP text (or audio) embeddings.
            k: hits per query, 1 to the number of eligible melodies.
            exclude_ids: ids never returned — one collection for every query, or a list with one
                collection per query (training excludes each clip's own melody).
            where: metadata equality filter, e.g. `{"source": "essen"}`; a list value means "any of".
        Safe to call from many threads at once.
        """
        queries = self._as_queries(query_embeddings, "query_embeddings")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}.")
        k = int(k)
        if where is not None and not isinstance(where, dict):
            raise TypeError(f"where must be a dict of metadata values, got {type(where).__name__}.")
        exclusions = self._per_query_exclusions(exclude_ids, len(queries))
        with self._lock.reading():
            if len(self) == 0:
                raise ValueError("The melody index is empty: add melodies before searching.")
            allowed = self._where_mask(where)
            if exclusions is None and allowed is None:
                if k > len(self):
                    raise ValueError(f"k={k} but the index holds only {len(self)} melodies.")
                ids, distances = self._index.knn_query(queries, k=k)
            else:
                rows = [
                    self._filtered_knn(query, k, allowed, excluded)
                    for query, excluded in zip(queries, exclusions or [()] * len(queries))
                ]
                ids = np.stack([row[0] for row in rows])
                distances = np.stack([row[1] for row in rows])
            embeddings = self._rows(ids.reshape(-1))
            metadata = [[dict(self._metadata[i]) for i in row] for row in ids]
            notes = [[self._notes[i] for i in row] for row in ids]
        scores = (1.0 - distances).astype(np.float32)
        melodies = [
            [GuidingMelody(Melody._from_validated(n), int(i), float(s), m) for n, i, s, m in zip(*row)]
            for row in zip(notes, ids, scores, metadata)
        ]
        return RetrievalOutput(
            ids=ids.astype(np.int64),
            scores=scores,
            embeddings=embeddings.reshape(len(queries), k, -1),
            melodies=melodies,
        )

    def _as_queries(self, embeddings, name: str) -> np.ndarray:
        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().to("cpu", torch.float32).numpy()
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim == 1:
            embeddings = embeddings[None]
        if embeddings.ndim != 2 or embeddings.shape[1] != self.config.dim:
            raise ValueError(f"{name} must have shape (batch, {self.config.dim}), got {embeddings.shape}.")
        if not np.all(np.isfinite(embeddings)) or np.any(np.linalg.norm(embeddings, axis=1) == 0):
            raise ValueError(f"{name} must be finite and non-zero.")
        return np.ascontiguousarray(embeddings)

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Stored embeddings of `ids` as float32 numpy, whatever the buffer's dtype and device."""
        return self.embeddings[torch.from_numpy(np.asarray(ids, dtype=np.int64))].to("cpu", torch.float32).numpy()

    def _per_query_exclusions(self, exclude_ids, batch: int) -> list[set[int]] | None:
        if exclude_ids is None:
            return None
        exclude_ids = list(exclude_ids)
        if exclude_ids and all(isinstance(item, Iterable) for item in exclude_ids):
            if len(exclude_ids) != batch:
                raise ValueError(f"exclude_ids has {len(exclude_ids)} per-query collections for {batch} queries.")
            return [{int(i) for i in item} for item in exclude_ids]
        return [{int(i) for i in exclude_ids}] * batch

    def _column(self, key: str) -> np.ndarray:
        if key not in self._column_cache:
            self._column_cache[key] = np.array([m.get(key) for m in self._metadata], dtype=object)
        return self._column_cache[key]

    def _where_mask(self, where: dict[str, Any] | None) -> np.ndarray | None:
        if not where:
            return None
        mask = np.ones(len(self), dtype=bool)
        for key, wanted in where.items():
            values = self._column(key)
            mask &= np.isin(values, list(wanted)) if isinstance(wanted, (list, tuple, set)) else values == wanted
        return mask

    def count(self, where: dict[str, Any] | None = None) -> int:
        """Melodies whose metadata match `where` (as in `search`)."""
        with self._lock.reading():
            mask = self._where_mask(where)
            return len(self) if mask is None else int(np.count_nonzero(mask))

    def prompt_facts(self, prompt: str) -> dict[str, str]:
        """The tune type, origin, meter and key `prompt` names, spelled as this index stores them; only facts some stored
        melody has. "A lively Irish jig in 6/8 time, in D major" → `{"tune_type": "jig", "origin": "Irish", "meter": "6/8",
        "key": "D major"}`."""
        with self._lock.reading():
            known = {name: {value for value in self._column(name) if value} for name in PROMPT_FACTS}
        facts = {}
        for name in ("tune_type", "origin"):
            for value in sorted(known[name], key=len, reverse=True):  # "slip jig" before "jig"
                if re.search(rf"\b{re.escape(value.lower())}(e?s)?\b", prompt.lower()):
                    facts[name] = value
                    break
        meter = METER_PATTERN.search(prompt)
        if meter and f"{int(meter[1])}/{int(meter[2])}" in known["meter"]:
            facts["meter"] = f"{int(meter[1])}/{int(meter[2])}"
        wanted_key = key_class(prompt)
        spellings = [key for key in sorted(known["key"]) if wanted_key is not None and key_class(key) == wanted_key]
        if spellings:
            facts["key"] = spellings[0]
        return facts

    def search_matching(
        self, query_embeddings: np.ndarray | torch.Tensor, prompts: Sequence[str], k: int = 1
    ) -> RetrievalOutput:
        """`search`, preferring for each query the melodies whose metadata match what its prompt names (`prompt_facts`):
        first the nearest among those matching every fact, then, while fewer than `k` are found, those matching all but
        the key, then all but the key and the meter, then the tune type alone, then any melody. Each hit's metadata
        gains `matched_facts`, the facts it was chosen by ({} if none)."""
        queries = self._as_queries(query_embeddings, "query_embeddings")
        if len(prompts) != len(queries):
            raise ValueError(f"prompts has {len(prompts)} entries but query_embeddings has {len(queries)} rows.")
        rows = []
        for query, prompt in zip(queries, prompts):
            facts = self.prompt_facts(prompt)
            names = [name for name in PROMPT_FACTS if name in facts]
            chosen = {}  # id → (score, embedding, hit), best first
            while True:
                where = {name: facts[name] for name in names}
                available = self.count(where)
                if available:
                    found = self.search(query, k=min(k, available), where=where or None)
                    for score, embedding, hit in zip(found.scores[0], found.embeddings[0], found.melodies[0]):
                        if hit.id not in chosen and len(chosen) < k:
                            hit.metadata["matched_facts"] = dict(where)
                            chosen[hit.id] = (score, embedding, hit)
                if len(chosen) == k or not names:
                    break
                names.pop()
            rows.append(list(chosen.items()))
        return RetrievalOutput(
            ids=np.array([[i for i, _ in row] for row in rows], dtype=np.int64),
            scores=np.array([[entry[0] for _, entry in row] for row in rows], dtype=np.float32),
            embeddings=np.array([[entry[1] for _, entry in row] for row in rows], dtype=np.float32),
            melodies=[[entry[2] for _, entry in row] for row in rows],
        )

    def _filtered_knn(self, query: np.ndarray, k: int, allowed: np.ndarray | None, excluded: set[int]):
        mask = np.ones(len(self), dtype=bool) if allowed is None else allowed.copy()
        mask[[i for i in excluded if 0 <= i < len(self)]] = False
        eligible = np.flatnonzero(mask)
        if k > len(eligible):
            raise ValueError(f"k={k} but only {len(eligible)} melodies are eligible for this query.")
        if len(eligible) > EXACT_SEARCH_MAX_CANDIDATES:
            try:
                ids, distances = self._index.knn_query(
                    query[None], k=k, num_threads=1, filter=lambda label: bool(mask[label])
                )
                return ids[0].astype(np.int64), distances[0]
            except RuntimeError:  # the filtered graph walk found fewer than k: answer exactly below
                pass
        similarities = self._rows(eligible) @ (query / np.linalg.norm(query))
        best = np.argsort(-similarities, kind="stable")[:k]
        return eligible[best], 1.0 - similarities[best]

    # ----- saving and loading -----

    def save_pretrained(self, save_directory: str | os.PathLike, variant: str | None = None, **kwargs) -> None:
        """Write config (with count and checksums), the hnswlib index and the melody store.

        The embeddings are written in the retriever's dtype, to `embeddings.{variant}.safetensors` with a `variant`.
        Each file is written under a temporary name and renamed, config last, so a folder is never left looking
        complete when it is not. Other keyword arguments (from `DiffusionPipeline`) are ignored; with
        `safe_serialization=False` the embeddings are still safetensors (they are data: nothing here needs pickle).
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        os.makedirs(save_directory, exist_ok=True)
        with self._lock.writing():
            index_path = os.path.join(save_directory, INDEX_NAME)
            self._index.save_index(index_path + ".tmp")
            os.replace(index_path + ".tmp", index_path)
            store_path = os.path.join(save_directory, STORE_NAME)
            rows = [
                {"id": i, "melody_notes": notes.tolist(), **meta}
                for i, (notes, meta) in enumerate(zip(self._notes, self._metadata))
            ]
            table = pa.Table.from_pylist(rows) if rows else pa.table({"id": pa.array([], pa.int64())})
            pq.write_table(table, store_path + ".tmp")
            os.replace(store_path + ".tmp", store_path)
            embeddings_name = embeddings_file_name(variant)
            embeddings_path = os.path.join(save_directory, embeddings_name)
            save_file({"embeddings": self.embeddings[: len(self)].cpu().contiguous()}, embeddings_path + ".tmp")
            os.replace(embeddings_path + ".tmp", embeddings_path)
            config = {
                **dict(self.config),
                "_class_name": type(self).__name__,
                "_diffusers_version": diffusers.__version__,
                "count": len(self),
                "checksums": {
                    name: _sha256_file(os.path.join(save_directory, name))
                    for name in (INDEX_NAME, embeddings_name, STORE_NAME)
                },
            }
        config_path = os.path.join(save_directory, CONFIG_NAME)
        with open(config_path + ".tmp", "w") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
        os.replace(config_path + ".tmp", config_path)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        variant: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> "MelodyRetriever":
        """Load a saved retriever (a folder, or a Hub repo id with `subfolder`), verifying checksums and count.

        `variant` reads `embeddings.{variant}.safetensors`; `torch_dtype` casts the embeddings (the index stays
        float32). Other keyword arguments from `DiffusionPipeline.from_pretrained` (device_map, …) are ignored.
        """
        import hnswlib
        import pyarrow.parquet as pq

        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            hub_kwargs = {
                key: kwargs[key] for key in ("revision", "cache_dir", "token", "local_files_only") if key in kwargs
            }
            pattern = f"{subfolder}/*" if subfolder else "*"
            folder = os.path.join(
                snapshot_download(str(pretrained_model_name_or_path), allow_patterns=[pattern], **hub_kwargs),
                subfolder or "",
            )
        with open(os.path.join(folder, CONFIG_NAME)) as handle:
            config = json.load(handle)
        count = config.pop("count")
        checksums = config.pop("checksums")
        embeddings_name = embeddings_file_name(variant)
        if embeddings_name not in checksums:
            raise ValueError(f"{folder} has no embeddings for variant={variant!r} (it has {sorted(checksums)}).")
        for name, expected in checksums.items():
            if _sha256_file(os.path.join(folder, name)) != expected:
                raise ValueError(
                    f"{os.path.join(folder, name)} fails its checksum: the file is corrupt or was changed."
                )
        init_kwargs = {key: value for key, value in config.items() if not key.startswith("_")}
        retriever = cls(**init_kwargs)
        retriever._index = hnswlib.Index(space="cosine", dim=retriever.config.dim)
        retriever._index.load_index(os.path.join(folder, INDEX_NAME), max_elements=max(count, 1))
        retriever._index.set_ef(retriever.config.ef_search)
        embeddings = load_file(os.path.join(folder, embeddings_name))["embeddings"]
        retriever.embeddings = embeddings.to(torch_dtype) if torch_dtype is not None else embeddings
        table = pq.read_table(os.path.join(folder, STORE_NAME)).to_pylist()
        counts = (retriever._index.get_current_count(), len(retriever.embeddings), len(table))
        if counts != (count,) * 3:
            raise ValueError(
                f"Inconsistent retriever in {folder}: config says {count} melodies, but the index holds {counts[0]}, "
                f"the embeddings file {counts[1]} and the melody store {counts[2]}."
            )
        for row in table:
            notes = np.asarray(row.pop("melody_notes"), dtype=np.float64).reshape(-1, 3)
            row.pop("id")
            retriever._notes.append(notes)
            retriever._metadata.append({key: value for key, value in row.items() if value is not None})
            retriever._id_by_tokens.setdefault(Melody(notes).to_tokens(), len(retriever._notes) - 1)  # validates too
        return retriever
