#!/usr/bin/env python
"""Build an MG2 dataset: captioned audio clips with their melodies, as sharded Parquet.

Default ("mg2-folk"): real melodies from music21's corpus (Essen folk songs, O'Neill's 1850,
Ryan's Mammoth Collection, Aird's Airs, Bach chorale sopranos, ...) cut into clips and rendered
through a General MIDI SoundFont with varied instrument, tempo, transposition, velocity and an
optional bass-and-chords accompaniment, each captioned from what was rendered.

`--from_audio PATH`: a user's own collection (a folder of audio files with captions.csv/.jsonl,
or a 🤗 dataset with audio and text columns); melodies are transcribed with basic-pitch.

    python training/prepare_data.py --output_dir data/mg2-folk
    python training/prepare_data.py --output_dir data/mine --from_audio my_clips/

Splits are made by tune (a tune's clips never cross splits). Finished shards are kept, so an
interrupted build resumes where it stopped. Unreadable inputs are skipped and counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from mg2_pipeline.audio import SAMPLE_RATE, encode_flac, load_audio
from mg2_pipeline.data import SPLITS, shard_path, write_shard
from mg2_pipeline.melody import Melody, skyline
from mg2_pipeline.synth import SoundFontSynth, Track

# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data/mg2-folk")
    parser.add_argument(
        "--max_tunes", type=int, default=3200, help="Tunes drawn (seeded) from the corpus; 0 = all (~13 000)."
    )
    parser.add_argument(
        "--clips_per_tune", type=int, default=2, help="Renderings per tune, each with its own variation."
    )
    parser.add_argument("--clip_seconds", type=float, default=10.24)
    parser.add_argument(
        "--accompaniment_prob", type=float, default=0.5, help="Probability of a bass-and-chords accompaniment."
    )
    parser.add_argument(
        "--soundfont", default=None, help="A General MIDI .sf2 (default: TimGM6mb.sf2 from pretty_midi)."
    )
    parser.add_argument("--tunes_per_shard", type=int, default=200)
    parser.add_argument("--validation_fraction", type=float, default=0.05)
    parser.add_argument("--test_fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--from_audio", default=None, help="Folder with captions.csv/.jsonl, or a 🤗 dataset (path or Hub id)."
    )
    parser.add_argument("--audio_column", default="audio")
    parser.add_argument("--text_column", default="caption")
    args = parser.parse_args(argv)
    if args.max_tunes < 0:
        parser.error(f"--max_tunes must be >= 0, got {args.max_tunes}")
    if args.clips_per_tune < 1:
        parser.error(f"--clips_per_tune must be >= 1, got {args.clips_per_tune}")
    if not 1.0 <= args.clip_seconds <= 60.0:
        parser.error(f"--clip_seconds must be in [1, 60], got {args.clip_seconds}")
    if not 0.0 <= args.accompaniment_prob <= 1.0:
        parser.error(f"--accompaniment_prob must be in [0, 1], got {args.accompaniment_prob}")
    if not (
        0 <= args.validation_fraction < 1
        and 0 <= args.test_fraction < 1
        and args.validation_fraction + args.test_fraction < 1
    ):
        parser.error("--validation_fraction and --test_fraction must be in [0, 1) and sum to < 1")
    if args.tunes_per_shard < 1 or args.num_workers < 1:
        parser.error("--tunes_per_shard and --num_workers must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------
# The music21 corpus: tunes, their metadata, and how they are performed
# ---------------------------------------------------------------------------------------------

# corpus folder → (source name, tune type when the tune does not say, origin)
CORPUS_SOURCES = {
    "essenFolksong": ("essen", "folk song", None),
    "oneills1850": ("oneills1850", "dance tune", "Irish"),
    "ryansMammoth": ("ryansMammoth", "fiddle tune", "Irish and Scottish"),
    "airdsAirs": ("airdsAirs", "air", "Scottish"),
    "miscFolk": ("miscFolk", "folk tune", None),
}
ESSEN_ORIGINS = [  # keyword of the O: field → origin adjective, first match wins
    ("China", "Chinese"),
    ("Irland", "Irish"),
    ("Luxemburg", "Luxembourgish"),
    ("Lothringen", "Lorraine"),
    ("Oesterreich", "Austrian"),
    ("Schweiz", "Swiss"),
    ("Niederlande", "Dutch"),
    ("Ungarn", "Hungarian"),
    ("Jugoslawien", "Gottschee"),
    ("Polen", "Silesian"),
    ("Deutschland", "German"),
    ("Europa", "European"),
]
TUNE_TYPES = [  # R: field pattern → tune type, first match wins
    (r"slip ?jig", "slip jig"),
    (r"jig", "jig"),
    (r"reel", "reel"),
    (r"hornpipe", "hornpipe"),
    (r"strathspey", "strathspey"),
    (r"polka", "polka"),
    (r"waltz", "waltz"),
    (r"march", "march"),
    (r"clog", "clog dance"),
    (r"fling", "highland fling"),
    (r"air", "air"),
    (r"set dance", "set dance"),
    (r"mazurka", "mazurka"),
    (r"gavotte", "gavotte"),
    (r"schottische", "schottische"),
]
TEMPO_RANGES = {  # quarter-note BPM drawn per clip
    "reel": (100, 150),
    "hornpipe": (80, 120),
    "jig": (100, 140),
    "slip jig": (100, 140),
    "polka": (110, 150),
    "strathspey": (70, 100),
    "air": (55, 85),
    "chorale": (55, 85),
    "waltz": (120, 170),
    "march": (90, 125),
}
DEFAULT_TEMPO_RANGE = (70, 135)

MELODY_PROGRAMS = {  # GM program → instrument name used in captions
    0: "piano",
    6: "harpsichord",
    8: "celesta",
    10: "music box",
    11: "vibraphone",
    12: "marimba",
    13: "xylophone",
    19: "church organ",
    21: "accordion",
    22: "harmonica",
    24: "nylon-string guitar",
    25: "steel-string guitar",
    40: "violin",
    41: "viola",
    42: "cello",
    46: "harp",
    48: "string ensemble",
    56: "trumpet",
    60: "French horn",
    65: "alto saxophone",
    68: "oboe",
    70: "bassoon",
    71: "clarinet",
    73: "flute",
    74: "recorder",
    75: "pan flute",
    78: "whistle",
    105: "banjo",
    109: "bagpipe",
    110: "fiddle",
}
# The melody programs by family of sound (the families evaluate.py's instrument classifier reads).
INSTRUMENT_FAMILIES = {
    "keyboard": [0, 6],
    "mallet/bell": [8, 10, 11, 12, 13],
    "organ/free reed": [19, 21, 22],
    "plucked": [24, 25, 46, 105],
    "bowed": [40, 41, 42, 48, 110],
    "brass": [56, 60],
    "reeds": [65, 68, 70, 71, 109],
    "flutes/pipes": [73, 74, 75, 78],
}
CHORD_PROGRAMS = {
    0: "piano",
    24: "nylon-string guitar",
    25: "steel-string guitar",
    46: "harp",
    48: "strings",
    19: "organ",
    21: "accordion",
}
BASS_PROGRAMS = {32: "acoustic bass", 33: "electric bass", 42: "cello", 43: "double bass"}


@dataclass
class TuneRef:
    """A tune located in the corpus: cheap to list, parsed only by the worker that renders it."""

    tune_id: str
    source: str
    path: str
    abc: str | None  # the tune's own ABC text when it comes from a multi-tune .abc file
    title: str
    tune_type: str
    origin: str | None


def corpus_root() -> str:
    import music21

    return os.path.join(os.path.dirname(music21.__file__), "corpus")


def _abc_field(text: str, field: str) -> str:
    match = re.search(rf"(?m)^{field}:\s*(.*)$", text)
    return match.group(1).strip() if match else ""


def read_corpus_text(path: str) -> str:
    """A corpus ABC file as text. The files are UTF-8, but some Essen files were once CP437 (DOS) text
    re-encoded byte for byte as Latin-1 → UTF-8: their umlauts arrive as C1 control characters
    (`K\x94nigskinder`). A file holding any C1 character is decoded back through CP437 (`Königskinder`)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if re.search("[\x80-\x9f]", text):
        text = text.encode("latin-1").decode("cp437")
    return text


