#!/usr/bin/env python
"""Evaluate an MG2 pipeline on the test split, re-measuring the paper's relative claims at small scale.

    python training/evaluate.py --model checkpoints/mg2-small --ablation checkpoints/mg2-small-text --output_dir checkpoints/mg2-small/eval

For the first `--num_clips` test clips, every model generates audio for the clip's caption, and:
- FAD (Fréchet distance between Gaussians fitted to embeddings of real test audio and of generated
  audio) on two backbones: the CLMP audio tower (default) and a training-free spectral feature
  (mean and std of each log-mel bin and chroma bin). VGGish/PANNs FAD as in the paper needs their
  weights: with them installed, run `fadtk` or `audioldm_eval` on the WAVs this script writes (`--save_audio`).
- CLMP score: cosine similarity of the generated audio's CLMP embedding to its caption's.
- Melody adherence: frame-wise cosine similarity (10 frames/s, frames where the melody sounds) of the
  generated audio's chroma to the pitch class of the melody that guided it; the floor is the same
  measure against a random other melody of the index. The text-only ablation is scored against the
  melody MG2 retrieved for the same caption.
- Tempo: librosa's tempo estimate vs the caption's BPM (±15 %; also counting half/double tempo).
The table follows the paper's Table 1: MG2 vs the text-only ablation (same preset, data and steps),
and DPM-Solver 25 steps vs DDIM 200 steps. Small N makes FAD biased upward: compare rows, not papers.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import librosa
import numpy as np
import scipy.linalg
import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from mg2_pipeline import LogMelSpectrogram, Melody, MG2Pipeline, load_audio, save_audio
from mg2_pipeline.data import load_mg2_dataset
from mg2_pipeline.hub import write_model_card
from training_utils import MG2_FOLK_LIMITATIONS, describe_dataset, describe_mg2_model

CHROMA_FPS = 10
TEMPO_TOLERANCE = 0.15


def frechet_distance(real: np.ndarray, generated: np.ndarray) -> float:
    """‖μr − μg‖² + Tr(Σr + Σg − 2 (Σr Σg)^½), the standard FAD formula."""
    mu_r, mu_g = real.mean(0), generated.mean(0)
    sigma_r, sigma_g = np.cov(real, rowvar=False), np.cov(generated, rowvar=False)
    covariance_mean = np.real(scipy.linalg.sqrtm(sigma_r @ sigma_g))
    return float(((mu_r - mu_g) ** 2).sum() + np.trace(sigma_r + sigma_g - 2 * covariance_mean))


_MEL = LogMelSpectrogram()


def spectral_features(waveform: np.ndarray) -> np.ndarray:
    """Training-free embedding: mean and std over time of each log-mel bin and each chroma bin."""
    log_mel = _MEL(torch.from_numpy(waveform)).numpy()
    chroma = librosa.feature.chroma_stft(y=waveform, sr=16000, n_fft=2048, hop_length=1600)
    return np.concatenate([log_mel.mean(0), log_mel.std(0), chroma.mean(1), chroma.std(1)])


@torch.no_grad()
def clmp_audio_embeddings(pipe: MG2Pipeline, waveforms: list[np.ndarray]) -> np.ndarray:
    features = pipe.processor.feature_extractor(waveforms, return_tensors="pt")["input_features"]
    return pipe.clmp.get_audio_features(features.to(pipe.device)).cpu().numpy()


def melody_adherence(waveform: np.ndarray, melody: Melody) -> float:
    """Mean cosine similarity of audio chroma to the melody's pitch class, over frames where the melody sounds."""
    chroma = librosa.feature.chroma_stft(y=waveform, sr=16000, n_fft=2048, hop_length=16000 // CHROMA_FPS)
    roll = melody.to_piano_roll(frames_per_second=CHROMA_FPS)
    frames = min(chroma.shape[1], roll.shape[1])
    target = np.zeros((12, frames), dtype=np.float32)
    for pitch in range(128):
        target[pitch % 12] += roll[pitch, :frames]
    sounding = target.sum(0) > 0
    if not sounding.any():
        return 0.0
    a, b = chroma[:, :frames][:, sounding], target[:, sounding]
    return float(np.mean((a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0) + 1e-8)))


def tempo_matches(waveform: np.ndarray, bpm: float) -> tuple[float, bool, bool]:
    estimate = float(librosa.feature.tempo(y=waveform, sr=16000)[0])
    strict = abs(estimate - bpm) <= TEMPO_TOLERANCE * bpm
    octave = any(abs(estimate * factor - bpm) <= TEMPO_TOLERANCE * bpm for factor in (0.5, 1.0, 2.0))
    return estimate, strict, octave


