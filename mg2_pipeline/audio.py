"""The AudioLDM-compatible log-mel front-end and waveform I/O."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16000
N_FFT = 1024
HOP_LENGTH = 160
WIN_LENGTH = 1024
N_MELS = 64
F_MIN = 0.0
F_MAX = 8000.0
LOG_FLOOR = 1e-5


class LogMelSpectrogram(nn.Module):
    """Waveform `(..., samples)` at 16 kHz → log-mel `(..., frames, 64)`, as AudioLDM's front-end.

    STFT n_fft 1024 / hop 160 / Hann 1024 with `(n_fft - hop) / 2` reflect padding on both sides
    (10.24 s → 1024 frames), magnitude, Slaney mel filters 0–8 kHz, natural log floored at 1e-5.
    Works batched on any device; the filterbank and window follow `.to(device)`.
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        n_fft: int = N_FFT,
        hop_length: int = HOP_LENGTH,
        win_length: int = WIN_LENGTH,
        n_mels: int = N_MELS,
        f_min: float = F_MIN,
        f_max: float = F_MAX,
    ):
        super().__init__()
        import librosa

        self.sample_rate, self.n_fft, self.hop_length, self.win_length, self.n_mels = (
            sample_rate,
            n_fft,
            hop_length,
            win_length,
            n_mels,
        )
        mel_basis = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max)
        self.register_buffer("mel_basis", torch.from_numpy(mel_basis).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for `num_samples` samples (1024 for 10.24 s at 16 kHz)."""
        return (num_samples + (self.n_fft - self.hop_length) - self.n_fft) // self.hop_length + 1

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.shape[-1] < self.n_fft:
            raise ValueError(
                f"waveform has {waveform.shape[-1]} samples; the mel front-end needs at least {self.n_fft}."
            )
        batch_shape = waveform.shape[:-1]
        flat = waveform.reshape(-1, 1, waveform.shape[-1]).float()
        padding = (self.n_fft - self.hop_length) // 2
        flat = nn.functional.pad(flat, (padding, padding), mode="reflect").squeeze(1)
        spectrum = torch.stft(
            flat,
            self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window,
            center=False,
            return_complex=True,
        ).abs()
        mel = torch.matmul(self.mel_basis, spectrum)
        log_mel = torch.log(torch.clamp(mel, min=LOG_FLOOR)).transpose(-1, -2)
        return log_mel.reshape(*batch_shape, *log_mel.shape[-2:])


def log_mel_batch(spectrogram: torch.Tensor, num_mels: int) -> tuple[torch.Tensor, bool]:
    """A vocoder's input as `(batch, frames, num_mels)`, and whether it came unbatched `(frames, num_mels)`."""
    unbatched = spectrogram.ndim == 2
    if unbatched:
        spectrogram = spectrogram.unsqueeze(0)
    if spectrogram.ndim != 3 or spectrogram.shape[-1] != num_mels:
        raise ValueError(f"spectrogram must have shape (batch, frames, {num_mels}), got {tuple(spectrogram.shape)}.")
    return spectrogram, unbatched


def multi_resolution_stft_distance(
    estimate: torch.Tensor, reference: torch.Tensor, resolutions: tuple[tuple[int, int], ...], per_item: bool = True
) -> torch.Tensor:
    """Spectral convergence plus log-magnitude L1 between the STFTs of `estimate` and `reference` `(batch, samples)`,
    averaged over `resolutions` (`(n_fft, hop_length)` pairs, Hann windows): Parallel WaveGAN's multi-resolution STFT
    loss. A waveform whose phases disagree across frames differs at every resolution but the one it was built at.

    Per item (`(batch,)`, 0 where the two are equal), or as a training loss (`per_item=False`, a scalar): spectral
    convergence over the whole batch, so a silent crop cannot divide by its own near-zero norm."""
    distances = []
    dims = (1, 2) if per_item else (0, 1, 2)
    for n_fft, hop_length in resolutions:
        stft = dict(n_fft=n_fft, hop_length=hop_length, window=torch.hann_window(n_fft, device=estimate.device))
        estimated = torch.stft(estimate.float(), return_complex=True, **stft).abs()
        real = torch.stft(reference.float(), return_complex=True, **stft).abs()
        convergence = torch.linalg.vector_norm(real - estimated, dim=dims) / torch.linalg.vector_norm(
            real, dim=dims
        ).clamp(min=LOG_FLOOR)
        log_magnitude = (real.clamp(min=LOG_FLOOR).log() - estimated.clamp(min=LOG_FLOOR).log()).abs().mean(dims)
        distances.append(convergence + log_magnitude)
    return torch.stack(distances).mean(0)


def load_audio(
    source: str | os.PathLike | bytes, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None
) -> np.ndarray:
    """Read an audio file (path or encoded bytes) as mono float32 at `sample_rate` (soundfile, soxr).

    Raises `ValueError` for an unreadable or missing file, one longer than `max_seconds` (checked before
    decoding), and NaN or infinite samples.
    """
    import soundfile

    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)
    if name != "<bytes>" and not os.path.isfile(name):
        raise ValueError(f"No audio file {name!r}.")
    try:
        with soundfile.SoundFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else name) as audio_file:
            if max_seconds is not None and audio_file.frames > max_seconds * audio_file.samplerate:
                raise ValueError(
                    f"Audio {name!r} lasts {audio_file.frames / audio_file.samplerate:.1f} s; "
                    f"at most {max_seconds:g} s are allowed."
                )
            data, file_rate = audio_file.read(dtype="float32", always_2d=True), audio_file.samplerate
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"Unreadable audio {name!r}: {error}") from error
    if data.shape[0] == 0:
        raise ValueError(f"Unreadable audio {name!r}: the file has no samples.")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"Audio {name!r} has NaN or infinite samples.")
    waveform = data.mean(axis=1)
    if file_rate != sample_rate:
        import librosa

        waveform = librosa.resample(waveform, orig_sr=file_rate, target_sr=sample_rate)
    return waveform.astype(np.float32)


def peak_safe(waveforms: torch.Tensor) -> torch.Tensor:
    """Each waveform (last axis) that peaks above 1 scaled down to peak at 1; the others unchanged. The one gain MG2
    applies to what it generates, so that 16-bit PCM never clips it."""
    return waveforms / waveforms.abs().amax(dim=-1, keepdim=True).clamp(min=1.0)


def save_audio(path: str | os.PathLike, waveform, sample_rate: int = SAMPLE_RATE) -> None:
    """Write a mono waveform (numpy or torch, values in [-1, 1]); the format follows the extension. A waveform with
    NaN or infinite samples, or beyond ±1 (16-bit PCM would clip it), is refused (`ValueError`)."""
    import soundfile

    waveform = waveform.detach().cpu().numpy() if isinstance(waveform, torch.Tensor) else np.asarray(waveform)
    if not np.all(np.isfinite(waveform)):
        raise ValueError(f"Not writing {os.fspath(path)!r}: the waveform has NaN or infinite samples.")
    if waveform.size and np.abs(waveform).max() > 1:
        raise ValueError(
            f"Not writing {os.fspath(path)!r}: it peaks at {np.abs(waveform).max():.3f}, beyond ±1, and "
            "would clip; scale it first (e.g. mg2_pipeline.audio.peak_safe)."
        )
    soundfile.write(os.fspath(path), waveform.astype(np.float32).reshape(-1), sample_rate)


def encode_flac(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Mono float waveform → FLAC bytes (16-bit), the dataset's audio storage."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(waveform, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()
