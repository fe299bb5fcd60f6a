"""What the prompt asks of the sound, measured on audio: the instrument, the accompaniment and clean onsets.

- `SoundClassifier`: an instrument classifier (the 30 melody programs, read also as their 8 families) and an
  accompanied-or-solo classifier, logistic regressions on `timbre_features`, fitted on real train-split clips only.
  It knows nothing of CLMP, so it judges the generator's text path from outside.
- `onset_click_energy`: the broadband (2–8 kHz) power that bursts out at the melody's note onsets above its local
  level, relative to the clip's mean power: the "click" a note change draws.
- `InstrumentPrompts`: prompts naming an instrument, in phrasings the dataset's caption templates never use
  (`benchmarks/instrument_prompts.json`).
"""

from __future__ import annotations

import json
import os
import zlib

import librosa
import numpy as np
from prepare_data import INSTRUMENT_FAMILIES, MELODY_PROGRAMS
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from mg2_pipeline.audio import SAMPLE_RATE, load_audio

FAMILY_OF_PROGRAM = {program: family for family, programs in INSTRUMENT_FAMILIES.items() for program in programs}
FAMILIES = list(INSTRUMENT_FAMILIES)
PROGRAMS = sorted(MELODY_PROGRAMS)
CLICK_BAND_HZ = (2000.0, 8000.0)
CLICK_HOP = 64  # 4 ms frames
DEFAULT_PROMPTS = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "instrument_prompts.json")
)


def timbre_features(waveform: np.ndarray) -> np.ndarray:
    """A clip's sound, independent of its loudness: over the frames where it sounds (within 50 dB of its loudest), the
    mean and spread of MFCCs 1–19 and their deltas, of the spectral contrast and flatness, and of the log-mel profile
    relative to the clip's own mean level."""
    magnitude = np.abs(librosa.stft(waveform, n_fft=1024, hop_length=256))
    log_mel = librosa.power_to_db(
        librosa.feature.melspectrogram(S=magnitude**2, sr=SAMPLE_RATE, n_mels=64), top_db=None
    )
    level = log_mel.max(0)
    sounding = level > level.max() - 50
    if sounding.sum() < 4:
        sounding[:] = True
    mfcc = librosa.feature.mfcc(S=log_mel, n_mfcc=20)[1:]
    delta = librosa.feature.delta(mfcc)
    contrast = librosa.feature.spectral_contrast(S=magnitude, sr=SAMPLE_RATE, fmin=100.0, n_bands=5)
    flatness = np.log(librosa.feature.spectral_flatness(S=magnitude) + 1e-10)
    profile = log_mel[:, sounding] - log_mel[:, sounding].mean()
    parts = [mfcc, delta, contrast, flatness]
    return np.concatenate(
        [np.concatenate([part[:, sounding].mean(1), part[:, sounding].std(1)]) for part in parts]
        + [profile.mean(1), profile.std(1)]
    ).astype(np.float32)


def family_of(program: int) -> str:
    return FAMILY_OF_PROGRAM[int(program)]


class SoundClassifier:
    """Which melody instrument (program, and so family) a clip sounds like, and whether it is accompanied. Fit it with
    `fit_on_rows`."""

    def __init__(self, seed: int = 0):
        self.instrument = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=3000, random_state=seed))
        self.accompaniment = make_pipeline(
            StandardScaler(), LogisticRegression(C=0.5, max_iter=3000, random_state=seed)
        )

    @classmethod
    def fit_on_rows(cls, rows, max_clips: int, seed: int = 0) -> "SoundClassifier":
        """Fit on up to `max_clips` dataset rows (real audio with their `programs`: the first is the melody's, more
        than one means accompaniment); rows of other programs and unreadable audio are skipped."""
        features, programs, accompanied = [], [], []
        for row in tqdm(rows, total=max_clips, desc="Sound classifier: real train clips", unit="clip"):
            if len(features) == max_clips:
                break
            if not row.get("programs") or row["programs"][0] not in FAMILY_OF_PROGRAM:
                continue
            try:
                waveform = load_audio(row["audio"]["bytes"])
            except (ValueError, OSError):
                continue
            features.append(timbre_features(waveform))
            programs.append(row["programs"][0])
            accompanied.append(len(row["programs"]) > 1)
        if len(set(programs)) < 2 or len(set(accompanied)) < 2:
            raise ValueError(
                f"The sound classifier needs clips of several instruments, solo and accompanied; got "
                f"{len(set(programs))} program(s) and {len(set(accompanied))} kind(s) in {len(features)} clips."
            )
        classifier = cls(seed)
        classifier.instrument.fit(np.stack(features), programs)
        classifier.accompaniment.fit(np.stack(features), accompanied)
        classifier.train_clips = len(features)
        return classifier

    def family_probabilities(self, features: np.ndarray) -> np.ndarray:
        """`(clips, len(FAMILIES))`: each family's probability, the sum over its programs."""
        program_probabilities = self.instrument.predict_proba(features)
        columns = [FAMILIES.index(family_of(program)) for program in self.instrument.classes_]
        families = np.zeros((len(features), len(FAMILIES)))
        np.add.at(families.T, columns, program_probabilities.T)
        return families

    def programs(self, features: np.ndarray) -> np.ndarray:
        return self.instrument.predict(features)

    def accompanied(self, features: np.ndarray) -> np.ndarray:
        return self.accompaniment.predict(features).astype(bool)