def generate(pipe: MG2Pipeline, captions: list[str], args, steps: int, desc: str):
    """Waveforms and guiding melodies for every caption, batched, one seeded generator per clip."""
    waveforms, guides = [], []
    for start in tqdm(range(0, len(captions), args.batch_size), desc=desc, unit="batch"):
        batch = captions[start:start + args.batch_size]
        output = pipe(batch, num_inference_steps=steps, guidance_scale=args.guidance_scale, audio_length_in_s=args.seconds,
                      generator=[torch.Generator().manual_seed(args.seed + start + i) for i in range(len(batch))])
        waveforms += list(output.audios)
        guides += output.melodies
    return waveforms, guides


def score(name: str, pipe: MG2Pipeline, waveforms, guides, reference_melodies, rows, real, rng, model_dir: str) -> dict:
    captions = [row["caption"] for row in rows]
    text = pipe.encode_text(captions, pipe.device).cpu().numpy()
    generated_clmp = clmp_audio_embeddings(pipe, waveforms)
    generated_spectral = np.stack([spectral_features(w) for w in waveforms])
    melodies = [g.melody if g is not None else reference for g, reference in zip(guides, reference_melodies)]
    random_ids = rng.integers(0, len(pipe.retriever), len(waveforms))
    random_melodies = [pipe.retriever.get(int(i))[0] for i in random_ids]
    tempos = [tempo_matches(w, row["tempo_bpm"]) for w, row in zip(waveforms, rows)]
    rms = np.array([np.sqrt(np.mean(w ** 2)) for w in waveforms])
    flatness = np.array([librosa.feature.spectral_flatness(y=w).mean() for w in waveforms])
    summary_path = os.path.join(model_dir, "training_summary.json")
    hours = json.load(open(summary_path))["seconds"] / 3600 if os.path.isfile(summary_path) else None
    return {
        "model": name,
        "parameters_M": sum(p.numel() for m in (pipe.clmp, pipe.unet, pipe.vae, pipe.vocoder) for p in m.parameters()) / 1e6,
        "unet_training_hours": hours,
        "fad_clmp": frechet_distance(real["clmp"], generated_clmp),
        "fad_spectral": frechet_distance(real["spectral"], generated_spectral),
        "clmp_score": float(np.mean((generated_clmp * text).sum(1))),
        "melody_adherence": float(np.mean([melody_adherence(w, m) for w, m in zip(waveforms, melodies)])),
        "random_melody_floor": float(np.mean([melody_adherence(w, m) for w, m in zip(waveforms, random_melodies)])),
        "tempo_within_15pct": float(np.mean([t[1] for t in tempos])),
        "tempo_within_15pct_or_half_double": float(np.mean([t[2] for t in tempos])),
        "non_silent": float(np.mean(rms > 1e-3)),
        "spectral_flatness": float(flatness.mean()),
        "clips": len(waveforms),
    }


