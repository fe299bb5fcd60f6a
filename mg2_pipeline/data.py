"""The MG2 dataset format and its streaming loader, shared by every training script.

A dataset is sharded Parquet (`data/{split}-NNNNN-of-NNNNN.parquet`) with the columns of
`MG2_FEATURES`; audio is stored as FLAC bytes and decoded with soundfile (no torchcodec/ffmpeg).
The same loader reads any local or Hub dataset with these columns.
"""

from __future__ import annotations

import glob
import os
import zlib
from typing import Callable

import numpy as np
import torch

from .audio import HOP_LENGTH, SAMPLE_RATE, LogMelSpectrogram, load_audio
from .melody import MAX_MELODY_TOKENS, Melody, encode_melody_tokens

SPLITS = ("train", "validation", "test")


def mg2_features():
    """The 🤗 `datasets.Features` of an MG2 dataset (the audio column shows as Audio on the Hub)."""
    from datasets import Audio, Features, List, Value

    return Features(
        {
            "clip_id": Value("string"),
            "audio": Audio(sampling_rate=SAMPLE_RATE, decode=False),
            "caption": Value("string"),
            "melody_tokens": Value("string"),
            "melody_notes": List(List(Value("float64"))),
            "tune_id": Value("string"),
            "title": Value("string"),
            "source": Value("string"),
            "key": Value("string"),
            "tempo_bpm": Value("float32"),
            "meter": Value("string"),
            "tune_type": Value("string"),
            "origin": Value("string"),
            "programs": List(Value("int32")),
        }
    )


def shard_path(output_dir: str, split: str, index: int, count: int) -> str:
    return os.path.join(output_dir, "data", f"{split}-{index:05d}-of-{count:05d}.parquet")


