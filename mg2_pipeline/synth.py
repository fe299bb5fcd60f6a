"""General MIDI rendering of note tracks through a SoundFont (tinysoundfont), at 16 kHz mono."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .audio import SAMPLE_RATE


def default_soundfont() -> str:
    """Path of TimGM6mb.sf2, the General MIDI SoundFont shipped inside pretty_midi's wheel."""
    import pretty_midi

    return os.path.join(os.path.dirname(pretty_midi.__file__), "TimGM6mb.sf2")


@dataclass
class Track:
    """One instrument's notes `[(midi_pitch, onset_s, offset_s), ...]` with a GM program and velocity."""

    notes: Sequence[Sequence[float]]
    program: int = 0
    velocity: int = 100


class SoundFontSynth:
    """Renders `Track`s to a mono float32 waveform. Load once, render many times (not thread-safe)."""

    def __init__(self, soundfont: str | None = None, sample_rate: int = SAMPLE_RATE):
        import tinysoundfont

        self.soundfont = soundfont or default_soundfont()
        if not os.path.isfile(self.soundfont):
            raise ValueError(f"SoundFont not found: {self.soundfont!r}.")
        self.sample_rate = sample_rate
        self._synth = tinysoundfont.Synth(samplerate=sample_rate)
        try:
            self._soundfont_id = self._synth.sfload(self.soundfont)
        except Exception as error:
            raise ValueError(f"Unreadable SoundFont {self.soundfont!r}: {error}") from error

    def render(self, tracks: Sequence[Track], num_samples: int) -> np.ndarray:
        """Mix the tracks over `num_samples` samples; notes are cut at the end. Not normalised."""
        if len(tracks) > 15:
            raise ValueError(
                f"At most 15 tracks can be rendered together (MIDI channel 9 is drums), got {len(tracks)}."
            )
        self._reset()
        events = []
        for index, track in enumerate(tracks):
            channel = index if index < 9 else index + 1
            self._synth.program_select(channel, self._soundfont_id, 0, int(track.program))
            for pitch, onset, offset in track.notes:
                events.append(
                    (max(0, int(round(onset * self.sample_rate))), 1, channel, int(pitch), int(track.velocity))
                )
                events.append((max(0, int(round(offset * self.sample_rate))), 0, channel, int(pitch), 0))
        events.sort(key=lambda event: (event[0], event[1]))  # note-offs before note-ons at the same sample

        stereo = np.zeros((num_samples, 2), dtype=np.float32)
        position = 0
        for sample, is_on, channel, pitch, velocity in events:
            sample = min(sample, num_samples)
            if sample > position:
                stereo[position:sample] = np.frombuffer(
                    self._synth.generate(sample - position), dtype=np.float32
                ).reshape(-1, 2)
                position = sample
            if position >= num_samples:
                break
            if is_on:
                self._synth.noteon(channel, pitch, velocity)
            else:
                self._synth.noteoff(channel, pitch)
        if position < num_samples:
            stereo[position:] = np.frombuffer(self._synth.generate(num_samples - position), dtype=np.float32).reshape(
                -1, 2
            )
        self._reset()
        return stereo.mean(axis=1)

    def _reset(self) -> None:
        # sounds_off only starts a quick release; render it away so the next render starts from silence
        # and the output depends on its own tracks alone (deterministic builds).
        self._synth.notes_off()
        self._synth.sounds_off()
        self._synth.generate(self.sample_rate // 10)
