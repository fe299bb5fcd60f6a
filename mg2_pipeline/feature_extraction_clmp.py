"""CLMP feature extractor: waveforms → the package's AudioLDM-compatible 64-bin log-mel."""

from __future__ import annotations

import numpy as np
import torch
from transformers import BatchFeature, SequenceFeatureExtractor

from .audio import N_MELS, SAMPLE_RATE, LogMelSpectrogram


class CLMPFeatureExtractor(SequenceFeatureExtractor):
    """Pads or cuts 16 kHz mono waveforms to `max_length_s` and returns `input_features` (batch, frames, 64).

    Shorter clips are zero-padded at the end; longer ones are cut. Silent or empty audio raises
    `ValueError`: it has no content to embed.
    """

    model_input_names = ["input_features"]

    def __init__(
        self,
        feature_size: int = N_MELS,
        sampling_rate: int = SAMPLE_RATE,
        padding_value: float = 0.0,
        max_length_s: float = 10.24,
        **kwargs,
    ):
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs)
        self.max_length_s = max_length_s
        self._mel = LogMelSpectrogram(sample_rate=sampling_rate, n_mels=feature_size)

    @property
    def max_samples(self) -> int:
        return int(round(self.max_length_s * self.sampling_rate))

    def __call__(
        self, raw_audio, sampling_rate: int | None = None, return_tensors: str | None = None, **kwargs
    ) -> BatchFeature:
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"sampling_rate must be {self.sampling_rate} Hz (resample with mg2_pipeline.load_audio), got {sampling_rate}."
            )
        if isinstance(raw_audio, torch.Tensor):
            raw_audio = raw_audio.detach().cpu().numpy()
        if isinstance(raw_audio, np.ndarray) and raw_audio.ndim == 1:
            raw_audio = [raw_audio]
        elif isinstance(raw_audio, np.ndarray) and raw_audio.ndim == 2:
            raw_audio = list(raw_audio)
        elif not isinstance(raw_audio, (list, tuple)) or (raw_audio and np.ndim(raw_audio[0]) == 0):
            raise ValueError("audio must be a mono waveform, a list of them, or a (batch, samples) array.")
        if len(raw_audio) == 0:
            raise ValueError("audio is empty: pass at least one waveform.")
        batch = np.zeros((len(raw_audio), self.max_samples), dtype=np.float32)
        for index, waveform in enumerate(raw_audio):
            waveform = np.asarray(waveform, dtype=np.float32)
            if waveform.ndim != 1:
                raise ValueError(f"audio[{index}] must be a mono 1-D waveform, got shape {waveform.shape}.")
            if not np.all(np.isfinite(waveform)):
                raise ValueError(f"audio[{index}] has NaN or infinite samples.")
            if waveform.size == 0 or not np.any(np.abs(waveform) > 1e-6):
                raise ValueError(f"audio[{index}] is silent or empty: there is nothing to embed.")
            clip = waveform[: self.max_samples]
            batch[index, : len(clip)] = clip
        with torch.no_grad():
            features = self._mel(torch.from_numpy(batch))
        return BatchFeature({"input_features": features.numpy()}, tensor_type=return_tensors)

    def to_dict(self):
        output = super().to_dict()
        output.pop("_mel", None)
        return output


CLMPFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
