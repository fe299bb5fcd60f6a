import glob
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import soundfile
import torch
from conftest import PREPARE_DATA, ROOT, TINY_BUILD_ARGS, run_prepare_data

from mg2_pipeline.audio import HOP_LENGTH, encode_flac, load_audio
from mg2_pipeline.data import (
    SPLITS,
    MG2Example,
    data_files,
    load_mg2_dataset,
    mg2_features,
    streaming_dataloader,
    write_shard,
)
from mg2_pipeline.melody import Melody
from mg2_pipeline.synth import SoundFontSynth, Track


def read_split(dataset_dir: str, split: str) -> list[dict]:
    rows = []
    for path in data_files(dataset_dir).get(split, []):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def test_tiny_build_has_disjoint_splits_and_consistent_rows(tiny_dataset):
    files = data_files(tiny_dataset)
    assert set(files) == set(SPLITS)
    assert all(os.path.basename(path).split("-")[0] in SPLITS for paths in files.values() for path in paths)
    tunes = {split: {row["tune_id"] for row in read_split(tiny_dataset, split)} for split in SPLITS}
    assert not (tunes["train"] & tunes["validation"]) and not (tunes["train"] & tunes["test"])
    assert not (tunes["validation"] & tunes["test"])

    rows = [row for split in SPLITS for row in read_split(tiny_dataset, split)]
    for row in rows:
        waveform, sample_rate = soundfile.read(io.BytesIO(row["audio"]["bytes"]))
        assert sample_rate == 16000 and waveform.shape == (64000,)  # --clip_seconds 4
        assert 0.5 < np.abs(waveform).max() <= 0.91  # peak-normalised to 0.9
        melody = Melody.from_notes(row["melody_notes"])
        assert melody.to_tokens() == row["melody_tokens"]
        assert melody.offsets.max() <= 4.0 + 1e-9  # the melody lies inside its clip
        assert str(int(round(row["tempo_bpm"]))) in row["caption"]
        assert row["key"] in row["caption"]
        assert row["programs"] and all(0 <= p < 128 for p in row["programs"])
        assert re.fullmatch(r"\d+/\d+", row["meter"]) and row["tune_type"].lower() in row["caption"].lower()
        assert row["origin"] in row["caption"]

    summary = json.load(open(os.path.join(tiny_dataset, "summary.json")))
    assert summary["clips"] == len(rows)
    assert summary["tunes"] == sum(len(ids) for ids in tunes.values())
    assert summary["skipped"] == 0
    card = open(os.path.join(tiny_dataset, "README.md")).read()
    assert card.startswith("---\n") and "configs:" in card and "path: data/train-*.parquet" in card
    # The features metadata makes the audio column an Audio feature for 🤗 datasets and the Hub.
    from datasets import Features

    schema = pq.read_schema(files["train"][0])
    assert Features.from_arrow_schema(schema) == mg2_features()


