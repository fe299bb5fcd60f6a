"""Melodies as note events, and the MG2 triplet token scheme.

A `Melody` is a sequence of notes `(midi_pitch, onset_s, offset_s)`. It converts to and from the
original MG2 interchange format, where every note becomes `<Pitch>,<dur_bin>,<gap_bin>` and notes are
joined by `|` (e.g. `<G4>,<114>,<79>|<A4>,<119>,<81>`), and reads MIDI, MusicXML/ABC (music21),
compact note strings and audio (basic-pitch transcription).
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import re
from typing import Iterable, Sequence

import numpy as np

PITCH_CLASS_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", ",", "|")
UNUSED_TOKENS = ("<bol>", "<bom>", "<bop>", "<eol>", "<eom>", "<eop>")
NUM_TIME_BINS = 512
MIN_TIME_S = -0.3
MAX_TIME_S = 6.0
MAX_MELODY_TOKENS = 1000
# Bounds on any melody, so that one request cannot ask for unbounded work (a piano roll of a 28-hour note):
# a note lasts at most a minute, a melody at most ten minutes and 10 000 notes.
MAX_NOTE_SECONDS = 60.0
MAX_MELODY_SECONDS = 600.0
MAX_NOTES = 10_000
MAX_MELODY_TEXT_CHARACTERS = 200_000  # 10 000 notes as tokens
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
# The melody sketch's envelope. Training draws each clip's attack and release from these ranges (`timbre_seed`); the
# plain sketch that guides generation takes their centre: with 10 ms fades, the sharp end of the ranges, the generated
# audio clicked at every note change.
SKETCH_ATTACK_RANGE_S = (0.002, 0.08)
SKETCH_RELEASE_RANGE_S = (0.005, 0.1)
PLAIN_SKETCH_ATTACK_S = 0.04
PLAIN_SKETCH_RELEASE_S = 0.05
# The vocabulary has pitch tokens for octaves -1..9 (C-1 = MIDI 0 ... B9 = 131); only 0..127 are MIDI pitches.
MAX_MIDI_PITCH = 127

_LOG_MIN = math.log(MIN_TIME_S + 1)  # log 0.7
_LOG_MAX = math.log(MAX_TIME_S + 1)  # log 7
ZERO_SECONDS_BIN = 79

BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, FIELD_SEPARATOR, NOTE_SEPARATOR = SPECIAL_TOKENS
PAD_TOKEN = EOS_TOKEN  # the original vocabulary has no pad token; padding is masked out anyway


def pitch_to_name(pitch: int) -> str:
    """MIDI pitch → note name with sharps, MIDI 60 → `C4`."""
    return f"{PITCH_CLASS_NAMES[pitch % 12]}{pitch // 12 - 1}"


_NAME_PATTERN = re.compile(r"^([A-Ga-g])([#b]?)(-?\d+)$")


def name_to_pitch(name: str) -> int:
    """Note name (`C#4`, `Db4`, `Cb4`, `G-1`) → MIDI pitch. Raises `ValueError` for unknown names."""
    match = _NAME_PATTERN.match(name)
    if match is None:
        raise ValueError(
            f"Unknown pitch name {name!r}: expected a note letter A-G, optional # or b, and an octave, e.g. 'C#4'."
        )
    letter, accidental, octave = match.group(1).upper(), match.group(2), int(match.group(3))
    pitch = (octave + 1) * 12 + PITCH_CLASS_NAMES.index(letter) + {"#": 1, "b": -1, "": 0}[accidental]
    if not 0 <= pitch <= MAX_MIDI_PITCH:
        raise ValueError(f"Pitch name {name!r} is MIDI {pitch}, outside the MIDI range 0-{MAX_MIDI_PITCH}.")
    return pitch


def seconds_to_bin(seconds: float | np.ndarray) -> np.ndarray:
    """Clip to [-0.3, 6] s and log-bin into 512 bins (0 s → bin 79), the original MG2 formula."""
    clipped = np.clip(np.asarray(seconds, dtype=np.float64), MIN_TIME_S, MAX_TIME_S)
    scaled = (np.log(clipped + 1) - _LOG_MIN) / (_LOG_MAX - _LOG_MIN) * (NUM_TIME_BINS - 1)
    return np.round(scaled).astype(np.int64)


def bin_to_seconds(time_bin: int | np.ndarray) -> np.ndarray:
    """Inverse of `seconds_to_bin` (bin centres); bin 79 decodes to exactly 0 s."""
    time_bin = np.asarray(time_bin, dtype=np.int64)
    seconds = np.exp(time_bin * (_LOG_MAX - _LOG_MIN) / (NUM_TIME_BINS - 1) + _LOG_MIN) - 1
    return np.where(time_bin == ZERO_SECONDS_BIN, 0.0, seconds)


def build_melody_vocab() -> dict[str, int]:
    """The 655-token vocabulary of the original MG2: specials, then all others in string order, then unused."""
    time_tokens = [f"<{i}>" for i in range(NUM_TIME_BINS)]
    pitch_tokens = [f"<{name}{octave}>" for octave in range(-1, 10) for name in PITCH_CLASS_NAMES]
    ordered = list(SPECIAL_TOKENS) + sorted(time_tokens + pitch_tokens) + list(UNUSED_TOKENS)
    return {token: index for index, token in enumerate(ordered)}


MELODY_VOCAB = build_melody_vocab()
MELODY_VOCAB_SIZE = len(MELODY_VOCAB)


class Melody:
    """A monophonic melody: notes `(midi_pitch, onset_s, offset_s)` sorted by onset.

    Build one with `from_notes`, `from_tokens`, `from_string`, `from_text`, `from_midi`, `from_music21` or
    `from_audio`; convert with `to_tokens`, `encode`, `to_midi`, `to_piano_roll`. Every constructor refuses
    (`ValueError`) non-finite times, a note longer than `MAX_NOTE_SECONDS` (60 s), a melody ending after
    `MAX_MELODY_SECONDS` (600 s) and more than `MAX_NOTES` (10 000) notes.
    """

    def __init__(self, notes: np.ndarray):
        try:
            notes = np.asarray(notes, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise TypeError("notes must be numbers: rows of (midi_pitch, onset_s, offset_s).") from None
        if notes.size % 3 or notes.ndim > 2 or (notes.ndim == 2 and notes.shape[1] != 3):
            raise ValueError(
                f"notes must have shape (n, 3): rows of (midi_pitch, onset_s, offset_s), got {notes.shape}."
            )
        notes = notes.reshape(-1, 3)
        if len(notes) == 0:
            raise ValueError("Empty melody: a melody needs at least one note.")
        if len(notes) > MAX_NOTES:
            raise ValueError(f"The melody has {len(notes)} notes; at most {MAX_NOTES} are allowed.")
        pitches, onsets, offsets = notes.T
        if not np.all(np.isfinite(notes)):
            raise ValueError("Melody notes must be finite numbers (no NaN or infinity).")
        if np.any(pitches != np.round(pitches)) or np.any((pitches < 0) | (pitches > MAX_MIDI_PITCH)):
            bad = pitches[(pitches != np.round(pitches)) | (pitches < 0) | (pitches > MAX_MIDI_PITCH)][0]
            raise ValueError(f"Pitch {bad} is not an integer MIDI pitch in 0-{MAX_MIDI_PITCH}.")
        if np.any(onsets < 0):
            raise ValueError(f"Negative onset {onsets[onsets < 0][0]} s: onsets must be >= 0.")
        durations = offsets - onsets
        if np.any(durations <= 0):
            index = int(np.argmax(durations <= 0))
            raise ValueError(
                f"Negative or zero duration at note {index}: onset {onsets[index]} s, offset {offsets[index]} s "
                "(offset must be after onset)."
            )
        too_long = durations > MAX_NOTE_SECONDS + 1e-9  # a note of exactly the limit, whose offset − onset rounds up
        if np.any(too_long):
            index = int(np.argmax(too_long))
            raise ValueError(
                f"Note {index} lasts {durations[index]:.6g} s; a note may last at most {MAX_NOTE_SECONDS:g} s."
            )
        if offsets.max() > MAX_MELODY_SECONDS:
            raise ValueError(
                f"The melody ends at {offsets.max():.6g} s; a melody may last at most {MAX_MELODY_SECONDS:g} s."
            )
        order = np.lexsort((-pitches, onsets))
        self.notes = notes[order]
        self.notes.setflags(write=False)

    @classmethod
    def _from_validated(cls, notes: np.ndarray) -> "Melody":
        """Wrap notes that already passed `__init__` (e.g. read back from a melody store) without re-checking."""
        melody = cls.__new__(cls)
        melody.notes = notes
        melody.notes.setflags(write=False)
        return melody

    # ----- constructors -----

    @classmethod
    def load(cls, source, sample_rate: int = 16000) -> "Melody":
        """Any melody a user may hand over: a `Melody`; a path to MIDI (.mid/.midi), MusicXML/ABC/Humdrum
        (read by music21) or audio (.wav/.flac/.ogg/.mp3, transcribed); a token string (`<G4>,<114>,<79>|…`);
        a note string (`"G4:0.5 A4:0.5"`); or a mono waveform array at `sample_rate` (transcribed, at most
        `MAX_MELODY_SECONDS`). Text from someone who may not read this machine's files goes to `from_text`.
        """
        if isinstance(source, Melody):
            return source
        if isinstance(source, np.ndarray) or type(source).__name__ == "Tensor":
            waveform = np.asarray(source.detach().cpu() if hasattr(source, "detach") else source)
            if waveform.dtype.kind not in "fiu":
                raise TypeError(f"A melody waveform must hold numbers, got dtype {waveform.dtype}.")
            waveform = waveform.astype(np.float32)
            if waveform.ndim != 1 or waveform.size == 0:
                raise ValueError(f"A melody waveform must be a non-empty mono 1-D array, got shape {waveform.shape}.")
            return cls.from_audio(waveform, sample_rate)
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(
                f"Cannot read a melody from {type(source).__name__}: pass a Melody, a file path, "
                "a token or note string, or a waveform."
            )
        text = os.fspath(source)
        if isinstance(text, bytes):
            raise TypeError("Cannot read a melody from a bytes path: pass it as str.")
        could_be_path = len(text) < 4096 and "\0" not in text
        extension = os.path.splitext(text)[1].lower() if could_be_path else ""
        if extension in (".mid", ".midi"):
            return cls.from_midi(text)
        if extension in AUDIO_EXTENSIONS:
            from .audio import load_audio

            return cls.from_audio(load_audio(text, sample_rate, max_seconds=MAX_MELODY_SECONDS), sample_rate)
        if extension in (".xml", ".musicxml", ".mxl", ".abc", ".krn"):
            return cls.from_music21(text)
        if could_be_path and os.path.isdir(text):
            raise ValueError(f"{text!r} is a directory: pass a melody file, notes or tokens.")
        if could_be_path and os.path.isfile(text):
            raise ValueError(f"Unsupported melody file {text!r}: use MIDI, MusicXML, ABC, Humdrum or audio.")
        if os.sep in text and not text.lstrip().startswith("<"):  # notes and tokens never hold a path separator
            raise ValueError(f"No melody file {text!r}.")
        return cls.from_text(text)

    @classmethod
    def from_text(cls, text: str) -> "Melody":
        """From typed text only, never a file: a token string (`<G4>,<114>,<79>|…`) or a note string (`"G4:0.5 A4:0.5"`)."""
        if not isinstance(text, str):
            raise TypeError(f"Melody text must be a string, got {type(text).__name__}.")
        return cls.from_tokens(text) if text.lstrip().startswith("<") else cls.from_string(text)

    @classmethod
    def from_notes(cls, notes: Iterable[Sequence[float]]) -> "Melody":
        """From `[(midi_pitch, onset_s, offset_s), ...]`."""
        try:
            rows = [tuple(note) for note in notes]
        except TypeError:
            raise TypeError("notes must be an iterable of (midi_pitch, onset_s, offset_s) rows.") from None
        return cls(rows)

    @classmethod
    def from_tokens(cls, tokens: str) -> "Melody":
        """From a triplet token string such as `<G4>,<114>,<79>|<A4>,<119>,<81>`."""
        if not isinstance(tokens, str) or not tokens.strip():
            raise ValueError("Empty melody: the token string has no notes.")
        _check_text_length(tokens)
        notes, previous_offset, position = [], 0.0, 0
        for index, triplet in enumerate(tokens.strip().split(NOTE_SEPARATOR)):
            fields = triplet.split(FIELD_SEPARATOR)
            if len(fields) != 3:
                raise ValueError(
                    f"Malformed melody tokens at character {position} (note {index}): expected "
                    f"'<Pitch>,<dur_bin>,<gap_bin>', got {triplet!r}."
                )
            pitch_token, duration_token, gap_token = (field.strip() for field in fields)
            pitch = _parse_pitch_token(pitch_token, position)
            duration = float(bin_to_seconds(_parse_bin_token(duration_token, position)))
            gap = float(bin_to_seconds(_parse_bin_token(gap_token, position)))
            if index == 0 and gap != 0.0:
                raise ValueError(
                    f"Malformed melody tokens at character {position}: the first note's gap must be <79> (0 s), got {gap_token}."
                )
            if duration <= 0:
                raise ValueError(
                    f"Negative or zero duration at character {position} (note {index}): {duration_token} decodes to "
                    f"{duration:.4f} s; duration bins must be > {ZERO_SECONDS_BIN}."
                )
            onset = max(previous_offset + gap, 0.0)
            notes.append((pitch, onset, onset + duration))
            previous_offset = onset + duration
            position += len(triplet) + 1
        return cls(np.array(notes))

    @classmethod
    def from_string(cls, text: str) -> "Melody":
        """From `"G4:0.5 A4:0.5 R:0.5 B4:1"`: pitch:duration in seconds, back to back; `R` is a rest."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("Empty melody: the note string has no notes.")
        _check_text_length(text)
        notes, time = [], 0.0
        for item in text.split():
            name, separator, duration_text = item.partition(":")
            if not separator:
                raise ValueError(f"Malformed note {item!r}: expected 'Pitch:seconds', e.g. 'G4:0.5' or 'R:0.5'.")
            try:
                duration = float(duration_text)
            except ValueError:
                raise ValueError(
                    f"Malformed duration in {item!r}: {duration_text!r} is not a number of seconds."
                ) from None
            if not 0 < duration <= MAX_NOTE_SECONDS:
                raise ValueError(
                    f"Duration in {item!r} must be a number of seconds in (0, {MAX_NOTE_SECONDS:g}], got {duration_text!r}."
                )
            if name.upper() != "R":
                notes.append((name_to_pitch(name), time, time + duration))
            time += duration
        if not notes:
            raise ValueError("Empty melody: the note string has only rests.")
        return cls(np.array(notes))

    @classmethod
    def from_midi(cls, path: str | os.PathLike) -> "Melody":
        """From a MIDI file (pretty_midi): all non-drum notes, reduced to one line by `skyline`."""
        import pretty_midi

        try:
            midi = pretty_midi.PrettyMIDI(os.fspath(path))
        except Exception as error:
            raise ValueError(f"Unreadable MIDI file {os.fspath(path)!r}: {error}") from error
        notes = [
            (note.pitch, note.start, note.end)
            for instrument in midi.instruments
            if not instrument.is_drum
            for note in instrument.notes
            if note.end > note.start
        ]
        if not notes:
            raise ValueError(f"Empty melody: the MIDI file {os.fspath(path)!r} has no pitched notes.")
        return cls(skyline(notes))

    @classmethod
    def from_music21(cls, stream_or_path, part: int = 0, bpm: float | None = None) -> "Melody":
        """From a music21 stream or a MusicXML / ABC / Humdrum / MIDI file music21 can parse.

        Uses `part` (default the first, e.g. the soprano of a chorale), follows ties, takes the top
        note of chords, and converts beats to seconds with the score's tempo marks (or `bpm` when given;
        120 quarter notes per minute when the score has none).
        """
        import music21

        stream = stream_or_path
        if isinstance(stream_or_path, (str, os.PathLike)):
            try:
                stream = music21.converter.parse(os.fspath(stream_or_path))
            except Exception as error:
                raise ValueError(f"Unreadable score {os.fspath(stream_or_path)!r}: {error}") from error
        if not isinstance(stream, music21.stream.Stream):
            raise TypeError(
                f"stream_or_path must be a music21 Stream or a file path, got {type(stream_or_path).__name__}."
            )
        if isinstance(stream, music21.stream.Opus):
            stream = stream.scores[0]
        parts = stream.parts if isinstance(stream, music21.stream.Score) else []
        if len(parts) > 0:
            if not 0 <= part < len(parts):
                raise ValueError(f"part={part} is out of range: the score has {len(parts)} parts.")
            stream = parts[part]
        flat = stream.stripTies().flatten()
        if bpm is not None:
            if isinstance(bpm, bool) or not (isinstance(bpm, numbers.Real) and 0 < bpm < math.inf):
                raise ValueError(f"bpm must be a finite number > 0, got {bpm!r}.")
            seconds_per_quarter = 60.0 / bpm
            events = [
                (
                    element,
                    float(element.offset) * seconds_per_quarter,
                    float(element.quarterLength) * seconds_per_quarter,
                )
                for element in flat.notes
            ]
        else:
            events = [
                (entry["element"], entry["offsetSeconds"], entry["durationSeconds"])
                for entry in flat.secondsMap
                if isinstance(entry["element"], music21.note.NotRest)
            ]
        notes = []
        for element, onset, duration in events:
            pitches = [p.midi for p in getattr(element, "pitches", ())]
            if pitches and duration > 0:
                notes.append((max(pitches), onset, onset + duration))
        if not notes:
            raise ValueError("Empty melody: the score has no pitched notes.")
        return cls(skyline(notes))

    @classmethod
    def from_audio(cls, waveform: np.ndarray, sample_rate: int, min_note_seconds: float = 0.12) -> "Melody":
        """Transcribe audio with basic-pitch (its ONNX model on onnxruntime) and reduce it to one line.

        Notes shorter than `min_note_seconds` or quieter than 0.6 × the median note amplitude (ghost
        notes, overtones) are dropped; then `onset_priority_line`: notes starting within 30 ms form a
        chord whose highest note is kept, and every note ends where the next one starts.
        """
        import librosa

        try:
            waveform = np.asarray(waveform, dtype=np.float32)
        except (TypeError, ValueError, OverflowError):
            raise TypeError("waveform must be an array of samples.") from None
        if waveform.ndim == 2:
            waveform = waveform.mean(axis=0 if waveform.shape[0] < waveform.shape[1] else 1)
        if waveform.ndim != 1 or waveform.size == 0:
            raise ValueError(f"waveform must be a non-empty mono or stereo array, got shape {waveform.shape}.")
        if (
            isinstance(sample_rate, bool)
            or not isinstance(sample_rate, numbers.Integral)
            or not 1000 <= sample_rate <= 384_000
        ):
            raise ValueError(f"sample_rate must be an integer between 1000 and 384000 Hz, got {sample_rate!r}.")
        if waveform.size > MAX_MELODY_SECONDS * sample_rate:
            raise ValueError(
                f"The audio lasts {waveform.size / sample_rate:.1f} s; a melody may last at most {MAX_MELODY_SECONDS:g} s."
            )
        if not np.all(np.isfinite(waveform)):
            raise ValueError("The audio has NaN or infinite samples.")
        if not np.any(np.abs(waveform) > 1e-4):
            raise ValueError("Empty melody: the audio is silent.")
        model = _basic_pitch_model()
        from basic_pitch import note_creation
        from basic_pitch.constants import AUDIO_N_SAMPLES, AUDIO_SAMPLE_RATE, FFT_HOP
        from basic_pitch.inference import unwrap_output, window_audio_file

        audio = librosa.resample(waveform, orig_sr=int(sample_rate), target_sr=AUDIO_SAMPLE_RATE)

        # basic-pitch's own windowing (30 overlapping frames), run on its ONNX model.
        overlapping_frames = 30
        overlap = overlapping_frames * FFT_HOP
        padded = np.concatenate([np.zeros(overlap // 2, dtype=np.float32), audio])
        outputs = {"note": [], "onset": [], "contour": []}
        for window, _ in window_audio_file(padded, AUDIO_N_SAMPLES - overlap):
            for key, value in model.predict(window[None]).items():
                outputs[key].append(value)
        model_output = {
            key: unwrap_output(np.concatenate(value), len(audio), overlapping_frames) for key, value in outputs.items()
        }
        _, note_events = note_creation.model_output_to_notes(
            model_output,
            onset_thresh=0.5,
            frame_thresh=0.3,
            min_note_len=max(1, int(round(min_note_seconds * AUDIO_SAMPLE_RATE / FFT_HOP))),
            melodia_trick=True,
        )
        if not note_events:
            raise ValueError("Empty melody: basic-pitch found no notes in the audio.")
        loudness_floor = 0.6 * float(np.median([amplitude for _, _, _, amplitude, _ in note_events]))
        notes = [
            (int(pitch), float(start), float(end))
            for start, end, pitch, amplitude, _ in note_events
            if end > start and amplitude >= loudness_floor
        ]
        return cls(onset_priority_line(notes, chord_tolerance_s=0.03))

    # ----- views and conversions -----

    @property
    def pitches(self) -> np.ndarray:
        return self.notes[:, 0].astype(np.int64)

    @property
    def onsets(self) -> np.ndarray:
        return self.notes[:, 1]

    @property
    def offsets(self) -> np.ndarray:
        return self.notes[:, 2]

    @property
    def duration(self) -> float:
        """End of the last note, in seconds."""
        return float(self.offsets.max())

    def __len__(self) -> int:
        return len(self.notes)

    def __eq__(self, other) -> bool:
        return isinstance(other, Melody) and np.array_equal(self.notes, other.notes)

    def __repr__(self) -> str:
        return f"Melody({len(self)} notes, {self.duration:.2f} s: {self.to_string(max_notes=6)})"

    def to_list(self) -> list[list[float]]:
        """`[[pitch, onset_s, offset_s], ...]` with int pitches, the dataset's `melody_notes` column."""
        return [[int(p), float(on), float(off)] for p, on, off in self.notes]

    def to_string(self, max_notes: int | None = None) -> str:
        """Readable note names with onsets, e.g. `G4@0.00 A4@0.50 …`."""
        shown = self.notes if max_notes is None else self.notes[:max_notes]
        text = " ".join(f"{pitch_to_name(int(p))}@{on:.2f}" for p, on, _ in shown)
        return text + (" …" if max_notes is not None and len(self) > max_notes else "")

    def to_note_string(self, max_notes: int | None = None) -> str:
        """The form `from_string` reads, e.g. `"G4:0.5 R:0.25 A4:0.5"` (seconds, to the millisecond), so a melody
        can be copied and edited. A note that overlaps the next one is cut where the next one starts."""
        items, time = [], 0.0
        shown = len(self) if max_notes is None else min(max_notes, len(self))
        for index in range(shown):
            pitch, onset, offset = self.notes[index]
            if onset - time >= 0.0005:
                items.append(f"R:{round(onset - time, 3):g}")
            end = min(offset, self.notes[index + 1, 1]) if index + 1 < len(self) else offset
            items.append(f"{pitch_to_name(int(pitch))}:{max(round(end - onset, 3), 0.001):g}")
            time = end
        return " ".join(items) + (" …" if shown < len(self) else "")

    def to_tokens(self) -> str:
        """The MG2 triplet string `<Pitch>,<dur_bin>,<gap_bin>|…` (first gap is 0 s → `<79>`)."""
        durations = seconds_to_bin(self.offsets - self.onsets)
        gaps = seconds_to_bin(np.concatenate([[0.0], self.onsets[1:] - self.offsets[:-1]]))
        return NOTE_SEPARATOR.join(
            f"<{pitch_to_name(int(p))}>{FIELD_SEPARATOR}<{d}>{FIELD_SEPARATOR}<{g}>"
            for p, d, g in zip(self.pitches, durations, gaps)
        )

    def encode(self, max_length: int = MAX_MELODY_TOKENS) -> dict[str, np.ndarray]:
        """Token ids `<s> p , d , g | … </s>` padded to `max_length`, with an attention mask.

        Melodies longer than `max_length` are cut after the last whole note that fits.
        """
        return encode_melody_tokens(self.to_tokens(), max_length=max_length)

    def to_pretty_midi(self, program: int = 0, velocity: int = 100):
        """A `pretty_midi.PrettyMIDI` with one instrument playing the melody."""
        import pretty_midi

        midi = pretty_midi.PrettyMIDI()
        instrument = pretty_midi.Instrument(program=program)
        instrument.notes = [pretty_midi.Note(velocity, int(p), float(on), float(off)) for p, on, off in self.notes]
        midi.instruments.append(instrument)
        return midi

    def to_midi(self, path: str | os.PathLike, program: int = 0, velocity: int = 100) -> None:
        """Write a standard MIDI file."""
        self.to_pretty_midi(program=program, velocity=velocity).write(os.fspath(path))

    def to_piano_roll(self, frames_per_second: float = 100) -> np.ndarray:
        """Binary piano roll, shape `(128, ceil(duration × fps))`, float32."""
        _check_frames_per_second(frames_per_second)
        roll = np.zeros((MAX_MIDI_PITCH + 1, int(math.ceil(self.duration * frames_per_second))), dtype=np.float32)
        for pitch, onset, offset in self.notes:
            start = int(round(onset * frames_per_second))
            end = max(start + 1, int(round(offset * frames_per_second)))
            roll[int(pitch), start:end] = 1.0
        return roll

    def to_pitch_class_roll(self, num_frames: int, frames_per_second: float) -> np.ndarray:
        """`(13, num_frames)` float32: a one-hot pitch class per sounding frame (12 channels) and the pitch height
        `(pitch - 60) / 24` (channel 12); all zero where no note sounds. Notes past the last frame are cut."""
        _check_count("num_frames", num_frames, int(MAX_MELODY_SECONDS * 1000))
        _check_frames_per_second(frames_per_second)
        roll = np.zeros((13, num_frames), dtype=np.float32)
        for pitch, onset, offset in self.notes:
            start = int(round(onset * frames_per_second))
            end = min(num_frames, max(start + 1, int(round(offset * frames_per_second))))
            roll[:12, start:end] = 0.0
            roll[int(pitch) % 12, start:end] = 1.0
            roll[12, start:end] = (pitch - 60) / 24
        return roll

    def transpose(self, semitones: int) -> "Melody":
        """Shift every pitch; raises `ValueError` if a note would leave the MIDI range."""
        if (
            isinstance(semitones, bool)
            or not isinstance(semitones, numbers.Integral)
            or abs(semitones) > MAX_MIDI_PITCH
        ):
            raise ValueError(
                f"semitones must be an integer between -{MAX_MIDI_PITCH} and {MAX_MIDI_PITCH}, got {semitones!r}."
            )
        notes = self.notes.copy()
        notes[:, 0] += int(semitones)
        if notes[:, 0].min() < 0 or notes[:, 0].max() > MAX_MIDI_PITCH:
            raise ValueError(
                f"Transposing by {semitones} semitones moves pitches to {int(notes[:, 0].min())}-{int(notes[:, 0].max())}, "
                f"outside the MIDI range 0-{MAX_MIDI_PITCH}."
            )
        return Melody(notes)

    def stretch(self, factor: float) -> "Melody":
        """Every onset and offset times `factor` (2.0 plays at half the tempo)."""
        longest = MAX_MELODY_SECONDS / self.duration
        if isinstance(factor, bool) or not (isinstance(factor, numbers.Real) and 0 < factor <= longest):
            raise ValueError(
                f"factor must be a number in (0, {longest:.6g}] for this {self.duration:.6g} s melody "
                f"(a melody may last at most {MAX_MELODY_SECONDS:g} s), got {factor!r}."
            )
        notes = self.notes.copy()
        notes[:, 1:] *= factor
        try:
            return Melody(notes)
        except ValueError as error:
            raise ValueError(f"Stretching by factor {factor!r} is out of bounds: {error}") from None

    def fit_to(self, seconds: float) -> "Melody":
        """Repeated whole (the melody is the phrase; each repeat starts where the last note of the previous one ends)
        until it covers `seconds`, then cut there: at most `seconds` long, shorter when the cut falls in a rest."""
        if isinstance(seconds, bool) or not (isinstance(seconds, numbers.Real) and 0 < seconds <= MAX_MELODY_SECONDS):
            raise ValueError(f"seconds must be a number in (0, {MAX_MELODY_SECONDS:g}], got {seconds!r}.")
        period = self.duration
        repeats = max(1, math.ceil(seconds / period))  # at least once: a subnormal `seconds / period` rounds to 0
        if repeats * len(self) > MAX_NOTES:
            raise ValueError(
                f"Looping this {period:.3g} s melody to {seconds:g} s takes {repeats * len(self)} notes; "
                f"at most {MAX_NOTES} are allowed."
            )
        looped = np.concatenate([self.notes + np.array([0.0, r * period, r * period]) for r in range(repeats)])
        return Melody(looped).slice(0.0, seconds)

    def legato(self, max_gap_s: float) -> "Melody":
        """Each note held until the next one starts where the rest between them is shorter than `max_gap_s`: a
        transcription breaks a played line into notes with short gaps, which MG2 would render as silences."""
        if isinstance(max_gap_s, bool) or not (
            isinstance(max_gap_s, numbers.Real) and 0 <= max_gap_s <= MAX_NOTE_SECONDS
        ):
            raise ValueError(f"max_gap_s must be a number in [0, {MAX_NOTE_SECONDS:g}], got {max_gap_s!r}.")
        notes = self.notes.copy()
        gaps = notes[1:, 1] - notes[:-1, 2]
        notes[:-1, 2] = np.where((gaps > 0) & (gaps < max_gap_s), notes[1:, 1], notes[:-1, 2])
        return Melody(notes)

    def delay(self, seconds: float) -> "Melody":
        """The same notes starting `seconds` later (silence before them)."""
        if isinstance(seconds, bool) or not (isinstance(seconds, numbers.Real) and 0 <= seconds <= MAX_MELODY_SECONDS):
            raise ValueError(f"seconds must be a number in [0, {MAX_MELODY_SECONDS:g}], got {seconds!r}.")
        return Melody(self.notes + np.array([0.0, seconds, seconds]))

    def render_tones(
        self, num_samples: int, sample_rate: int = 16000, harmonics: int = 6, timbre_seed: int | None = None
    ) -> np.ndarray:
        """The melody as harmonic tones, `num_samples` float32 samples; notes past the end are cut. This is the
        "melody sketch" MG2's aligned condition is made from.

        By default every partial k has amplitude 1/k, every note a 40 ms attack and a 50 ms release. With
        `timbre_seed` the sound is drawn at random, one sound for the whole melody: the partials' spectral tilt and
        gains, the attack, decay and release. Training renders each clip's sketch with a seed of its own, which makes
        the sketch's sound uninformative: the UNet can take pitch and timing from it, but has to draw the instrument
        the text names.
        """
        _check_count("sample_rate", sample_rate, 384_000)
        _check_count("num_samples", num_samples, int(MAX_MELODY_SECONDS * sample_rate))
        _check_count("harmonics", harmonics, 64)
        partials = np.arange(1, harmonics + 1)
        gains, attack_s, release_s, decay_per_s = 1.0 / partials, PLAIN_SKETCH_ATTACK_S, PLAIN_SKETCH_RELEASE_S, 0.0
        if timbre_seed is not None:
            rng = np.random.default_rng(timbre_seed)
            gains = partials ** -rng.uniform(0.3, 2.5) * rng.uniform(0.2, 1.0, harmonics)
            gains[0] = max(gains[0], gains.max() * 0.5)  # the fundamental stays audible: it carries the pitch
            attack_s, release_s = rng.uniform(*SKETCH_ATTACK_RANGE_S), rng.uniform(*SKETCH_RELEASE_RANGE_S)
            decay_per_s = rng.choice([0.0, rng.uniform(0.5, 4.0)])
        audio = np.zeros(num_samples, dtype=np.float64)
        for pitch, onset, offset in self.notes:
            start, end = int(round(onset * sample_rate)), min(num_samples, int(round(offset * sample_rate)))
            if end <= start:
                continue
            frequency = 440.0 * 2 ** ((pitch - 69) / 12)
            audible = partials < sample_rate / 2 / frequency
            t = np.arange(end - start) / sample_rate
            tone = (np.sin(2 * np.pi * frequency * partials[audible, None] * t) * gains[audible, None]).sum(0)
            position = np.arange(1, end - start + 1)
            rise = position / max(1, int(attack_s * sample_rate))
            fall = position[::-1] / max(1, int(release_s * sample_rate))
            envelope = np.minimum(1.0, np.minimum(rise, fall)) * np.exp(-decay_per_s * t)
            audio[start:end] += 0.2 * tone * envelope
        return audio.astype(np.float32)

    def slice(self, start_s: float, end_s: float) -> "Melody":
        """Notes sounding in `[start_s, end_s)`, cut to the window and re-timed so it starts at 0 s."""
        if not (
            isinstance(start_s, numbers.Real)
            and isinstance(end_s, numbers.Real)
            and 0 <= _float(start_s) < _float(end_s)
        ):
            raise ValueError(f"slice needs 0 <= start_s < end_s, got start_s={start_s}, end_s={end_s}.")
        onsets = np.maximum(self.onsets, min(_float(start_s), self.duration))
        offsets = np.minimum(self.offsets, min(_float(end_s), self.duration))
        keep = offsets > onsets
        if not np.any(keep):
            raise ValueError(f"Empty melody: no note sounds between {start_s} s and {end_s} s.")
        return Melody(np.stack([self.notes[keep, 0], onsets[keep] - start_s, offsets[keep] - start_s], axis=1))


def encode_melody_tokens(tokens: str, max_length: int = MAX_MELODY_TOKENS) -> dict[str, np.ndarray]:
    """Token string → `{"input_ids", "attention_mask"}` of length `max_length` (see `Melody.encode`)."""
    if max_length < 8:
        raise ValueError(f"max_length must be >= 8 (room for <s>, one note and </s>), got {max_length}.")
    token_list = [BOS_TOKEN]
    for triplet in tokens.split(NOTE_SEPARATOR):
        note_tokens = triplet.replace(FIELD_SEPARATOR, f" {FIELD_SEPARATOR} ").split()
        needed = len(note_tokens) + (1 if len(token_list) > 1 else 0)
        if len(token_list) + needed + 1 > max_length:
            break
        if len(token_list) > 1:
            token_list.append(NOTE_SEPARATOR)
        token_list.extend(note_tokens)
    token_list.append(EOS_TOKEN)
    unknown = [token for token in token_list if token not in MELODY_VOCAB]
    if unknown:
        raise ValueError(f"Malformed melody tokens: {unknown[0]!r} is not in the melody vocabulary.")
    input_ids = np.full(max_length, MELODY_VOCAB[PAD_TOKEN], dtype=np.int64)
    attention_mask = np.zeros(max_length, dtype=np.int64)
    input_ids[: len(token_list)] = [MELODY_VOCAB[token] for token in token_list]
    attention_mask[: len(token_list)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def skyline(notes: Sequence[Sequence[float]]) -> np.ndarray:
    """Reduce overlapping notes to one line: at every instant the highest sounding note wins.

    A note hidden under a higher one is dropped; a note that starts under a higher one begins when
    that note ends; a note interrupted by a higher one is cut there and does not resume.
    """
    notes = [(int(p), float(on), float(off)) for p, on, off in notes if off > on]
    boundaries = sorted({time for _, on, off in notes for time in (on, off)})
    starts = sorted(range(len(notes)), key=lambda i: notes[i][1])
    active, next_start, winners = set(), 0, []
    for left, right in zip(boundaries, boundaries[1:]):
        while next_start < len(starts) and notes[starts[next_start]][1] <= left:
            active.add(starts[next_start])
            next_start += 1
        active = {i for i in active if notes[i][2] > left}
        winner = max(active, key=lambda i: (notes[i][0], notes[i][1]), default=None)
        if winners and winners[-1][0] == winner:
            winners[-1][2] = right
        else:
            winners.append([winner, left, right])
    kept, seen = [], set()
    for index, start, end in winners:
        if index is not None and index not in seen:
            seen.add(index)
            kept.append((notes[index][0], start, end))
    return np.array(kept, dtype=np.float64).reshape(-1, 3)


def onset_priority_line(notes: Sequence[Sequence[float]], chord_tolerance_s: float) -> np.ndarray:
    """Reduce transcribed notes to one line: notes starting within `chord_tolerance_s` of each other
    are a chord (the highest is kept), and every note ends where the next one starts.

    Used for transcriptions, whose release tails overlap the next note: a true `skyline` would hold a
    high note over the lower note that follows it.
    """
    kept: list[list[float]] = []
    for onset, negative_pitch, offset in sorted((float(on), -int(p), float(off)) for p, on, off in notes):
        if kept and onset - kept[-1][1] <= chord_tolerance_s:
            if -negative_pitch > kept[-1][0]:
                kept[-1] = [-negative_pitch, kept[-1][1], offset]
            continue
        kept.append([-negative_pitch, onset, offset])
    for previous, following in zip(kept, kept[1:]):
        previous[2] = min(previous[2], following[1])
    return np.array([note for note in kept if note[2] > note[1]], dtype=np.float64).reshape(-1, 3)


def _check_count(name: str, value, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= high:
        raise ValueError(f"{name} must be an integer between 1 and {high}, got {value!r}.")


def _float(value: numbers.Real) -> float:
    """`float(value)`, with ±infinity for an int too large for a float."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _check_frames_per_second(value) -> None:
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0 < value <= 1000):
        raise ValueError(f"frames_per_second must be a number in (0, 1000], got {value!r}.")


def _check_text_length(text: str) -> None:
    if len(text) > MAX_MELODY_TEXT_CHARACTERS:
        raise ValueError(
            f"The melody text has {len(text)} characters; at most {MAX_MELODY_TEXT_CHARACTERS} are allowed."
        )


def _parse_pitch_token(token: str, position: int) -> int:
    if not (token.startswith("<") and token.endswith(">")):
        raise ValueError(
            f"Malformed melody tokens at character {position}: expected a pitch token like '<G4>', got {token!r}."
        )
    name = token[1:-1]
    if token not in MELODY_VOCAB or _NAME_PATTERN.match(name) is None:
        raise ValueError(f"Unknown pitch name {name!r} at character {position}.")
    return name_to_pitch(name)


def _parse_bin_token(token: str, position: int) -> int:
    match = re.fullmatch(r"<(\d+)>", token)
    if match is None or int(match.group(1)) >= NUM_TIME_BINS:
        raise ValueError(
            f"Malformed melody tokens at character {position}: expected a time bin '<0>'..'<{NUM_TIME_BINS - 1}>', got {token!r}."
        )
    return int(match.group(1))


@functools.lru_cache(maxsize=1)
def _basic_pitch_model():
    import logging

    # basic-pitch logs a warning at import for every backend it cannot find (TF, CoreML, TFLite); we use ONNX.
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)
    try:
        from basic_pitch import ICASSP_2022_MODEL_PATH
        from basic_pitch.inference import Model
    finally:
        root_logger.setLevel(level)
    return Model(ICASSP_2022_MODEL_PATH)
