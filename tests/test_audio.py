import librosa
import numpy as np
import pytest
import soundfile
import torch

from mg2_pipeline import VocosVocoder
from mg2_pipeline.audio import (
    LogMelSpectrogram,
    encode_flac,
    load_audio,
    multi_resolution_stft_distance,
    save_audio,
)


def test_log_mel_matches_audioldm_front_end_reference():
    waveform = np.random.default_rng(0).standard_normal(163840).astype(np.float32) * 0.1
    log_mel = LogMelSpectrogram()(torch.from_numpy(waveform))
    assert log_mel.shape == (1024, 64)  # 10.24 s → 1024 frames of 64 mel bins
    # Reference: reflect-pad (n_fft - hop) / 2, magnitude STFT without centering, Slaney mel 0-8 kHz, log.
    padded = np.pad(waveform, (432, 432), mode="reflect")
    mel = librosa.feature.melspectrogram(
        y=padded,
        sr=16000,
        n_fft=1024,
        hop_length=160,
        win_length=1024,
        center=False,
        power=1.0,
        n_mels=64,
        fmin=0,
        fmax=8000,
    )
    np.testing.assert_allclose(log_mel.numpy(), np.log(np.maximum(mel, 1e-5)).T, atol=1e-4)


def test_log_mel_is_batched_and_floors_silence():
    front_end = LogMelSpectrogram()
    batch = torch.randn(3, 2, 16000)
    out = front_end(batch)
    assert out.shape == (3, 2, 100, 64)
    torch.testing.assert_close(out[1, 0], front_end(batch[1, 0]), atol=1e-5, rtol=1e-5)
    assert torch.all(front_end(torch.zeros(16000)) == np.log(1e-5).astype(np.float32))
    assert front_end.num_frames(163840) == 1024
    with pytest.raises(ValueError, match="at least 1024"):
        front_end(torch.zeros(100))


def test_load_resamples_to_16k_mono_and_save_round_trips(tmp_path):
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1) * 0.5
    soundfile.write(tmp_path / "tone.wav", stereo, 44100)
    waveform = load_audio(tmp_path / "tone.wav")
    assert waveform.dtype == np.float32 and waveform.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(waveform))
    assert abs(np.argmax(spectrum) * 16000 / len(waveform) - 440) < 2

    save_audio(tmp_path / "copy.flac", torch.from_numpy(waveform))
    again = load_audio(tmp_path / "copy.flac")
    np.testing.assert_allclose(again, waveform, atol=1e-4)
    np.testing.assert_allclose(load_audio(encode_flac(waveform)), waveform, atol=1e-4)


def test_unreadable_audio_raises_value_error(tmp_path):
    (tmp_path / "noise.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(ValueError, match="Unreadable audio"):
        load_audio(tmp_path / "noise.wav")
    with pytest.raises(ValueError, match="Unreadable audio"):
        load_audio(b"\x00\x01garbage")


def harmonic_tone(seconds: float = 1.0) -> torch.Tensor:
    time = torch.arange(int(16000 * seconds)) / 16000
    return sum(torch.sin(2 * torch.pi * 220 * k * time) / k for k in range(1, 6)) * 0.2


def test_stft_distance_is_zero_for_the_same_audio_and_sees_phase_the_magnitudes_hide():
    resolutions = ((128, 32), (256, 64), (4096, 1024))
    tone = harmonic_tone()[None]
    assert multi_resolution_stft_distance(tone, tone, resolutions).tolist() == [0.0]
    # The same STFT magnitudes at the vocoders' resolution (1 024 / 160) with each frame's phases drawn at random.
    stft = dict(n_fft=1024, hop_length=160, window=torch.hann_window(1024))
    spectrum = torch.stft(tone, return_complex=True, **stft)
    scrambled_phase = torch.polar(
        spectrum.abs(), torch.rand(spectrum.shape, generator=torch.Generator().manual_seed(0)) * 6.3
    )
    scrambled = torch.istft(scrambled_phase, length=tone.shape[-1], **stft)
    quieter = tone * 0.9
    distances = multi_resolution_stft_distance(torch.cat([scrambled, quieter]), torch.cat([tone, tone]), resolutions)
    assert distances.shape == (2,) and distances[0] > 2 * distances[1] > 0
    # As a training loss: one scalar over the batch, which a silent reference crop does not blow up (per crop it does).
    silent_batch = torch.stack([tone[0], torch.zeros_like(tone[0])])
    loss = multi_resolution_stft_distance(silent_batch + 1e-3, silent_batch, resolutions, per_item=False)
    per_crop = multi_resolution_stft_distance(silent_batch + 1e-3, silent_batch, resolutions).mean()
    assert loss.ndim == 0 and loss < 1 and per_crop > 1000


def test_vocos_vocoder_gives_frames_times_hop_samples_and_its_inverse_stft_inverts_the_analysis():
    vocoder = VocosVocoder(dim=32, intermediate_dim=96, num_layers=2).eval()
    log_mel = LogMelSpectrogram()(harmonic_tone())
    with torch.no_grad():
        batched = vocoder(torch.stack([log_mel, log_mel.flip(0)]))
        single = vocoder(log_mel)
    assert batched.shape == (2, 16000) and single.shape == (16000,)
    torch.testing.assert_close(batched[0], single, rtol=0, atol=1e-5)
    # Framed as LogMelSpectrogram frames (reflect padding, no centring), the overlap-add gives the waveform back.
    tone, n_fft, hop = harmonic_tone()[None], 640, 160
    padded = torch.nn.functional.pad(tone[:, None], ((n_fft - hop) // 2,) * 2, mode="reflect")[:, 0]
    spectrum = torch.stft(padded, n_fft, hop, window=torch.hann_window(n_fft), center=False, return_complex=True)
    torch.testing.assert_close(vocoder.inverse_stft(spectrum.transpose(1, 2)), tone, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"spectrogram must have shape \(batch, frames, 64\)"):
        vocoder(torch.zeros(1, 10, 80))