_LOWERCASE_WORDS = {"a", "an", "and", "at", "by", "for", "from", "in", "of", "on", "or", "the", "to", "with"}


def normalise_title(title: str) -> str:
    """Titles as the source prints them; only ALL-CAPS or all-lowercase ones are title-cased, keeping
    names whole: `LANIGAN'S BALL -- JIG` → `Lanigan's Ball -- Jig`, `McLEAN'S LAMENTATION` → `McLean's Lamentation`."""
    title = " ".join(title.split())
    if not (re.sub(r"\bMc", "MC", title).isupper() or title.islower()):
        return title

    def capitalise(match: re.Match) -> str:
        word, before = match.group(0).lower(), match.string[: match.start()]
        if before.endswith("'") and len(word) == 1:
            return word  # 's Morgens (German "es")
        if word in _LOWERCASE_WORDS and before.rstrip()[-1:].isalnum():
            return word
        word = word[:1].upper() + word[1:]
        # Names: O'Neill, D'Arcy, McLean; an apostrophe before "s" or "t" starts no name.
        word = re.sub(r"^(\w)'(\w)", lambda m: f"{m.group(1)}'{m.group(2).upper()}", word)
        return re.sub(r"^Mc(\w)", lambda m: f"Mc{m.group(1).upper()}", word)

    return re.sub(r"[^\W\d_][\w']*", capitalise, title)


