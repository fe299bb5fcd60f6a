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

from .audio import F_MAX, F_MIN, HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, WIN_LENGTH, log_mel_batch


class GriffinLimVocoder(ModelMixin, ConfigMixin):
    """Inverts `LogMelSpectrogram`: exp → least-squares mel inversion → fast Griffin-Lim (momentum `momentum`).

    Conditioned so that a tiny change of the input stays tiny (`benchmarks/bench_vocoder.py`): the iterations run in
    float64 from each bin's steady phase advance rather than all-zero phases, and a bin's rebuilt coefficient is
    normalised to unit length only where it holds at least `phase_floor` × the bin's target magnitude. Weaker
    coefficients, whose direction is mostly rounding noise, are scaled by the floor instead, so they cannot swing the
    waveform. Keep momentum at 0.5 with the floor: higher momentum loses pitch accuracy through the VAE
    (`docs/design.md`). Items are inverted one at a time, so an item's waveform does not depend on its batch.
    Quality is that of Griffin-Lim (phasey, but pitches and rhythm are right); `training/train_vocoder.py` trains a
    `VocosVocoder` or a HiFi-GAN.
    """

    @register_to_config
    def __init__(
        self,
        sampling_rate: int = SAMPLE_RATE,
        model_in_dim: int = N_MELS,
        n_fft: int = N_FFT,
        hop_length: int = HOP_LENGTH,
        win_length: int = WIN_LENGTH,
        f_min: float = F_MIN,
        f_max: float = F_MAX,
        n_iter: int = 32,
        momentum: float = 0.5,
        phase_floor: float = 0.5,
    ):
        super().__init__()
        import librosa

        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}.")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
        if not 0 <= phase_floor <= 0.5:
            # Above 0.5 the scaled coefficients lose energy iteration after iteration: on real clips 0.6 fades the waveform.
            raise ValueError(f"phase_floor must be in [0, 0.5], got {phase_floor}.")
        mel_basis = torch.from_numpy(
            librosa.filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=model_in_dim, fmin=f_min, fmax=f_max)
        )
        self.register_buffer("inverse_mel_basis", torch.linalg.pinv(mel_basis.double()).float())
        self.register_buffer("window", torch.hann_window(win_length))

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """Log-mel `(batch, frames, model_in_dim)` or `(frames, model_in_dim)` → waveform in the input's dtype."""
        spectrogram, unbatched = log_mel_batch(spectrogram, self.config.model_in_dim)
        waveform = torch.stack([self.invert(item) for item in spectrogram.double()]).to(spectrogram.dtype)
        return waveform[0] if unbatched else waveform

    def invert(self, log_mel: torch.Tensor) -> torch.Tensor:
        """One float64 log-mel `(frames, model_in_dim)` → its float64 waveform."""
        magnitude = torch.clamp(self.inverse_mel_basis.double() @ log_mel.exp().T, min=0.0)  # (bins, frames)
        # torch.stft with center=True gives frames + 1 columns for frames * hop samples: repeat the last frame.
        magnitude = torch.cat([magnitude, magnitude[:, -1:]], dim=-1)
        num_samples = log_mel.shape[0] * self.config.hop_length
        stft = dict(
            n_fft=self.config.n_fft,
            hop_length=self.config.hop_length,
            win_length=self.config.win_length,
            window=self.window.double(),
        )
        # Start each bin at the phase a steady sinusoid at its centre frequency reaches by that frame: coherent across
        # frames like all-zero phases (which keep pitch best), but not degenerate.
        bins = torch.arange(magnitude.shape[0], dtype=torch.float64, device=magnitude.device)[:, None]
        frames = torch.arange(magnitude.shape[1], dtype=torch.float64, device=magnitude.device)[None]
        start = torch.polar(
            torch.ones_like(magnitude), 2 * torch.pi * bins * frames * self.config.hop_length / self.config.n_fft
        )
        floor = (self.config.phase_floor * magnitude).clamp(min=torch.finfo(torch.float64).tiny)
        angles, previous = start, torch.zeros_like(start)
        momentum = self.config.momentum / (1 + self.config.momentum)
        for _ in range(self.config.n_iter):
            rebuilt = torch.stft(
                torch.istft(magnitude * angles, length=num_samples, **stft), return_complex=True, **stft
            )
            accelerated = rebuilt - momentum * previous
            angles = accelerated / torch.maximum(accelerated.abs(), floor)
            previous = rebuilt
        return torch.istft(magnitude * angles, length=num_samples, **stft)
