import librosa
import numpy as np
import pytest

from mg2_pipeline.melody import Melody
from mg2_pipeline.synth import SoundFontSynth, Track


@pytest.mark.parametrize("program", [71, 73])  # clarinet, flute
def test_basic_pitch_recovers_a_rendered_melody(program):
    melody = Melody.from_string("G4:0.4 A4:0.4 B4:0.4 D5:0.8 R:0.2 B4:0.4 G4:0.8 E4:0.4 D4:0.8")
    waveform = SoundFontSynth().render(
        [Track(melody.notes, program=program, velocity=100)], num_samples=int(5.4 * 16000)
    )
    transcribed = Melody.from_audio(waveform, 16000)
    # basic-pitch may split a sustained note in two (a re-attack it hears in the timbre), so compare
    # the pitch sequence with repeats collapsed; every note is found near its onset.
    first_of_run = np.concatenate([[True], np.diff(transcribed.pitches) != 0])
    assert transcribed.pitches[first_of_run].tolist() == melody.pitches.tolist()
    assert np.all(np.abs(transcribed.onsets[first_of_run] - melody.onsets) < 0.15)


@pytest.mark.parametrize("sample_rate", [8000, 22050, 44100])
def test_a_recording_at_any_supported_rate_gives_its_melody(sample_rate):
    melody = Melody.from_string("C5:0.5 E5:0.5 G5:1.0")
    waveform = SoundFontSynth().render([Track(melody.notes, program=73, velocity=100)], num_samples=int(2.5 * 16000))
    transcribed = Melody.from_audio(librosa.resample(waveform, orig_sr=16000, target_sr=sample_rate), sample_rate)
    first_of_run = np.concatenate([[True], np.diff(transcribed.pitches) != 0])
    assert transcribed.pitches[first_of_run].tolist() == melody.pitches.tolist()
    assert np.all(np.abs(transcribed.onsets[first_of_run] - melody.onsets) < 0.15)


def test_from_audio_rejects_silence_and_bad_arguments():
    with pytest.raises(ValueError, match="silent"):
        Melody.from_audio(np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="sample_rate"):
        Melody.from_audio(np.ones(16000, dtype=np.float32), 0)
    with pytest.raises(ValueError, match="non-empty"):
        Melody.from_audio(np.zeros(0, dtype=np.float32), 16000)