def _tune_type(rhythm: str, title: str, default: str) -> str:
    """The tune type the ABC `R:` field names, else the one the title names ("Lanigan's Ball -- Jig"), else `default`."""
    for text in (rhythm, title):
        for pattern, name in TUNE_TYPES:
            if re.search(pattern, text, re.IGNORECASE):
                return name
    return default


def list_corpus_tunes() -> list[TuneRef]:
    """Every tune of the folk collections and the Bach chorales, without parsing any music."""
    root = corpus_root()
    tunes = []
    for folder, (source, default_type, origin) in CORPUS_SOURCES.items():
        for directory, _, files in sorted(os.walk(os.path.join(root, folder))):
            for name in sorted(files):
                if not name.endswith(".abc") or name.startswith("test"):
                    continue
                path = os.path.join(directory, name)
                text = read_corpus_text(path)
                for block in re.split(r"(?m)^(?=X:)", text):
                    if not block.startswith("X:"):
                        continue
                    number = _abc_field(block, "X")
                    title = normalise_title(_abc_field(block, "T"))
                    tune_type = _tune_type(_abc_field(block, "R"), title, default_type)
                    if source == "essen" and name.startswith("kinder"):
                        tune_type = "children's song"
                    elif source == "essen" and name.startswith("ballad"):
                        tune_type = "ballad"
                    tune_origin = origin
                    if source == "essen":
                        place = _abc_field(block, "O")
                        tune_origin = next(
                            (adjective for keyword, adjective in ESSEN_ORIGINS if keyword in place), "European"
                        )
                    stem = os.path.splitext(name)[0]
                    tunes.append(
                        TuneRef(f"{source}/{stem}/{number}", source, path, block, title, tune_type, tune_origin)
                    )
    for path in sorted(os.path.join(root, "bach", name) for name in os.listdir(os.path.join(root, "bach"))):
        if re.fullmatch(r"bwv[\d.]+\.(mxl|xml|krn)", os.path.basename(path)):
            stem = os.path.basename(path).rsplit(".", 1)[0]
            tunes.append(TuneRef(f"bach/{stem}", "bach", path, None, f"Chorale {stem.upper()}", "chorale", "German"))
    return tunes


def split_of(tune: TuneRef, validation_fraction: float, test_fraction: float) -> str:
    """Deterministic split by tune; tunes sharing a title share a split so variants do not leak."""
    key = re.sub(r"[^a-z0-9]+", " ", tune.title.lower()).strip() or tune.tune_id
    position = int(hashlib.md5(key.encode()).hexdigest()[:8], 16) / 16**8
    if position < test_fraction:
        return "test"
    if position < test_fraction + validation_fraction:
        return "validation"
    return "train"


@dataclass
class ParsedTune:
    """A tune's melody in quarter-note beats, its bar starts, key and length."""

    notes: np.ndarray  # (N, 3): pitch, onset_beats, offset_beats
    bar_starts: np.ndarray  # beats
    length_beats: float
    tonic_pitch_class: int
    mode: str
    meter: str


def parse_tune(tune: TuneRef) -> ParsedTune:
    import music21

    score = music21.converter.parse(tune.abc, format="abc") if tune.abc else music21.converter.parse(tune.path)
    if isinstance(score, music21.stream.Opus):
        score = score.scores[0]
    try:
        score = score.expandRepeats()
    except Exception:  # malformed repeat marks: play as written
        pass
    part = score.parts[0] if isinstance(score, music21.stream.Score) and len(score.parts) else score
    flat = part.stripTies().flatten()
    notes = [
        (max(p.midi for p in element.pitches), float(element.offset), float(element.offset + element.quarterLength))
        for element in flat.notes
        if element.quarterLength > 0
    ]
    if len(notes) < 4:
        raise ValueError(f"only {len(notes)} notes")
    notes = skyline(notes)
    keys = list(flat.getElementsByClass(music21.key.Key))
    if keys:
        key = keys[0]
    else:
        signatures = list(flat.getElementsByClass(music21.key.KeySignature))
        key = signatures[0].asKey("major") if signatures else score.analyze("key")
    mode = key.mode if key.mode in ("major", "minor") else "major"
    meters = list(flat.getElementsByClass(music21.meter.TimeSignature))
    bar_beats = float(meters[0].barDuration.quarterLength) if meters else 4.0
    measures = [float(measure.offset) for measure in part.getElementsByClass(music21.stream.Measure)]
    length = float(notes[:, 2].max())
    bar_starts = np.array(measures if len(measures) > 1 else np.arange(0.0, length, bar_beats))
    return ParsedTune(
        notes=notes,
        bar_starts=bar_starts,
        length_beats=math.ceil(length / bar_beats) * bar_beats,
        tonic_pitch_class=key.tonic.pitchClass,
        mode=mode,
        meter=meters[0].ratioString if meters else "4/4",
    )


