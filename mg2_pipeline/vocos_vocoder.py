"""`VocosVocoder`: a trained log-mel → waveform vocoder in the style of Vocos (Siuzdak, 2023).

ConvNeXt blocks at the mel frame rate predict each frame's STFT magnitude and phase; an inverse STFT turns them into
the waveform. Nothing runs at the sample rate, so it is far cheaper than a HiFi-GAN of the same width. It has the call
signature of transformers' `SpeechT5HifiGan` and of `GriffinLimVocoder` (a log-mel `(batch, frames, 64)` or
`(frames, 64)` in, a waveform `(batch, frames × hop_length)` or `(samples,)` out), so a pipeline takes any of the
three.
Train it with `training/train_vocoder.py --architecture vocos`.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .audio import HOP_LENGTH, N_MELS, SAMPLE_RATE, log_mel_batch


class ConvNeXtBlock(nn.Module):
    """Depthwise convolution over time, LayerNorm, pointwise MLP, layer scale, residual."""

    def __init__(self, dim: int, intermediate_dim: int, layer_scale: float):
        super().__init__()
        self.depthwise = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pointwise_in = nn.Linear(dim, intermediate_dim)
        self.pointwise_out = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (batch, dim, frames)
        x = self.norm(self.depthwise(hidden).transpose(1, 2))
        x = self.gamma * self.pointwise_out(nn.functional.gelu(self.pointwise_in(x)))
        return hidden + x.transpose(1, 2)


class VocosVocoder(ModelMixin, ConfigMixin):
    """Log-mel → ConvNeXt backbone → per-frame log-magnitude and phase of an `n_fft` STFT → inverse STFT.

    The inverse STFT overlap-adds Hann windows `hop_length` apart and trims `(n_fft - hop_length) / 2` samples at each
    end, so frame f is centred where `LogMelSpectrogram` centred it and `frames` frames give `frames × hop_length`
    samples.
    """

    @register_to_config
    def __init__(
        self,
        sampling_rate: int = SAMPLE_RATE,
        model_in_dim: int = N_MELS,
        hop_length: int = HOP_LENGTH,
        n_fft: int = 4 * HOP_LENGTH,
        dim: int = 256,
        intermediate_dim: int = 768,
        num_layers: int = 8,
    ):
        super().__init__()
        if n_fft < 2 * hop_length or (n_fft - hop_length) % 2:
            # Below 2 × hop_length the Hann windows' overlap-add has near-zero gaps to divide by.
            raise ValueError(
                f"n_fft must be at least 2 × hop_length ({2 * hop_length}) and differ from hop_length by an even "
                f"number, got {n_fft}."
            )
        self.embed = nn.Conv1d(model_in_dim, dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(dim, intermediate_dim, layer_scale=1 / num_layers) for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, n_fft + 2)  # log-magnitude and phase of n_fft / 2 + 1 bins
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """Log-mel `(batch, frames, model_in_dim)` or `(frames, model_in_dim)` → waveform in the input's dtype."""
        spectrogram, unbatched = log_mel_batch(spectrogram, self.config.model_in_dim)
        hidden = self.norm(self.embed(spectrogram.transpose(1, 2)).transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            hidden = block(hidden)
        log_magnitude, phase = self.head(self.final_norm(hidden.transpose(1, 2))).float().chunk(2, dim=-1)
        # Clamped as Vocos does: an untrained head must not overflow exp().
        spectrum = torch.polar(log_magnitude.exp().clamp(max=1e2), phase)  # (batch, frames, bins)
        waveform = self.inverse_stft(spectrum).to(spectrogram.dtype)
        return waveform[0] if unbatched else waveform

    def inverse_stft(self, spectrum: torch.Tensor) -> torch.Tensor:
        """`(batch, frames, n_fft / 2 + 1)` complex → `(batch, frames × hop_length)` by windowed overlap-add."""
        n_fft, hop = self.config.n_fft, self.config.hop_length
        frames = spectrum.shape[1]
        length = (frames - 1) * hop + n_fft
        window = self.window.float()  # in half precision the normaliser's floor would round to 0
        segments = torch.fft.irfft(spectrum, n=n_fft, dim=-1) * window  # (batch, frames, n_fft)
        fold = dict(output_size=(1, length), kernel_size=(1, n_fft), stride=(1, hop))
        waveform = nn.functional.fold(segments.transpose(1, 2), **fold)[:, 0, 0]
        envelope = nn.functional.fold(window.square().expand(1, frames, -1).transpose(1, 2), **fold)[0, 0, 0]
        trim = (n_fft - hop) // 2
        return (waveform / envelope.clamp(min=1e-11))[:, trim : length - trim]