def write_shard(rows: list[dict], path: str, schema=None) -> None:
    """Write rows as one Parquet shard, atomically: by default with the MG2 features (their metadata included)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=schema if schema is not None else mg2_features().arrow_schema)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def data_files(dataset_dir: str) -> dict[str, list[str]]:
    """`{split: [shard paths]}` of a local MG2 dataset folder."""
    files = {split: sorted(glob.glob(os.path.join(dataset_dir, "data", f"{split}-*.parquet"))) for split in SPLITS}
    files = {split: paths for split, paths in files.items() if paths}
    if not files:
        raise ValueError(f"No MG2 dataset in {dataset_dir!r}: expected data/{{train,validation,test}}-*.parquet.")
    return files


def load_mg2_dataset(path: str, split: str = "train", streaming: bool = True):
    """Open split `split` of an MG2 dataset: a local folder built by `prepare_data.py` or a Hub dataset id."""
    from datasets import Audio, load_dataset

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if os.path.isdir(path):
        files = data_files(path)
        if split not in files:
            raise ValueError(f"The dataset in {path!r} has no {split!r} split (it has {sorted(files)}).")
        dataset = load_dataset("parquet", data_files={split: files[split]}, split=split, streaming=streaming)
    else:
        dataset = load_dataset(path, split=split, streaming=streaming)
    return dataset.cast_column("audio", Audio(sampling_rate=SAMPLE_RATE, decode=False))


def window_start(
    clip_id: str, seed: int, epoch: int, total_frames: int, window_frames: int, frame_seconds: float, melody: Melody
) -> int:
    """A seeded random window start (in frames) drawn from `(seed, epoch, clip_id)`, so a resumed run crops exactly as
    the uninterrupted one. The window holds a note of `melody`; one that would not starts at the first note instead."""
    last = max(0, total_frames - window_frames)
    if last == 0:
        return 0
    start = int(np.random.default_rng([seed, epoch, zlib.crc32(clip_id.encode())]).integers(0, last + 1))
    window = (start * frame_seconds, (start + window_frames) * frame_seconds)
    if np.any((melody.onsets < window[1]) & (melody.offsets > window[0])):
        return start
    return min(int(melody.onsets[0] / frame_seconds), last)


class MG2Example:
    """Turns one dataset row into model inputs: waveform, log-mel, melody ids/mask and (optional) text ids.

    Each example is a `clip_seconds` window of the clip (zero-padded when the clip is shorter): the
    first one, or with `random_crop` one drawn from `(seed, epoch, clip_id)` on the mel hop grid, so a
    resumed run crops exactly as the uninterrupted one. The melody is cut to the same window and
    shifted to start at 0 s (`Melody.slice`), so every melody input matches the audio it comes with;
    `clip_melody_tokens` keeps the whole clip's melody (the one a melody index stores).
    Captions are tokenized by `tokenizer` (any transformers tokenizer) when given.
    """

    def __init__(
        self,
        clip_seconds: float = 10.24,
        tokenizer=None,
        max_text_length: int = 77,
        max_melody_length: int = MAX_MELODY_TOKENS,
        mel: LogMelSpectrogram | None = None,
        random_crop: bool = False,
        seed: int = 0,
    ):
        self.clip_samples = int(round(clip_seconds * SAMPLE_RATE))
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.max_melody_length = max_melody_length
        self.mel = mel or LogMelSpectrogram()
        self.random_crop, self.seed, self.epoch = random_crop, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def crop_start(self, clip_id: str, num_samples: int, melody: Melody) -> int:
        """First sample of this row's window (see `window_start`; in mel hops)."""
        if not self.random_crop:
            return 0
        hops = window_start(
            clip_id,
            self.seed,
            self.epoch,
            num_samples // HOP_LENGTH,
            self.clip_samples // HOP_LENGTH,
            HOP_LENGTH / SAMPLE_RATE,
            melody,
        )
        return hops * HOP_LENGTH

    def __call__(self, row: dict) -> dict:
        waveform = load_audio(row["audio"]["bytes"] if row["audio"].get("bytes") else row["audio"]["path"])
        clip_melody = (
            Melody.from_notes(row["melody_notes"])
            if row.get("melody_notes")
            else Melody.from_tokens(row["melody_tokens"])
        )
        start = self.crop_start(row.get("clip_id", ""), len(waveform), clip_melody)
        waveform = waveform[start : start + self.clip_samples]
        waveform = torch.from_numpy(np.pad(waveform, (0, self.clip_samples - len(waveform))))
        with torch.no_grad():
            log_mel = self.mel(waveform)
        window_seconds = (start / SAMPLE_RATE, (start + self.clip_samples) / SAMPLE_RATE)
        if window_seconds[0] == 0 and clip_melody.duration <= window_seconds[1]:
            melody_tokens = row["melody_tokens"]  # the window holds the whole melody
        else:
            melody_tokens = clip_melody.slice(*window_seconds).to_tokens()
        melody = encode_melody_tokens(melody_tokens, max_length=self.max_melody_length)
        example = {
            "clip_id": row.get("clip_id", ""),
            "caption": row["caption"],
            "melody_tokens": melody_tokens,
            "clip_melody_tokens": row["melody_tokens"],
            "crop_start_s": window_seconds[0],
            "waveform": waveform,
            "log_mel": log_mel,
            "melody_input_ids": torch.from_numpy(melody["input_ids"]),
            "melody_attention_mask": torch.from_numpy(melody["attention_mask"]),
        }
        if self.tokenizer is not None:
            text = self.tokenizer(
                row["caption"],
                max_length=self.max_text_length,
                truncation=True,
                padding="max_length",
                return_tensors="pt",
            )
            example["input_ids"] = text["input_ids"][0]
            example["attention_mask"] = text["attention_mask"][0]
        return example