def accompaniment(tune: ParsedTune, melody_notes: np.ndarray, transpose: int) -> tuple[list, list]:
    """Bass and chord notes (in beats): per bar, the I/IV/V (i/iv/V, III/VII in minor) triad that
    best covers the bar's melody pitch classes; bass plays the root, the chord holds the bar."""
    tonic = (tune.tonic_pitch_class + transpose) % 12
    if tune.mode == "major":
        chords = [(0, (0, 4, 7)), (5, (0, 4, 7)), (7, (0, 4, 7)), (9, (0, 3, 7))]
    else:
        chords = [(0, (0, 3, 7)), (5, (0, 3, 7)), (7, (0, 4, 7)), (3, (0, 4, 7)), (10, (0, 4, 7))]
    bars = list(tune.bar_starts) + [tune.length_beats]
    bass, chord_notes = [], []
    for start, end in zip(bars, bars[1:]):
        if end <= start:
            continue
        in_bar = melody_notes[(melody_notes[:, 1] < end) & (melody_notes[:, 2] > start)]
        weights = np.zeros(12)
        for pitch, onset, offset in in_bar:
            weights[int(pitch) % 12] += min(offset, end) - max(onset, start)
        scores = [
            sum(weights[(tonic + degree + interval) % 12] for interval in intervals) for degree, intervals in chords
        ]
        degree, intervals = chords[int(np.argmax(scores))]
        root = (tonic + degree) % 12
        bass.append((36 + root, start, end))
        chord_notes.extend((48 + root + interval, start, end) for interval in intervals)
    return bass, chord_notes


def tempo_words(bpm: float) -> str:
    if bpm < 75:
        return "slow"
    if bpm < 105:
        return "moderate"
    if bpm < 135:
        return "lively"
    return "fast"


MOODS = {
    ("major", "slow"): ["gentle", "peaceful", "warm"],
    ("major", "moderate"): ["cheerful", "bright", "easygoing"],
    ("major", "lively"): ["joyful", "energetic", "bright"],
    ("major", "fast"): ["exuberant", "spirited", "driving"],
    ("minor", "slow"): ["melancholic", "mournful", "wistful"],
    ("minor", "moderate"): ["pensive", "haunting", "bittersweet"],
    ("minor", "lively"): ["wild", "dark", "restless"],
    ("minor", "fast"): ["fiery", "urgent", "dark"],
}
CAPTION_TEMPLATES = [
    "A {tempo} {tune} in {meter} time played on {instruments}, {bpm} BPM, in {key}. {mood_cap} and {mood2}.",
    "{instruments_cap} play{s} a {mood} {tune} in {key} at a {tempo} {bpm} BPM.",
    "{mood_cap} {tune}{title_part} on {instruments}; {tempo} tempo around {bpm} BPM, key of {key}.",
    "{tune_cap} in {key}: {instruments}, {tempo} ({bpm} BPM), {mood} mood.",
    "{title_cap}{tune} arranged for {instruments}. {tempo_cap}, {bpm} BPM, {key}, {mood} and {mood2}.",
]
KEY_NAMES = {  # conventional spelling of keys by tonic pitch class
    "major": ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"),
    "minor": ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B"),
}


def key_name(tonic_pitch_class: int, mode: str) -> str:
    return f"{KEY_NAMES[mode][tonic_pitch_class % 12]} {mode}"


def caption_clip(
    rng: np.random.Generator, tune: TuneRef, key: str, meter: str, bpm: float, instruments: list[str]
) -> str:
    """One caption from a randomly chosen template: instruments, tempo (BPM and word), key, tune, mood."""
    tempo = tempo_words(bpm)
    mood, mood2 = rng.choice(MOODS[(key.split()[-1], tempo)], size=2, replace=False)
    if len(instruments) == 1:
        instrument_text = f"{'an' if instruments[0][0] in 'aeiou' else 'a'} {instruments[0]}"
    else:
        instrument_text = ", ".join(instruments[:-1]) + " and " + instruments[-1]
    tune_text = f"{tune.origin} {tune.tune_type}" if tune.origin else tune.tune_type
    title = tune.title if tune.title and len(tune.title) < 60 else ""
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    if "title_cap" in template and not title:
        template = CAPTION_TEMPLATES[0]
    return template.format(
        tempo=tempo,
        tempo_cap=tempo.capitalize(),
        bpm=int(round(bpm)),
        key=key,
        meter=meter,
        mood=mood,
        mood2=mood2,
        mood_cap=mood.capitalize(),
        tune=tune_text,
        tune_cap=tune_text[0].upper() + tune_text[1:],
        instruments=instrument_text,
        instruments_cap=instrument_text[0].upper() + instrument_text[1:],
        s="s" if len(instruments) == 1 else "",
        title_part=f' ("{title}")' if title else "",
        title_cap=f'"{title}", a ' if title else "",
    )


