#!/usr/bin/env python
"""Griffin-Lim (`GriffinLimVocoder`, the default) against the same on the mel filters' pseudo-inverse (`nnls_iter=0`),
its earlier default (32 iterations from each bin's centre-frequency phase, in float64) and trained vocoders, same run,
same clips: what is heard, pitch, conditioning and speed.

    python benchmarks/bench_vocoder.py --vocoder checkpoints/vocoder-small --vae checkpoints/vae-small --num_clips 32

Each vocoder turns the real test clips' log-mels (first 10.24 s) into waveforms, and with `--vae` also the log-mels
after the VAE (encode, decode: the codec):
- STFT distance: multi-resolution STFT distance to the real waveform (`training/evaluate.py`'s, at STFTs of 128,
  256 and 4 096 samples, which neither the vocoders' own STFT nor the vocoder's training loss use). It sees phase:
  frames whose phases disagree smear and beat. 0 is the real audio; the floor is another clip.
- log-mel L1: mean absolute difference between the vocoder's input (the clip's log-mel, or the VAE's decoded one)
  and the log-mel of its waveform: how well it draws what it is given.
- Mel acc: chroma peaks against the real clip's (`training/evaluate.py`); the ceiling is 1, the floor another clip.
- batched vs single: largest difference between vocoding 4 clips as a batch and one by one, relative to the peak.
- after 2e-6 log-mel noise: the waveform's largest change relative to its peak, the median over clips (a UNet's
  batch-size rounding moves a decoded log-mel by about that much).
- seconds per clip, and as a ratio to Griffin-Lim's.
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

from evaluate import chroma_peaks, mel_accuracy, stft_distance  # noqa: E402
from previous_vocoder import PreviousGriffinLim  # noqa: E402

from mg2_pipeline import GriffinLimVocoder, LogMelSpectrogram, load_audio  # noqa: E402
from mg2_pipeline.audio import HOP_LENGTH, SAMPLE_RATE  # noqa: E402
from mg2_pipeline.data import load_mg2_dataset  # noqa: E402
from mg2_pipeline.presets import load_vae, load_vocoder  # noqa: E402


def conditioning(vocoder, mels: torch.Tensor) -> float:
    """Largest difference between a batch and its items vocoded one by one, relative to the peak."""
    batched = vocoder(mels)
    single = torch.cat([vocoder(mels[i : i + 1]) for i in range(len(mels))])
    return ((batched - single).abs().max() / batched.abs().max()).item()


def measure(vocoder, name: str, mels: list[torch.Tensor], clips: list[np.ndarray], to_mel) -> dict:
    vocoder(mels[0][None])  # warm-up, untimed
    start, waveforms = time.perf_counter(), []
    for mel in tqdm(mels, desc=name, unit="clip"):
        waveforms.append(vocoder(mel[None])[0][: mel.shape[0] * HOP_LENGTH])  # a HiFi-GAN gives a few samples more
    seconds = (time.perf_counter() - start) / len(mels)
    noise_generator = torch.Generator().manual_seed(0)
    changes = [
        (
            (vocoder((mel + 2e-6 * torch.randn(mel.shape, generator=noise_generator))[None])[0][: len(w)] - w)
            .abs()
            .max()
            / w.abs().max()
        ).item()
        for mel, w in zip(mels, waveforms)
    ]
    waveforms = [w.numpy() for w in waveforms]
    return {
        "stft_distance": stft_distance(waveforms, clips),
        "log_mel_l1": float(
            np.mean([(to_mel(torch.from_numpy(w)) - mel).abs().mean() for w, mel in zip(waveforms, mels)])
        ),
        "mel_acc": float(np.mean([mel_accuracy(chroma_peaks(w), chroma_peaks(c)) for w, c in zip(waveforms, clips)])),
        "batched_vs_single": conditioning(vocoder, torch.stack(mels[:4])),
        "change_after_2e-6_noise_median": float(np.median(changes)),
        "seconds_per_clip": seconds,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocoder", nargs="*", default=[], help="Trained vocoder folders to compare.")
    parser.add_argument("--vae", default=None, help="Also vocode the log-mels through this VAE (the codec rows).")
    parser.add_argument("--dataset", default="data/mg2-folk")
    parser.add_argument("--num_clips", type=int, default=32)
    parser.add_argument("--clip_seconds", type=float, default=10.24)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)

    to_mel = LogMelSpectrogram()
    samples = int(args.clip_seconds * SAMPLE_RATE)
    clips = []
    for row in load_mg2_dataset(args.dataset, split="test").take(args.num_clips):
        waveform = load_audio(row["audio"]["bytes"])[:samples]
        clips.append(np.pad(waveform, (0, samples - len(waveform))).astype(np.float32))
    vocoders = {
        "Griffin-Lim": GriffinLimVocoder(),
        "GL pseudo-inverse": GriffinLimVocoder(nnls_iter=0),
        "GL previous default": PreviousGriffinLim(),
    }
    vocoders.update({os.path.basename(os.path.normpath(path)): load_vocoder(path).eval() for path in args.vocoder})
    results = {}
    with torch.no_grad():
        inputs = {"log-mel": [to_mel(torch.from_numpy(clip)) for clip in clips]}
        if args.vae:
            vae = load_vae(args.vae).eval()
            inputs["log-mel → VAE"] = [
                vae.decode(vae.encode(mel[None, None]).latent_dist.mode()).sample[0, 0] for mel in inputs["log-mel"]
            ]
        for source, mels in inputs.items():
            for name, vocoder in vocoders.items():
                results[f"{source} → {name}"] = measure(vocoder, f"{source} → {name}", mels, clips, to_mel)
            griffin_lim_seconds = results[f"{source} → Griffin-Lim"]["seconds_per_clip"]
            for name in vocoders:
                row = results[f"{source} → {name}"]
                row["seconds_ratio_to_griffin_lim"] = row["seconds_per_clip"] / griffin_lim_seconds
    floor = {
        "stft_distance": stft_distance(clips, clips[1:] + clips[:1]),
        "mel_acc": float(
            np.mean([mel_accuracy(chroma_peaks(a), chroma_peaks(b)) for a, b in zip(clips, clips[1:] + clips[:1])])
        ),
    }
    results["floor: another clip"] = floor

    print(f"{len(clips)} test clips of {args.clip_seconds} s; ceiling: the real audio (STFT distance 0, Mel acc 1)")
    header = (
        f"{'audio':<34} {'STFT dist':>9} {'log-mel L1':>10} {'Mel acc':>8} {'batch/single':>12} "
        f"{'2e-6 noise':>10} {'s / clip':>8} {'÷ GL':>6}"
    )
    print(header)
    for name, row in results.items():
        cells = [
            f"{row['stft_distance']:>9.3f}",
            f"{row['log_mel_l1']:>10.3f}" if "log_mel_l1" in row else f"{'–':>10}",
            f"{row['mel_acc']:>8.3f}",
        ]
        if "seconds_per_clip" in row:
            cells += [
                f"{row['batched_vs_single']:>12.1e}",
                f"{row['change_after_2e-6_noise_median']:>10.1e}",
                f"{row['seconds_per_clip']:>8.3f}",
                f"{row['seconds_ratio_to_griffin_lim']:>6.2f}",
            ]
        print(f"{name:<34} " + " ".join(cells))
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
