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

from .audio import F_MAX, F_MIN, HOP_LENGTH, LOG_FLOOR, N_FFT, N_MELS, SAMPLE_RATE, WIN_LENGTH, log_mel_batch

# A spectral peak (`GriffinLimVocoder.initial_phase`): the largest of this many bins on either side, up to a tie (in
# log magnitude: far above float32 rounding), and this far above the smallest of them (0.1 nepers, 0.9 dB; a Hann
# window's main lobe falls far more over two bins).
PEAK_NEIGHBOURS = 2
PEAK_TIE = 1e-3
PEAK_PROMINENCE = 0.1


class GriffinLimVocoder(ModelMixin, ConfigMixin):
    """Inverts `LogMelSpectrogram`: exp → non-negative least-squares mel inversion → fast Griffin-Lim (momentum
    `momentum`).

    The mel inversion starts from the pseudo-inverse's solution, clipped at zero, and takes `nnls_iter` multiplicative
    updates towards the non-negative least-squares one (Lee and Seung's; librosa's `mel_to_stft` solves the same
    problem with L-BFGS-B on the CPU). Below 1 kHz the 64 filters' centres are 46 Hz apart, three semitones at middle
    C: the pseudo-inverse spreads a partial over its filters and moves its peak towards a filter's centre, while the
    non-negative solution keeps it narrow where the neighbouring filters' ratio places it (`nnls_iter=0`: the
    pseudo-inverse alone).

    The iterations start from a phase-locked estimate (`phase_init="peaks"`, Laroche and Dolson's identity phase
    locking): each frame's spectral peaks advance at their frequency, interpolated on the log magnitude, and every bin
    takes the phase of its nearest peak, π apart from its neighbours as in a Hann window's main lobe. Partials start
    coherent, so a few iterations give what many give from `phase_init="bins"` (each bin advancing at its centre
    frequency, input-independent).

    Conditioned so that a tiny change of the input stays small (`benchmarks/bench_vocoder.py`): the starting phases are
    summed over the frames in float64 (in float32 their rounding alone would swing the waveform), and a bin's rebuilt
    coefficient is normalised to unit length only where it holds at least `phase_floor` × the bin's target magnitude.
    Weaker coefficients, whose direction is mostly rounding noise, are scaled by the floor instead, so they cannot swing
    the waveform. Keep momentum at 0.5 with the floor: higher momentum loses pitch accuracy through the VAE
    (`docs/history.md`). Items are inverted one at a time, so an item's waveform does not depend on its batch. Quality
    is that of Griffin-Lim (phasey, but pitches and rhythm are right); `training/train_vocoder.py` trains a
    `VocosVocoder` or a HiFi-GAN.
    """

    phase_inits = ("peaks", "bins")

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
        n_iter: int = 8,
        momentum: float = 0.5,
        phase_floor: float = 0.3,
        phase_init: str = "peaks",
        nnls_iter: int = 100,
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
        if nnls_iter < 0:
            raise ValueError(f"nnls_iter must be >= 0, got {nnls_iter}.")
        if phase_init not in self.phase_inits:
            raise ValueError(f"phase_init must be one of {self.phase_inits}, got {phase_init!r}.")
        mel_basis = torch.from_numpy(
            librosa.filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=model_in_dim, fmin=f_min, fmax=f_max)
        )
        self.register_buffer("inverse_mel_basis", torch.linalg.pinv(mel_basis.double()).float())
        self.register_buffer("mel_basis", mel_basis.float(), persistent=False)  # rebuilt from the config
        self.register_buffer("window", torch.hann_window(win_length))

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """Log-mel `(batch, frames, model_in_dim)` or `(frames, model_in_dim)` → waveform in the input's dtype,
        computed in float32 (float64 for a float64 input)."""
        spectrogram, unbatched = log_mel_batch(spectrogram, self.config.model_in_dim)
        compute_dtype = torch.promote_types(spectrogram.dtype, torch.float32)
        waveform = torch.stack([self.invert(item) for item in spectrogram.to(compute_dtype)]).to(spectrogram.dtype)
        return waveform[0] if unbatched else waveform

    def invert(self, log_mel: torch.Tensor) -> torch.Tensor:
        """One log-mel `(frames, model_in_dim)` → its waveform, computed in the log-mel's dtype."""
        magnitude = self.mel_to_magnitude(log_mel.exp().T)  # (bins, frames)
        # torch.stft with center=True gives frames + 1 columns for frames * hop samples: repeat the last frame.
        magnitude = torch.cat([magnitude, magnitude[:, -1:]], dim=-1)
        num_samples = log_mel.shape[0] * self.config.hop_length
        stft = dict(
            n_fft=self.config.n_fft,
            hop_length=self.config.hop_length,
            win_length=self.config.win_length,
            window=self.window.to(log_mel.dtype),
        )
        coefficients = torch.polar(magnitude, self.initial_phase(magnitude))
        floor = (self.config.phase_floor * magnitude).clamp(min=torch.finfo(magnitude.dtype).tiny)
        previous = torch.zeros_like(coefficients)
        momentum = self.config.momentum / (1 + self.config.momentum)
        for _ in range(self.config.n_iter):
            rebuilt = torch.stft(torch.istft(coefficients, length=num_samples, **stft), return_complex=True, **stft)
            accelerated = torch.sub(rebuilt, previous, alpha=momentum)
            # The target magnitude with the accelerated phase: scaling the real view avoids complex multiplications.
            scale = magnitude / torch.maximum(accelerated.abs(), floor)
            coefficients = torch.view_as_complex(torch.view_as_real(accelerated) * scale[..., None])
            previous = rebuilt
        return torch.istft(coefficients, length=num_samples, **stft)

    def mel_to_magnitude(self, mel: torch.Tensor) -> torch.Tensor:
        """Mel magnitudes `(model_in_dim, frames)` → linear magnitudes `(n_fft // 2 + 1, frames)`, in `mel`'s dtype."""
        basis = self.mel_basis.to(mel)
        magnitude = torch.clamp(self.inverse_mel_basis.to(mel) @ mel, min=0.0)
        if self.config.nnls_iter == 0:
            return magnitude
        # A multiplicative update leaves a zero at zero: start every bin of a frame slightly above it.
        magnitude = magnitude + 1e-3 * magnitude.mean(0, keepdim=True)
        numerator = basis.T @ mel
        tiny = torch.finfo(mel.dtype).tiny
        for _ in range(self.config.nnls_iter):
            magnitude = magnitude * numerator / (basis.T @ (basis @ magnitude)).clamp(min=tiny)
        return magnitude

    def initial_phase(self, magnitude: torch.Tensor) -> torch.Tensor:
        """The phases Griffin-Lim starts from, `(bins, frames)` in `magnitude`'s dtype, in [0, 2π)."""
        num_bins, num_frames = magnitude.shape
        phase_per_bin_and_hop = 2 * torch.pi * self.config.hop_length / self.config.n_fft
        bins = torch.arange(num_bins, device=magnitude.device)[:, None].expand(num_bins, num_frames)
        if self.config.phase_init == "bins":
            # The phase a steady sinusoid at each bin's centre frequency reaches by each frame: coherent across frames
            # like all-zero phases (which keep pitch best), but not degenerate.
            frames = torch.arange(num_frames, dtype=torch.float64, device=magnitude.device)[None]
            return (phase_per_bin_and_hop * bins.double() * frames).remainder(2 * torch.pi).to(magnitude.dtype)
        log_magnitude = magnitude.clamp(min=LOG_FLOOR).log()  # below the log-mel's floor no shape is known
        below, at, above = log_magnitude[:-2], log_magnitude[1:-1], log_magnitude[2:]
        # A peak is within PEAK_TIE of the largest of its PEAK_NEIGHBOURS on either side, which stands
        # PEAK_PROMINENCE above their smallest, and the lowest such bin of a level top. Where a wide mel filter's
        # non-negative inversion is level or a gentle ramp, rounding alone would make, unmake and move bare local
        # maxima, and each change moves the phases of every frame after it.
        columns = log_magnitude.T[:, None]  # (frames, 1, bins)
        window = dict(kernel_size=2 * PEAK_NEIGHBOURS + 1, stride=1, padding=PEAK_NEIGHBOURS)
        local_max = torch.nn.functional.max_pool1d(columns, **window)[:, 0].T
        local_min = -torch.nn.functional.max_pool1d(-columns, **window)[:, 0].T
        is_top = (log_magnitude >= local_max - PEAK_TIE) & (local_max - local_min > PEAK_PROMINENCE)
        is_peak = is_top.clone()
        is_peak[1:] &= ~is_top[:-1]
        # A peak's frequency in bins: the vertex of the parabola through its log magnitude and its neighbours'. Bounded
        # at the prominence a peak needs, a flat top's curvature cannot turn rounding into a large move of its vertex.
        curvature = torch.minimum(below - 2 * at + above, torch.full_like(at, -PEAK_PROMINENCE))
        vertex = torch.zeros_like(magnitude)
        vertex[1:-1] = torch.where(is_peak[1:-1], 0.5 * (below - above) / curvature, 0.0)
        frequency = bins.double() + vertex.clamp(-0.5, 0.5)  # float64: summed over the frames below
        # Each bin's nearest peak in its frame (itself in a frame without peaks).
        previous_peak = torch.where(is_peak, bins, -num_bins).cummax(0).values
        next_peak = torch.where(is_peak, bins, 2 * num_bins).flip(0).cummin(0).values.flip(0)
        nearest = torch.where(bins - previous_peak <= next_peak - bins, previous_peak, next_peak)
        nearest = torch.where((0 <= nearest) & (nearest < num_bins), nearest, bins)
        # Every bin advances at its nearest peak's frequency and takes that peak's phase, π apart per bin as in a Hann
        # window's main lobe, less π × the peak's frequency in bins: an offset that differs from partial to partial.
        # Partials that all start in phase add up to clicks at note onsets.
        advance = phase_per_bin_and_hop * frequency.gather(0, nearest)
        accumulated = advance.cumsum(1) - advance[:, :1]
        phase = accumulated.gather(0, nearest) + torch.pi * (bins.double() - frequency.gather(0, nearest))
        return phase.remainder(2 * torch.pi).to(magnitude.dtype)