def test_build_is_deterministic_and_resumable(tiny_dataset, tmp_path):
    output_dir = str(tmp_path / "again")
    run_prepare_data("--output_dir", output_dir, *TINY_BUILD_ARGS)
    shards = sorted(glob.glob(os.path.join(output_dir, "data", "*.parquet")))
    assert [os.path.basename(p) for p in shards] == [
        os.path.basename(p) for p in sorted(glob.glob(os.path.join(tiny_dataset, "data", "*.parquet")))
    ]
    for mine, theirs in zip(shards, sorted(glob.glob(os.path.join(tiny_dataset, "data", "*.parquet")))):
        assert pq.read_table(mine).equals(pq.read_table(theirs))

    # Interrupted build: one shard lost. A rerun rebuilds exactly that shard and touches no other.
    lost = shards[1]
    reference = pq.read_table(lost)
    os.remove(lost)
    # A hard link to each kept shard: a rerun that replaced one would leave the link on the old file; one that wrote
    # into it would change its bytes. No clock is read.
    links = {path: str(tmp_path / f"kept-{os.path.basename(path)}") for path in shards if path != lost}
    for path, link in links.items():
        os.link(path, link)
    kept_bytes = {path: open(path, "rb").read() for path in links}
    result = run_prepare_data("--output_dir", output_dir, *TINY_BUILD_ARGS)
    assert f"{len(shards) - 1} already built, 1 to build" in result.stdout
    assert pq.read_table(lost).equals(reference)
    assert all(os.path.samefile(p, link) and open(p, "rb").read() == kept_bytes[p] for p, link in links.items())

    # Other settings into the same folder are refused instead of mixing two datasets.
    refused = subprocess.run(
        [sys.executable, PREPARE_DATA, "--output_dir", output_dir, *TINY_BUILD_ARGS, "--clips_per_tune", "1"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "clips_per_tune" in refused.stderr


def test_streamed_dataset_returns_identical_content(tiny_dataset):
    for split in SPLITS:
        streamed = list(load_mg2_dataset(tiny_dataset, split=split, streaming=True))
        on_disk = read_split(tiny_dataset, split)
        assert streamed == on_disk


def test_streaming_dataloader_collates_tensors_and_splits_by_node(tiny_dataset):
    from transformers import BertTokenizerFast

    dataset = load_mg2_dataset(tiny_dataset, split="train")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "on", "in", "major", "minor", "bpm"]
    tokenizer = BertTokenizerFast(vocab_file=_write_vocab(vocab, tiny_dataset), do_lower_case=True)
    transform = MG2Example(clip_seconds=4, tokenizer=tokenizer, max_text_length=16)
    loader = streaming_dataloader(dataset, batch_size=4, example_transform=transform, shuffle_buffer_size=8, seed=0)
    batch = next(iter(loader))
    assert batch["waveform"].shape == (4, 64000)
    assert batch["log_mel"].shape == (4, 400, 64) and batch["log_mel"].dtype == torch.float32
    assert batch["melody_input_ids"].shape == batch["melody_attention_mask"].shape == (4, 1000)
    assert batch["input_ids"].shape == (4, 16) and len(batch["caption"]) == 4
    assert torch.all(batch["melody_input_ids"][:, 0] == 0)  # <s>

    everything = sorted(row["clip_id"] for row in read_split(tiny_dataset, "train"))
    parts = []
    for rank in range(2):
        node_loader = streaming_dataloader(
            dataset,
            batch_size=3,
            example_transform=MG2Example(clip_seconds=4),
            shuffle_buffer_size=8,
            seed=0,
            rank=rank,
            world_size=2,
        )
        parts.append([clip for batch in node_loader for clip in batch["clip_id"]])
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == everything

    # DataLoader workers read whole shards each: together they still see every clip exactly once.
    with_workers = streaming_dataloader(
        dataset, batch_size=3, example_transform=MG2Example(clip_seconds=4), shuffle_buffer_size=8, num_workers=2
    )
    assert sorted(clip for batch in with_workers for clip in batch["clip_id"]) == everything


def test_random_crops_carry_exactly_the_notes_of_their_window_and_repeat_per_seed_and_epoch(tiny_dataset):
    row = read_split(tiny_dataset, "train")[0]
    clip = load_audio(row["audio"]["bytes"])
    notes = np.array(row["melody_notes"])
    starts = set()
    for epoch in range(6):
        transform = MG2Example(clip_seconds=1.28, random_crop=True, seed=3)
        transform.set_epoch(epoch)
        example = transform(row)
        start = example["crop_start_s"]
        first = int(round(start * 16000))
        assert first % HOP_LENGTH == 0 and 0 <= first <= len(clip) - 20480
        assert torch.equal(example["waveform"], torch.from_numpy(clip[first : first + 20480]))
        # the window's notes, written out by hand: every note sounding in [start, start + 1.28), cut and shifted
        inside = notes[(notes[:, 1] < start + 1.28) & (notes[:, 2] > start)]
        expected = np.stack(
            [inside[:, 0], np.maximum(inside[:, 1], start) - start, np.minimum(inside[:, 2], start + 1.28) - start], 1
        )
        assert example["melody_tokens"] == Melody(expected).to_tokens()
        assert example["clip_melody_tokens"] == row["melody_tokens"]
        again = MG2Example(clip_seconds=1.28, random_crop=True, seed=3)
        again.set_epoch(epoch)
        assert again(row)["crop_start_s"] == start  # a resumed run crops the same window
        starts.add(start)
    assert len(starts) > 1  # epochs see different parts of the clip

    whole = MG2Example(clip_seconds=4, random_crop=True, seed=3)(row)  # the window is the clip: nothing is cut
    assert whole["crop_start_s"] == 0 and whole["melody_tokens"] == row["melody_tokens"]
    first_window = MG2Example(clip_seconds=1.28)(row)
    assert (
        first_window["crop_start_s"] == 0 and first_window["melody_tokens"] == Melody(notes).slice(0, 1.28).to_tokens()
    )


def test_corpus_titles_print_as_their_sources_do():
    sys.path.insert(0, os.path.join(ROOT, "training"))
    from prepare_data import list_corpus_tunes, normalise_title

    titles = {tune.tune_id: tune.title for tune in list_corpus_tunes()}
    assert titles["essen/lux/238"] == "Die Königskinder (16a)"  # CP437 umlauts, no longer "Kâ\x94Nigskinder (16A)"
    assert "Da unser Herr Jesus am Tischlein saß (Band 1), S. 26" in titles.values()
    assert "A Bhruinnillin Bhéasach, S. 36" in titles.values()  # a Latin-1 file stays as it is
    assert "Thompson's Reel" in titles.values() and "French Marine's March." in titles.values()
    assert "Lanigan's Ball -- Jig" in titles.values()  # "LANIGAN'S BALL -- JIG" in Ryan's Mammoth
    assert not [title for title in titles.values() if "'S " in title or title.endswith("'S")]
    assert "McLean's Lamentation" in titles.values() and "Col. McBain's -- Reel." in titles.values()
    assert normalise_title("O'NEILL'S MARCH") == "O'Neill's March"
    assert normalise_title("WEDDING RING -- REEL., THE") == "Wedding Ring -- Reel., The"
    assert normalise_title("Jock o' the Syde") == "Jock o' the Syde"


def test_loader_skips_and_counts_corrupt_rows(tiny_dataset, tmp_path):
    rows = read_split(tiny_dataset, "validation")
    rows[0] = dict(rows[0], audio={"bytes": b"not audio at all", "path": "broken.flac"})
    write_shard(rows, str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    loader = streaming_dataloader(
        load_mg2_dataset(str(tmp_path), split="train"),
        batch_size=2,
        example_transform=MG2Example(clip_seconds=4),
        shuffle_buffer_size=0,
    )
    clips = [clip for batch in loader for clip in batch["clip_id"]]
    assert len(clips) == len(rows) - 1 and rows[0]["clip_id"] not in clips
    assert loader.dataset.skipped == 1


def test_from_audio_folder_transcribes_and_counts_bad_files(tmp_path):
    source = tmp_path / "my_clips"
    source.mkdir()
    synth = SoundFontSynth()
    for name, text in [("tune_a", "C4:0.4 E4:0.4 G4:0.4 C5:0.8"), ("tune_b", "A4:0.5 G4:0.5 F4:0.5 E4:1")]:
        melody = Melody.from_string(" ".join([text] * 3))
        soundfile.write(source / f"{name}.wav", synth.render([Track(melody.notes, 71)], 6 * 16000), 16000)
    (source / "broken.wav").write_bytes(b"RIFF....WAVE garbage")
    (source / "captions.csv").write_text(
        "file_name,caption\ntune_a.wav,a clarinet arpeggio\ntune_b.wav,a descending clarinet line\nbroken.wav,lost\n"
    )
    output_dir = str(tmp_path / "mine")
    run_prepare_data(
        "--output_dir",
        output_dir,
        "--from_audio",
        str(source),
        "--clip_seconds",
        "3",
        "--validation_fraction",
        "0",
        "--test_fraction",
        "0",
        "--num_workers",
        "2",
    )
    summary = json.load(open(os.path.join(output_dir, "summary.json")))
    assert summary["skipped"] == 1 and "broken.wav" in summary["skipped_files"][0]["path"]
    rows = read_split(output_dir, "train")
    assert summary["clips"] == len(rows) == 4  # two 6-second recordings → two 3-second clips each
    first = next(row for row in rows if row["clip_id"] == "tune_a#0")
    assert first["caption"] == "a clarinet arpeggio" and first["source"] == "user"
    assert Melody.from_tokens(first["melody_tokens"]).pitches[:4].tolist() == [60, 64, 67, 72]
    assert load_audio(first["audio"]["bytes"]).shape == (48000,)


def test_from_audio_reads_a_saved_datasets_folder(tmp_path):
    from datasets import Dataset

    melody = Melody.from_string("D4:0.5 F#4:0.5 A4:0.5 D5:1 A4:0.5")
    waveform = SoundFontSynth().render([Track(melody.notes, 71)], 4 * 16000)
    source = Dataset.from_dict({"sound": [{"bytes": encode_flac(waveform), "path": "reel.flac"}], "text": ["a reel"]})
    source.save_to_disk(str(tmp_path / "hf"))
    output_dir = str(tmp_path / "from_hf")
    run_prepare_data(
        "--output_dir",
        output_dir,
        "--from_audio",
        str(tmp_path / "hf"),
        "--audio_column",
        "sound",
        "--text_column",
        "text",
        "--clip_seconds",
        "4",
        "--validation_fraction",
        "0",
        "--test_fraction",
        "0",
        "--num_workers",
        "1",
    )
    (row,) = read_split(output_dir, "train")
    assert row["caption"] == "a reel" and row["title"] == "reel"
    assert Melody.from_tokens(row["melody_tokens"]).pitches.tolist() == melody.pitches.tolist()


def _write_vocab(tokens, directory) -> str:
    path = os.path.join(directory, "..", "vocab.txt")
    with open(path, "w") as handle:
        handle.write("\n".join(tokens))
    return path
