#!/usr/bin/env python
"""`GriffinLimVocoder` now against its earlier versions (the first: float32, zero starting phases, momentum 0.99;
the last: momentum 0.7 without a phase floor), same run, same clips: fidelity, pitch accuracy, conditioning, speed.

    python benchmarks/bench_vocoder.py --dataset data/mg2-folk --num_clips 32

- log-mel L1: mean absolute difference between the clip's log-mel and that of its vocoded waveform (0 is the
  real audio itself).
- Mel acc: real test clips (first 10.24 s) → log-mel → vocoder, chroma peaks against the real clip's
  (`training/evaluate.py`'s Mel acc); the ceiling is 1, the real audio itself.
- batched vs single: largest difference between vocoding a batch of 4 and each item alone (diffusers' pipeline
  tests expect 1e-4), and after a 1e-7 relative change of the input, relative to the waveform's peak.
- after 2e-6 log-mel noise: the waveform's largest change relative to its peak, median and worst over the clips
  (a UNet's batch-size rounding moves a decoded log-mel by about that much).
- seconds per clip, as a ratio to the previous vocoder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))

from evaluate import chroma_peaks, mel_accuracy  # noqa: E402

from mg2_pipeline import GriffinLimVocoder, LogMelSpectrogram, load_audio  # noqa: E402
from mg2_pipeline.audio import SAMPLE_RATE  # noqa: E402
from mg2_pipeline.data import load_mg2_dataset  # noqa: E402


def previous_griffin_lim(vocoder: GriffinLimVocoder, spectrogram: torch.Tensor) -> torch.Tensor:
    """The vocoder as it was before: float32, phases from zero, momentum 0.99 on every bin."""
    mel = spectrogram.float().exp().transpose(1, 2)
    magnitude = torch.clamp(vocoder.inverse_mel_basis @ mel, min=0.0)
    magnitude = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)
    num_samples = spectrogram.shape[1] * vocoder.config.hop_length
    stft = dict(
        n_fft=vocoder.config.n_fft,
        hop_length=vocoder.config.hop_length,
        win_length=vocoder.config.win_length,
        window=vocoder.window,
    )
    angles = torch.ones_like(magnitude, dtype=torch.complex64)
    previous = torch.zeros_like(angles)
    for _ in range(vocoder.config.n_iter):
        waveform = torch.istft(magnitude * angles, length=num_samples, **stft)
        rebuilt = torch.stft(waveform, return_complex=True, **stft)
        accelerated = rebuilt - (0.99 / (1 + 0.99)) * previous
        angles = accelerated / accelerated.abs().clamp(min=1e-8)
        previous = rebuilt
    return torch.istft(magnitude * angles, length=num_samples, **stft)


def conditioning(vocode, mels: torch.Tensor) -> dict[str, float]:
    batched = vocode(mels)
    single = torch.cat([vocode(mels[i : i + 1]) for i in range(len(mels))])
    perturbed = vocode(mels * (1 + 1e-7))
    peak = batched.abs().max().item()
    return {
        "batched_vs_single": (batched - single).abs().max().item(),
        "change_after_1e-7_input_change": (perturbed - batched).abs().max().item() / peak,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/mg2-folk")
    parser.add_argument("--num_clips", type=int, default=32)
    parser.add_argument("--clip_seconds", type=float, default=10.24)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)

    vocoder, to_mel = GriffinLimVocoder(), LogMelSpectrogram()
    samples = int(args.clip_seconds * SAMPLE_RATE)
    clips = []
    for row in load_mg2_dataset(args.dataset, split="test").take(args.num_clips):
        waveform = load_audio(row["audio"]["bytes"])[:samples]
        clips.append(np.pad(waveform, (0, samples - len(waveform))))
    vocoders = {
        "previous": lambda mel: previous_griffin_lim(vocoder, mel),
        "last": GriffinLimVocoder(momentum=0.7, phase_floor=0.0),
        "now": vocoder,
    }
    noise_generator = torch.Generator().manual_seed(0)
    results = {}
    with torch.no_grad():
        mels = [to_mel(torch.from_numpy(clip)) for clip in clips]
        noises = [torch.randn(mel.shape, generator=noise_generator) * 2e-6 for mel in mels]
        for name, vocode in vocoders.items():
            start, waveforms = time.perf_counter(), []
            for mel in tqdm(mels, desc=name):
                waveforms.append(vocode(mel[None])[0])
            seconds = (time.perf_counter() - start) / len(clips)
            changes = [
                ((vocode((mel + noise)[None])[0] - waveform).abs().max() / waveform.abs().max()).item()
                for mel, noise, waveform in zip(mels, noises, waveforms)
            ]
            results[name] = {
                "log_mel_l1": float(
                    np.mean([(to_mel(w) - mel).abs().mean().item() for w, mel in zip(waveforms, mels)])
                ),
                "mel_acc": float(
                    np.mean(
                        [
                            mel_accuracy(chroma_peaks(w.numpy()), chroma_peaks(clip))
                            for w, clip in zip(waveforms, clips)
                        ]
                    )
                ),
                "seconds_per_clip": seconds,
                **conditioning(vocode, torch.stack(mels[:4])),
                "change_after_2e-6_noise_median": float(np.median(changes)),
                "change_after_2e-6_noise_max": float(np.max(changes)),
            }
    results["now"]["seconds_ratio_to_previous"] = (
        results["now"]["seconds_per_clip"] / results["previous"]["seconds_per_clip"]
    )
    print(f"{len(clips)} test clips of {args.clip_seconds} s; Mel acc ceiling (the real audio) 1.000")
    print(
        f"{'vocoder':<10} {'log-mel L1':>10} {'Mel acc':>8} {'batched vs single':>18} {'1e-7 input change':>18} "
        f"{'2e-6 noise: median':>19} {'max':>9} {'s / clip':>9}"
    )
    for name, row in results.items():
        print(
            f"{name:<10} {row['log_mel_l1']:>10.3f} {row['mel_acc']:>8.3f} {row['batched_vs_single']:>18.2e} "
            f"{row['change_after_1e-7_input_change']:>18.2e} {row['change_after_2e-6_noise_median']:>19.2e} "
            f"{row['change_after_2e-6_noise_max']:>9.2e} {row['seconds_per_clip']:>9.2f}"
        )
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