class LatentCrop:
    """Turns one row of a latent cache (`train_mg2.py` writes it: the whole clip's VAE latents and melody frames, its
    CLMP text and retrieved-melody embeddings, the caption's token states) into a random `crop_frames`-frame
    training example, as `MG2Example` crops audio: same seeded windows, the melody sliced to the window for the pooled
    condition. Token states are padded with zeros to `max_text_length` beside their attention mask."""

    def __init__(
        self,
        crop_frames: int,
        frame_seconds: float,
        seed: int = 0,
        max_melody_length: int = MAX_MELODY_TOKENS,
        max_text_length: int | None = None,
    ):
        self.crop_frames, self.frame_seconds, self.seed, self.epoch = crop_frames, frame_seconds, seed, 0
        self.max_melody_length, self.max_text_length = max_melody_length, max_text_length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _crop(self, row: dict, name: str, start: int) -> torch.Tensor:
        array = np.frombuffer(row[name], dtype=np.float16).reshape(row[f"{name}_shape"])[
            :, start : start + self.crop_frames
        ]
        return torch.from_numpy(
            np.pad(array.astype(np.float32), ((0, 0), (0, self.crop_frames - array.shape[1]), (0, 0)))
        )

    def __call__(self, row: dict) -> dict:
        melody = Melody.from_notes(row["melody_notes"])
        start = window_start(
            row["clip_id"],
            self.seed,
            self.epoch,
            row["latents_shape"][1],
            self.crop_frames,
            self.frame_seconds,
            melody,
        )
        window = melody.slice(start * self.frame_seconds, (start + self.crop_frames) * self.frame_seconds)
        tokens = encode_melody_tokens(window.to_tokens(), max_length=self.max_melody_length)
        example = {
            "clip_id": row["clip_id"],
            "caption": row["caption"],
            "latents": self._crop(row, "latents", start),
            "text_embeds": torch.tensor(row["text_embeds"]),
            "retrieved_embeds": torch.tensor(row["retrieved_embeds"]),
            "melody_input_ids": torch.from_numpy(tokens["input_ids"]),
            "melody_attention_mask": torch.from_numpy(tokens["attention_mask"]),
        }
        if row.get("melody_frames"):
            example["melody_frames"] = self._crop(row, "melody_frames", start)
        if row.get("text_states"):
            if self.max_text_length is None:  # not a ValueError: the loader skips rows that raise one
                raise TypeError("This cache holds token states: LatentCrop needs max_text_length (the processor's).")
            length, width = row["text_states_shape"]
            states = np.frombuffer(row["text_states"], dtype=np.float16).reshape(length, width).astype(np.float32)
            example["text_states"] = torch.from_numpy(np.pad(states, ((0, self.max_text_length - length), (0, 0))))
            example["text_mask"] = (torch.arange(self.max_text_length) < length).long()
        return example


def collate_examples(examples: list[dict]) -> dict:
    """Stack tensors; keep strings (captions, clip ids) as lists."""
    return {
        key: torch.stack([example[key] for example in examples])
        if isinstance(examples[0][key], torch.Tensor)
        else [example[key] for example in examples]
        for key in examples[0]
    }


def streaming_dataloader(
    dataset,
    batch_size: int,
    example_transform: Callable[[dict], dict],
    shuffle_buffer_size: int = 1000,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    skip_examples: int = 0,
    drop_last: bool = False,
):
    """Streamed dataset → shuffle buffer → this process's part (`split_dataset_by_node`) → examples → batches.

    Each of the `world_size` processes reads a disjoint part of the data (whole shards when the shard
    count divides evenly, else every `world_size`-th row), so use it with
    `Accelerator(dispatch_batches=False)` or `accelerator.prepare` skipped for this loader.
    With `num_workers` > 0, each worker reads whole shards (workers beyond the shard count idle).
    `skip_examples` drops that many rows of this process's stream first (resuming mid-epoch);
    `drop_last` keeps every batch full, which collectives across processes need.
    Rows that fail to decode are skipped and counted in `dataloader.dataset.skipped` (in the main
    process, i.e. with `num_workers=0`; workers count their own copies).
    """
    from datasets.distributed import split_dataset_by_node

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if shuffle_buffer_size > 0:
        # One shard at a time feeds the buffer (the shard order is shuffled). More would read them in a thread pool
        # that competes with training for the cores and that `datasets` waits 5 s after every pass to shut down.
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size, max_buffer_input_shards=1)
    if world_size > 1:
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    if skip_examples:
        dataset = dataset.skip(skip_examples)
    examples = _SkippingExamples(dataset, example_transform)
    # The loader draws its workers' seed from its own generator, not the global one: starting a loader mid-run (a
    # resumed run does) must not move the random state that dropout and the rest of training draw from.
    return torch.utils.data.DataLoader(
        examples,
        batch_size=batch_size,
        collate_fn=collate_examples,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )


class _SkippingExamples(torch.utils.data.IterableDataset):
    """Applies the example transform lazily; a corrupt row is skipped and counted, never fatal."""

    def __init__(self, dataset, transform: Callable[[dict], dict]):
        self.dataset, self.transform, self.skipped = dataset, transform, 0

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        if hasattr(self.transform, "set_epoch"):
            self.transform.set_epoch(epoch)

    def __iter__(self):
        # Inside a DataLoader worker, the 🤗 IterableDataset gives each worker its own shards by itself.
        for row in self.dataset:
            try:
                example = self.transform(row)
            except ValueError:
                self.skipped += 1
                continue
            yield example