def paired_preference(probabilities_a: np.ndarray, probabilities_b: np.ndarray, families_a, families_b) -> float:
    """Share of (pair, side) where the family a side's prompt names is more probable in its own audio than in its
    partner's: audio a was asked for `families_a`, audio b (same melody and seed) for `families_b`. A tie counts half,
    so audio that ignores the prompt scores 0.5."""
    wins = []
    for p_a, p_b, f_a, f_b in zip(probabilities_a, probabilities_b, families_a, families_b):
        a, b = FAMILIES.index(f_a), FAMILIES.index(f_b)
        wins += [np.sign(p_a[a] - p_b[a]), np.sign(p_b[b] - p_a[b])]
    return float(np.mean(wins) / 2 + 0.5)


def onset_click_energy(waveform: np.ndarray, onsets_s: np.ndarray) -> float:
    """Mean over note onsets of the 2–8 kHz power burst at the onset (its peak in −8…+24 ms above the band's median
    over ±160 ms), relative to the clip's mean power over all frequencies. A click is broadband and short, so it
    stands above the band's local level; a soft attack or a steady tone does not."""
    power = np.abs(librosa.stft(waveform, n_fft=256, hop_length=CLICK_HOP, center=True)) ** 2
    frequencies = librosa.fft_frequencies(sr=SAMPLE_RATE, n_fft=256)
    band = power[(frequencies >= CLICK_BAND_HZ[0]) & (frequencies <= CLICK_BAND_HZ[1])].sum(0)
    mean_power = power.sum(0).mean() + 1e-12
    bursts = []
    for onset in onsets_s:
        frame = int(round(onset * SAMPLE_RATE / CLICK_HOP))
        if frame >= len(band):
            continue
        peak = band[max(0, frame - 2) : frame + 7].max()
        local = np.median(band[max(0, frame - 40) : frame + 41])
        bursts.append(max(0.0, peak - local))
    return float(np.mean(bursts) / mean_power) if bursts else 0.0


class InstrumentPrompts:
    """Prompts that name an instrument, from `benchmarks/instrument_prompts.json` (templates with `{instrument}`)."""

    def __init__(self, path: str = DEFAULT_PROMPTS):
        with open(path) as handle:
            self.templates = json.load(handle)["templates"]
        if not self.templates or not all("{instrument}" in template for template in self.templates):
            raise ValueError(f"{path}: 'templates' must be a non-empty list, each naming {{instrument}}.")

    def prompt(self, index: int, program: int) -> str:
        """The `index`-th clip's prompt naming `program`'s instrument (templates taken in turn)."""
        text = self.templates[index % len(self.templates)].format(instrument=MELODY_PROGRAMS[int(program)])
        return text[0].upper() + text[1:]

    @staticmethod
    def other_family_program(index: int, program: int) -> int:
        """A program of another family than `program`'s, chosen deterministically from the clip index."""
        own = FAMILIES.index(family_of(program))
        other = FAMILIES[(own + 1 + index % (len(FAMILIES) - 1)) % len(FAMILIES)]
        choices = INSTRUMENT_FAMILIES[other]
        return choices[zlib.crc32(str(index).encode()) % len(choices)]
