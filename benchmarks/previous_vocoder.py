"""The vocoder peer of the speed and vocoder benchmarks: Griffin-Lim as MG2 shipped it until 2026-12-04."""

import torch

from mg2_pipeline import GriffinLimVocoder


class PreviousGriffinLim(GriffinLimVocoder):
    """32 iterations from each bin's centre-frequency phase at phase floor 0.5, computed in float64, on the mel
    filters' pseudo-inverse."""

    def __init__(self):
        super().__init__(n_iter=32, phase_floor=0.5, phase_init="bins", nnls_iter=0)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        return super().forward(spectrogram.double()).to(spectrogram.dtype)
