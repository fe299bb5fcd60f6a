"""`GriffinLimVocoder`: log-mel → waveform without trained weights, for checkpoints that have no trained vocoder.

It has the call signature of transformers' `SpeechT5HifiGan` (the AudioLDM vocoder) — a log-mel
`(batch, frames, 64)` or `(frames, 64)` in, a waveform `(batch, samples)` or `(samples,)` out at
`hop_length` samples per frame — so a pipeline can swap one for the other, and it saves and loads
as a diffusers component (config only; there are no weights).
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .audio import F_MAX, F_MIN, HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, WIN_LENGTH


class GriffinLimVocoder(ModelMixin, ConfigMixin):
    """Inverts `LogMelSpectrogram`: exp → least-squares mel inversion → fast Griffin-Lim (momentum 0.99).

    Deterministic: phases start at zero. Quality is that of Griffin-Lim (phasey, but pitches and
    rhythm are right); train `training/train_vocoder.py` for a HiFi-GAN.
    """

    @register_to_config
    def __init__(self, sampling_rate: int = SAMPLE_RATE, model_in_dim: int = N_MELS, n_fft: int = N_FFT,
                 hop_length: int = HOP_LENGTH, win_length: int = WIN_LENGTH, f_min: float = F_MIN, f_max: float = F_MAX,
                 n_iter: int = 32, momentum: float = 0.99):
        super().__init__()
        import librosa

        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}.")
        mel_basis = torch.from_numpy(librosa.filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=model_in_dim, fmin=f_min, fmax=f_max))
        self.register_buffer("inverse_mel_basis", torch.linalg.pinv(mel_basis.double()).float())
        self.register_buffer("window", torch.hann_window(win_length))

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        unbatched = spectrogram.ndim == 2
        if unbatched:
            spectrogram = spectrogram.unsqueeze(0)
        if spectrogram.ndim != 3 or spectrogram.shape[-1] != self.config.model_in_dim:
            raise ValueError(f"spectrogram must have shape (batch, frames, {self.config.model_in_dim}), got {tuple(spectrogram.shape)}.")
        mel = spectrogram.float().exp().transpose(1, 2)  # (batch, mels, frames)
        magnitude = torch.clamp(self.inverse_mel_basis @ mel, min=0.0)
        # torch.stft with center=True gives frames + 1 columns for frames * hop samples: repeat the last frame.
        magnitude = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)
        num_samples = spectrogram.shape[1] * self.config.hop_length
        stft = dict(n_fft=self.config.n_fft, hop_length=self.config.hop_length, win_length=self.config.win_length,
                    window=self.window)
        angles = torch.ones_like(magnitude, dtype=torch.complex64)
        previous = torch.zeros_like(angles)
        for _ in range(self.config.n_iter):
            waveform = torch.istft(magnitude * angles, length=num_samples, **stft)
            rebuilt = torch.stft(waveform, return_complex=True, **stft)
            accelerated = rebuilt - (self.config.momentum / (1 + self.config.momentum)) * previous
            angles = accelerated / accelerated.abs().clamp(min=1e-8)
            previous = rebuilt
        waveform = torch.istft(magnitude * angles, length=num_samples, **stft)
        return waveform[0] if unbatched else waveform