def render_tune(tune: TuneRef, args, synth: SoundFontSynth) -> list[dict]:
    """All clips of one tune: each with its own instrument, tempo, transposition, velocity, accompaniment."""
    parsed = parse_tune(tune)
    clip_samples = int(round(args.clip_seconds * SAMPLE_RATE))
    rows = []
    for clip_index in range(args.clips_per_tune):
        rng = np.random.default_rng(
            [args.seed, int(hashlib.md5(tune.tune_id.encode()).hexdigest()[:8], 16), clip_index]
        )
        low, high = TEMPO_RANGES.get(tune.tune_type, DEFAULT_TEMPO_RANGE)
        bpm = float(rng.integers(low, high + 1))
        seconds_per_beat = 60.0 / bpm
        median = float(np.median(parsed.notes[:, 0]))
        transpose = int(rng.integers(-5, 7))
        transpose += 12 * int(round((72 - (median + transpose)) / 12))  # keep the tune around C5
        program = int(rng.choice(list(MELODY_PROGRAMS)))
        velocity = int(rng.integers(70, 116))

        # Loop the tune (folk tunes repeat) so that every clip window is filled with music.
        start_s = (
            clip_index * args.clip_seconds
            if parsed.length_beats * seconds_per_beat >= (clip_index + 1) * args.clip_seconds
            else 0.0
        )
        repeats = int(math.ceil((start_s + args.clip_seconds) / (parsed.length_beats * seconds_per_beat)))
        loop = [
            parsed.notes + np.array([transpose, r * parsed.length_beats, r * parsed.length_beats])
            for r in range(repeats)
        ]
        melody_beats = np.concatenate(loop)
        melody_seconds = melody_beats * np.array([1.0, seconds_per_beat, seconds_per_beat])
        # The clip's window, cut as `Melody.slice` cuts it, before it becomes a Melody: a whole looped tune may last
        # longer than a Melody may (MAX_MELODY_SECONDS).
        onsets = np.maximum(melody_seconds[:, 1], start_s)
        offsets = np.minimum(melody_seconds[:, 2], start_s + args.clip_seconds)
        keep = offsets > onsets
        if np.count_nonzero(keep) < 2:
            continue
        melody = Melody(np.stack([melody_seconds[keep, 0], onsets[keep] - start_s, offsets[keep] - start_s], axis=1))
        tracks = [Track(melody.notes, program, velocity)]
        programs, instruments = [program], [MELODY_PROGRAMS[program]]
        if rng.random() < args.accompaniment_prob:
            bass, chords = accompaniment(parsed, parsed.notes + np.array([transpose, 0, 0]), transpose)
            bass_beats, chord_beats = (
                [
                    (p, on + r * parsed.length_beats, off + r * parsed.length_beats)
                    for r in range(repeats)
                    for p, on, off in part
                ]
                for part in (bass, chords)
            )
            chord_program = int(rng.choice(list(CHORD_PROGRAMS)))
            bass_program = int(rng.choice(list(BASS_PROGRAMS)))
            for notes, track_program, names, loudness in (
                (chord_beats, chord_program, CHORD_PROGRAMS, 0.55),
                (bass_beats, bass_program, BASS_PROGRAMS, 0.75),
            ):
                window = [
                    (p, on * seconds_per_beat - start_s, off * seconds_per_beat - start_s)
                    for p, on, off in notes
                    if off * seconds_per_beat > start_s and on * seconds_per_beat < start_s + args.clip_seconds
                ]
                tracks.append(
                    Track([(p, max(on, 0.0), off) for p, on, off in window], track_program, int(velocity * loudness))
                )
                programs.append(track_program)
                if names[track_program] not in instruments:
                    instruments.append(names[track_program])
        waveform = synth.render(tracks, clip_samples)
        peak = float(np.abs(waveform).max())
        if peak < 1e-4:
            continue
        waveform = waveform / peak * 0.9
        key = key_name(parsed.tonic_pitch_class + transpose, parsed.mode)
        clip_id = f"{tune.tune_id}#{clip_index}"
        rows.append(
            {
                "clip_id": clip_id,
                "audio": {"bytes": encode_flac(waveform), "path": clip_id.replace("/", "_") + ".flac"},
                "caption": caption_clip(rng, tune, key, parsed.meter, bpm, instruments),
                "melody_tokens": melody.to_tokens(),
                "melody_notes": melody.to_list(),
                "tune_id": tune.tune_id,
                "title": tune.title,
                "source": tune.source,
                "key": key,
                "tempo_bpm": bpm,
                "meter": parsed.meter,
                "tune_type": tune.tune_type,
                "origin": tune.origin or "",
                "programs": programs,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# A user's own audio: transcribed with basic-pitch
# ---------------------------------------------------------------------------------------------

CAPTION_FILES = ("captions.jsonl", "captions.csv", "metadata.jsonl", "metadata.csv")


@dataclass
class AudioRef:
    """One recording of a user collection: a file path, or encoded bytes from a 🤗 dataset row."""

    tune_id: str
    caption: str
    path: str | None = None
    audio_bytes: bytes | None = None
    title: str = ""


def list_audio_items(path: str, audio_column: str, text_column: str) -> list[AudioRef]:
    caption_file = next(
        (os.path.join(path, name) for name in CAPTION_FILES if os.path.isfile(os.path.join(path, name))), None
    )
    if caption_file is not None:
        import pandas

        table = (
            pandas.read_json(caption_file, lines=True)
            if caption_file.endswith(".jsonl")
            else pandas.read_csv(caption_file)
        )
        file_column = next((c for c in ("file_name", "file", "path", audio_column) if c in table.columns), None)
        caption_column = next((c for c in (text_column, "caption", "text") if c in table.columns), None)
        if file_column is None or caption_column is None:
            raise ValueError(
                f"{caption_file} needs a file column (file_name/file/path) and a caption column ({text_column}/caption/text)."
            )
        return [
            AudioRef(
                tune_id=os.path.splitext(str(name))[0],
                caption=str(caption),
                path=os.path.join(path, str(name)),
                title=os.path.splitext(os.path.basename(str(name)))[0],
            )
            for name, caption in zip(table[file_column], table[caption_column])
        ]
    from datasets import Audio, load_dataset, load_from_disk

    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
        dataset = load_from_disk(path)
    else:
        dataset = load_dataset(path)
    if hasattr(dataset, "keys"):  # a DatasetDict: every split becomes source material, re-split by recording
        from datasets import concatenate_datasets

        dataset = concatenate_datasets([dataset[split] for split in dataset])
    missing = [column for column in (audio_column, text_column) if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The dataset at {path!r} has no column(s) {missing}; columns are {dataset.column_names}. "
            "Use --audio_column / --text_column."
        )
    dataset = dataset.cast_column(audio_column, Audio(decode=False))
    items = []
    for index, row in enumerate(dataset):
        audio = row[audio_column]
        items.append(
            AudioRef(
                tune_id=f"{os.path.basename(os.path.normpath(path))}/{index}",
                caption=str(row[text_column]),
                path=audio.get("path") if not audio.get("bytes") else None,
                audio_bytes=audio.get("bytes"),
                title=os.path.splitext(os.path.basename(audio.get("path") or str(index)))[0],
            )
        )
    return items


def estimate_tempo(waveform: np.ndarray) -> float:
    """librosa's beat-tracker tempo of a mono float32 waveform at `SAMPLE_RATE`."""
    import librosa

    return float(np.atleast_1d(librosa.beat.beat_track(y=waveform, sr=SAMPLE_RATE)[0])[0])


def transcribe_recording(item: AudioRef, args, synth=None) -> list[dict]:
    """Cut one recording into clips; the melody is transcribed once and sliced per clip."""
    waveform = load_audio(item.audio_bytes if item.audio_bytes else item.path)
    melody = Melody.from_audio(waveform, SAMPLE_RATE)
    tempo = estimate_tempo(waveform)
    clip_samples = int(round(args.clip_seconds * SAMPLE_RATE))
    rows = []
    for clip_index in range(max(1, len(waveform) // clip_samples)):
        start = clip_index * clip_samples
        clip = waveform[start : start + clip_samples]
        try:
            clip_melody = melody.slice(start / SAMPLE_RATE, (start + clip_samples) / SAMPLE_RATE)
        except ValueError:  # no note in this clip
            continue
        clip_id = f"{item.tune_id}#{clip_index}"
        rows.append(
            {
                "clip_id": clip_id,
                "audio": {"bytes": encode_flac(clip), "path": clip_id.replace("/", "_") + ".flac"},
                "caption": item.caption,
                "melody_tokens": clip_melody.to_tokens(),
                "melody_notes": clip_melody.to_list(),
                "tune_id": item.tune_id,
                "title": item.title,
                "source": "user",
                "key": "",
                "tempo_bpm": tempo,
                "meter": "",
                "tune_type": "",
                "origin": "",
                "programs": [],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# The build: workers render tunes, the main process writes shards as they complete
# ---------------------------------------------------------------------------------------------

_worker_state = {}


def _init_worker(args):
    _worker_state["args"] = args
    _worker_state["synth"] = SoundFontSynth(args.soundfont) if args.from_audio is None else None


def _process(item) -> tuple[list[dict], str | None]:
    args = _worker_state["args"]
    try:
        build = transcribe_recording if args.from_audio else render_tune
        return build(item, args, _worker_state["synth"]), None
    except Exception as error:  # one bad tune or file never stops a long build
        return [], f"{item.tune_id} ({item.path}): {type(error).__name__}: {error}"


def plan_shards(items, args) -> list[tuple[str, int, int, list]]:
    """`[(split, shard_index, shard_count, items)]`: items grouped by split, in fixed-size shards."""
    by_split = {split: [] for split in SPLITS}
    for item in items:
        by_split[split_of(item, args.validation_fraction, args.test_fraction)].append(item)
    plan = []
    for split, split_items in by_split.items():
        count = math.ceil(len(split_items) / args.tunes_per_shard)
        for index in range(count):
            plan.append(
                (split, index, count, split_items[index * args.tunes_per_shard : (index + 1) * args.tunes_per_shard])
            )
    return plan


def build(args) -> dict:
    os.makedirs(args.output_dir, exist_ok=True)
    settings = {key: value for key, value in vars(args).items() if key not in ("output_dir", "num_workers")}
    settings_path = os.path.join(args.output_dir, "build_args.json")
    if os.path.isfile(settings_path):
        with open(settings_path) as handle:
            previous = json.load(handle)
        if previous != settings:
            changed = sorted(key for key in settings if previous.get(key) != settings[key])
            raise SystemExit(
                f"{args.output_dir} was built with other settings ({', '.join(changed)}); "
                "use a new --output_dir or delete it to rebuild."
            )
    else:
        with open(settings_path, "w") as handle:
            json.dump(settings, handle, indent=2)

    if args.from_audio:
        items = list_audio_items(args.from_audio, args.audio_column, args.text_column)
    else:
        items = list_corpus_tunes()
        if args.max_tunes:
            order = np.random.default_rng(args.seed).permutation(len(items))[: args.max_tunes]
            items = [items[i] for i in sorted(order)]
    plan = plan_shards(items, args)
    todo = [shard for shard in plan if not os.path.isfile(shard_path(args.output_dir, *shard[:3]))]
    skipped_log = os.path.join(args.output_dir, "skipped.jsonl")
    print(
        f"{len(items)} {'recordings' if args.from_audio else 'tunes'} in {len(plan)} shards; "
        f"{len(plan) - len(todo)} already built, {len(todo)} to build."
    )

    work = [item for shard in todo for item in shard[3]]
    remaining = {id(shard): len(shard[3]) for shard in todo}
    shard_of = {id(item): shard for shard in todo for item in shard[3]}
    rows_of = {id(shard): [] for shard in todo}
    skipped_of = {id(shard): [] for shard in todo}
    if args.from_audio and args.num_workers > 1 and work:
        # Compile and cache the beat tracker here first: workers compiling librosa's cached gufuncs at the same
        # time can write mismatched cache files and segfault (numba/numba#10128), which would hang the pool.
        clicks = np.zeros(4 * SAMPLE_RATE, np.float32)
        clicks[:: SAMPLE_RATE // 2] = 1.0
        estimate_tempo(clicks)
    pool = (
        multiprocessing.Pool(args.num_workers, initializer=_init_worker, initargs=(args,))
        if args.num_workers > 1
        else None
    )
    if pool is None:
        _init_worker(args)
    results = pool.imap(_process, work, chunksize=4) if pool else map(_process, work)
    try:
        for item, (rows, error) in tqdm(zip(work, results), total=len(work), desc="Rendering clips", unit="tune"):
            shard = shard_of[id(item)]
            rows_of[id(shard)].extend(rows)
            if error:
                skipped_of[id(shard)].append({"item": item.tune_id, "path": item.path, "error": error})
            remaining[id(shard)] -= 1
            if remaining[id(shard)] == 0:
                # Skip records first, shard second: a shard on disk always has its skips logged.
                with open(skipped_log, "a") as handle:
                    for record in skipped_of.pop(id(shard)):
                        handle.write(json.dumps(record) + "\n")
                write_shard(rows_of.pop(id(shard)), shard_path(args.output_dir, *shard[:3]))
    finally:
        if pool:
            pool.close()
            pool.join()

    summary = summarize(args.output_dir, plan, skipped_log, args)
    write_dataset_card(args.output_dir, summary, args)
    return summary


def summarize(output_dir: str, plan, skipped_log: str, args) -> dict:
    """Figures read back from the shards on disk (so a resumed build reports the whole dataset)."""
    import pyarrow.parquet as pq

    from mg2_pipeline.synth import default_soundfont

    clips, tunes, seconds, programs, sources = Counter(), {}, 0.0, Counter(), Counter()
    for split, index, count, _ in plan:
        table = pq.read_table(shard_path(output_dir, split, index, count), columns=["tune_id", "source", "programs"])
        clips[split] += table.num_rows
        tunes.setdefault(split, set()).update(table.column("tune_id").to_pylist())
        sources.update(table.column("source").to_pylist())
        for clip_programs in table.column("programs").to_pylist():
            programs.update(clip_programs)
        seconds += table.num_rows * args.clip_seconds
    planned = {item.tune_id for shard in plan for item in shard[3]}
    skipped = []
    if os.path.isfile(skipped_log):
        with open(skipped_log) as handle:
            skipped = [record for record in map(json.loads, handle) if record["item"] in planned]
    summary = {
        "clips": sum(clips.values()),
        "clips_per_split": dict(clips),
        "hours": round(seconds / 3600, 2),
        "tunes": sum(len(ids) for ids in tunes.values()),
        "tunes_per_split": {split: len(ids) for split, ids in tunes.items()},
        "sources": dict(sources.most_common()),
        "instruments": {str(program): n for program, n in sorted(programs.items())},
        "skipped": len(skipped),
        "skipped_files": skipped,
        "clip_seconds": args.clip_seconds,
        "sample_rate": SAMPLE_RATE,
        "soundfont": os.path.basename(args.soundfont or default_soundfont()) if not args.from_audio else None,
        "seed": args.seed,
    }
    with open(os.path.join(output_dir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def write_dataset_card(output_dir: str, summary: dict, args) -> None:
    splits = [split for split in SPLITS if summary["clips_per_split"].get(split)]
    configs = "\n".join(f"      - split: {split}\n        path: data/{split}-*.parquet" for split in splits)
    split_info = "\n".join(
        f"    - name: {split}\n      num_examples: {summary['clips_per_split'][split]}" for split in splits
    )
    origin = (
        f"audio from `{args.from_audio}`, melodies transcribed with basic-pitch"
        if args.from_audio
        else (
            "melodies from the music21 corpus (Essen folk songs, O'Neill's 1850, Ryan's Mammoth Collection, Aird's Airs, "
            f"Bach chorales), rendered with the `{summary['soundfont']}` General MIDI SoundFont"
        )
    )
    card = f"""---
pretty_name: {os.path.basename(os.path.normpath(output_dir))}
task_categories:
- text-to-audio
tags:
- music
- melody
- mg2
configs:
  - config_name: default
    data_files:
{configs}
dataset_info:
  splits:
{split_info}
---

# {os.path.basename(os.path.normpath(output_dir))}

An MG2 dataset: {summary["clips"]} captioned {args.clip_seconds}-second clips at {SAMPLE_RATE} Hz
({summary["hours"]} hours, {summary["tunes"]} tunes), {origin}.
Splits are by tune: no tune has clips in two splits. Built by `training/prepare_data.py` (seed {args.seed}).

| column | content |
|---|---|
| `audio` | FLAC bytes, mono {SAMPLE_RATE} Hz (decode with soundfile) |
| `caption` | text describing instrument(s), tempo, key and mode, tune type and origin |
| `melody_tokens` | the melody in MG2 triplet tokens `<Pitch>,<dur_bin>,<gap_bin>` joined by `|` |
| `melody_notes` | the melody as `[midi_pitch, onset_s, offset_s]` |
| `tune_id`, `title`, `source` | where the tune comes from |
| `key`, `tempo_bpm`, `programs` | what was rendered (General MIDI program numbers) |
| `meter` | the score's first time signature, e.g. `6/8` (empty for transcribed audio) |
| `origin` | where the tune comes from, as the caption says it: Irish, Scottish, Irish and Scottish, Chinese, German, … (empty when unknown) |
| `tune_type` | jig, slip jig, reel, hornpipe, strathspey, polka, waltz, march, air, chorale, folk song, ballad, children's song, …: the ABC `R:` field, else the title, else the collection's kind of tune (empty for transcribed audio) |

Skipped inputs: {summary["skipped"]} (listed in `summary.json`).

```python
from mg2_pipeline.data import load_mg2_dataset
train = load_mg2_dataset("{output_dir}", split="train")  # streaming
```
"""
    with open(os.path.join(output_dir, "README.md"), "w") as handle:
        handle.write(card)


def main(argv=None):
    args = parse_args(argv)
    summary = build(args)
    splits = " / ".join(f"{split} {count}" for split, count in summary["clips_per_split"].items())
    print(
        f"{summary['clips']} clips ({splits}), {summary['hours']} hours, {summary['tunes']} tunes, "
        f"{len(summary['instruments'])} GM programs, {summary['skipped']} inputs skipped."
    )
    print(f"Dataset written to {args.output_dir}; details in {os.path.join(args.output_dir, 'summary.json')}.")
    return summary


if __name__ == "__main__":
    main()