def format_table(results: list[dict]) -> str:
    lines = ["| model | params (M) | UNet training h | FAD CLMP ↓ | FAD spectral ↓ | CLMP score ↑ | melody adherence ↑ | "
             "random-melody floor | tempo ±15 % (½×/2× too) | non-silent | clips |", "|" + "---|" * 11]
    for r in results:
        hours = f"{r['unet_training_hours']:.2f}" if r["unet_training_hours"] is not None else "–"
        lines.append(f"| {r['model']} | {r['parameters_M']:.1f} | {hours} | {r['fad_clmp']:.4f} | {r['fad_spectral']:.2f} | "
                     f"{r['clmp_score']:.4f} | {r['melody_adherence']:.4f} | {r['random_melody_floor']:.4f} | "
                     f"{r['tempo_within_15pct']:.2f} ({r['tempo_within_15pct_or_half_double']:.2f}) | {r['non_silent']:.2f} | {r['clips']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A saved MG2 pipeline (text + melody condition).")
    parser.add_argument("--ablation", default=None, help="The text-only pipeline trained with the same preset, data and steps.")
    parser.add_argument("--dataset", default="data/mg2-folk")
    parser.add_argument("--split", default="test")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_clips", type=int, default=48)
    parser.add_argument("--ddim_clips", type=int, default=16, help="Clips for the DDIM-200 row (0 = skip it).")
    parser.add_argument("--seconds", type=float, default=10.24)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--ddim_steps", type=int, default=200)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save_audio", action="store_true", help="Write every generated clip under OUTPUT/audio/.")
    args = parser.parse_args(argv)
    if args.num_clips < 2:
        parser.error("--num_clips must be >= 2 (FAD needs a covariance)")

    start = time.perf_counter()
    rows = [row for row, _ in zip(load_mg2_dataset(args.dataset, args.split), range(args.num_clips))]
    pipe = MG2Pipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    real_audio = [load_audio(row["audio"]["bytes"])[: int(args.seconds * 16000)] for row in rows]
    real = {"clmp": clmp_audio_embeddings(pipe, real_audio), "spectral": np.stack([spectral_features(w) for w in real_audio])}
    captions = [row["caption"] for row in rows]
    rng = np.random.default_rng(args.seed)
    results, audio = [], {}

    waveforms, guides = generate(pipe, captions, args, args.steps, f"MG2, DPM-Solver {args.steps}")
    retrieved = [g.melody for g in guides]
    results.append(score(f"MG2 (DPM-Solver {args.steps})", pipe, waveforms, guides, retrieved, rows, real, rng, args.model))
    audio["mg2"] = waveforms
    if args.ablation:
        ablation = MG2Pipeline.from_pretrained(args.ablation)
        ablation.set_progress_bar_config(disable=True)
        if ablation.config.condition != "text":
            raise SystemExit(f"--ablation {args.ablation} is not a text-only model (condition={ablation.config.condition!r}).")
        ablation_waveforms, ablation_guides = generate(ablation, captions, args, args.steps, f"text-only, DPM-Solver {args.steps}")
        # scored with MG2's CLMP and index so both rows share one yardstick
        results.append(score(f"text-only ablation (DPM-Solver {args.steps})", pipe, ablation_waveforms, ablation_guides, retrieved,
                             rows, real, rng, args.ablation))
        results[-1]["parameters_M"] = sum(p.numel() for m in (ablation.clmp, ablation.unet, ablation.vae, ablation.vocoder)
                                          for p in m.parameters()) / 1e6
        audio["text-only"] = ablation_waveforms
    if args.ddim_clips:
        subset = min(args.ddim_clips, len(rows))
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        ddim_waveforms, ddim_guides = generate(pipe, captions[:subset], args, args.ddim_steps, f"MG2, DDIM {args.ddim_steps}")
        ddim_real = {key: value[:subset] for key, value in real.items()}
        results.append(score(f"MG2 (DDIM {args.ddim_steps}, first {subset} clips)", pipe, ddim_waveforms, ddim_guides,
                             retrieved[:subset], rows[:subset], ddim_real, rng, args.model))
        audio["mg2-ddim"] = ddim_waveforms

    os.makedirs(args.output_dir, exist_ok=True)
    if args.save_audio:
        for name, waveforms in audio.items():
            os.makedirs(os.path.join(args.output_dir, "audio", name), exist_ok=True)
            for index, waveform in enumerate(waveforms):
                save_audio(os.path.join(args.output_dir, "audio", name, f"{index:03d}.wav"), waveform)
    table = format_table(results)
    payload = {"results": results, "split": args.split, "dataset": args.dataset, "seconds": round(time.perf_counter() - start, 1),
               "settings": {k: v for k, v in vars(args).items() if k != "output_dir"}}
    with open(os.path.join(args.output_dir, "eval_results.json"), "w") as handle:
        json.dump(payload, handle, indent=2)
    markdown = (f"Test split of `{args.dataset}`, first {len(rows)} clips, {args.seconds} s each, guidance {args.guidance_scale}.\n\n"
                f"{table}\n\nFAD on {len(rows)} clips is biased upward; compare rows with each other. Adherence is the "
                f"chroma–melody cosine (chance level is the random-melody floor).\n")
    with open(os.path.join(args.output_dir, "eval_results.md"), "w") as handle:
        handle.write(markdown)
    write_model_card(args.model, evaluation=markdown, datasets=[os.path.basename(os.path.normpath(args.dataset))],
                     dataset_description=describe_dataset(args.dataset), model_description=describe_mg2_model(args.model, pipe),
                     limitations=MG2_FOLK_LIMITATIONS)
    print(table)
    print(f"Wrote {os.path.join(args.output_dir, 'eval_results.json')} and eval_results.md; model card {args.model}/README.md")
    return payload


if __name__ == "__main__":
    main()
