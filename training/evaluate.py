#!/usr/bin/env python
"""Evaluate MG2 on the test split between its bounds: every figure beside its ceiling and its floor, same clips, one run.

    python training/evaluate.py --model checkpoints/mg2-small --ablation checkpoints/mg2-small-text --output_dir checkpoints/mg2-small/eval
    python training/evaluate.py --codec_only --vae checkpoints/vae-small --output_dir /tmp/codec   # the codec rows alone

Melody adherence, three ways (each row says against what):
- **Mel acc** as Music ControlNet and MuseControlLite report it: both signals high-passed at 261.2 Hz
  (2nd-order Butterworth), `librosa.feature.chroma_stft` (n_fft 2048, hop 256), per-frame argmax; the share
  of frames where the two agree. Chance ≈ 1/12.
- **chroma-vs-notes**: on the same chroma, the share of frames where a melody note sounds whose chroma
  peak is that note's pitch class.
- **chroma cosine**: frame-wise cosine of the (unfiltered, 10 frames/s) chroma to the sounding pitch class.
Under the table, Mel acc on the clips led by their melody and on the others, and the **semitone miss share**: of the
frames where the real clip's chroma peak is its melody's note, the share read one chroma bin from it.

Rows, for the first `--num_clips` test clips:
- ceilings: the real clip (FAD: test against as many validation clips, the best a model can reach at this
  N); its log-mel through the vocoder; through VAE (encode, decode) + vocoder.
- reference: the melody sketch MG2 is given (the clip's melody as plain tones) through VAE + vocoder, what the
  condition itself draws.
- floor: the real clip against another test clip's melody (and, for Mel acc, another clip's audio).
- **given melody**: each clip's own melody passed as `melody=` with its caption; Mel acc against the real
  clip. Floors: MG2's output for another clip against this one; the same model with melody guidance 0; the
  pooled-only model (`--pooled`, the paper's condition) and the caption-only model (`--ablation`).
- **retrieved melody**: caption only; chroma-vs-notes against the melody that guided it. Floors: the same
  audio against another clip's melody; the pooled-only model against its own guiding melody; the
  caption-only model against the melody MG2 retrieved.
The prompt's sound (`sound_measures.py`), on the same clips: an instrument classifier and an accompanied-or-solo
classifier fitted on real train-split clips only (logistic regressions on timbre features, no CLMP) read
- **family / program accuracy** (8 families of the 30 melody programs): real clips and real clips through the codec
  (ceilings); MG2 given each clip's melody with a prompt naming the clip's instrument, in phrasings the caption
  templates never use (`benchmarks/instrument_prompts.json`); the same melody and seed with a prompt naming another
  family (its accuracy against the family it names, and as a floor against the clip's own family); the
  retrieved melody with the instrument prompt; the clip's caption with melody guidance 1 and 0 (and the caption-only
  model); chance. **Paired preference**: how often the family a prompt names is more probable in its own audio than
  in its partner's (same melody and seed, the other prompt; for real clips, a clip of another family). Chance 0.5.
- **accompaniment**: how often the output sounds accompanied when its caption names accompaniment, and when not.
- **onset clicks**: on audio that follows the given melody, the 2–8 kHz burst at its note onsets relative to the
  clip's power, the median over clips (lower is cleaner).
The codec rows add an **STFT distance** to the real waveform at STFT sizes no vocoder is built or trained at, which
sees phase (`HEARD_STFT_RESOLUTIONS`).
FAD is computed on the CLMP audio tower and on a training-free spectral feature; VGGish/PANNs FAD as in the
paper needs their weights (run `fadtk`/`audioldm_eval` on the WAVs `--save_audio` writes). Small N biases
FAD upward: compare rows, not papers.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import librosa
import numpy as np
import scipy.linalg
import scipy.signal
import torch
from diffusers import AutoencoderKL, DDIMScheduler
from sound_measures import (
    DEFAULT_PROMPTS,
    FAMILIES,
    FAMILY_OF_PROGRAM,
    InstrumentPrompts,
    SoundClassifier,
    family_of,
    onset_click_energy,
    paired_preference,
    timbre_features,
)
from tqdm.auto import tqdm
from training_utils import MG2_FOLK_LIMITATIONS, describe_dataset, describe_mg2_model

from mg2_pipeline import GriffinLimVocoder, LogMelSpectrogram, Melody, MG2Pipeline, load_audio, save_audio
from mg2_pipeline.audio import SAMPLE_RATE, multi_resolution_stft_distance
from mg2_pipeline.autoencoder_mel import vae_scale_factor
from mg2_pipeline.data import load_mg2_dataset
from mg2_pipeline.hub import write_model_card
from mg2_pipeline.presets import load_vae, load_vocoder
from mg2_pipeline.threads import fit_threads

CHROMA_FPS = 10
TEMPO_TOLERANCE = 0.15
MEL_ACC_HOP = 256
# A real clip is "melody-led" when its own chroma peak is its melody's note in this share of frames; in the others the
# instrument's overtones and the accompaniment also move the peaks Mel acc compares, so there it reads timbre too.
MELODY_LED_SHARE = 0.9
CODEC_ROW = "log-mel → VAE → vocoder"  # the codec ceiling's row
_HIGHPASS = scipy.signal.butter(2, 261.2, btype="highpass", fs=SAMPLE_RATE, output="sos")
_MEL = LogMelSpectrogram()
# Unlike the mel analysis (1 024 / 160), Vocos' frames (640 / 160) and the vocoder's training loss (512 to 2 048):
# phases that disagree between frames smear transients in short windows and beat in long ones, which no magnitude at
# 1 024 shows.
HEARD_STFT_RESOLUTIONS = ((128, 32), (256, 64), (4096, 1024))


def frechet_distance(real: np.ndarray, generated: np.ndarray) -> float:
    """‖μr − μg‖² + Tr(Σr + Σg − 2 (Σr Σg)^½), the standard FAD formula."""
    mu_r, mu_g = real.mean(0), generated.mean(0)
    sigma_r, sigma_g = np.cov(real, rowvar=False), np.cov(generated, rowvar=False)
    covariance_mean = np.real(scipy.linalg.sqrtm(sigma_r @ sigma_g))
    return float(((mu_r - mu_g) ** 2).sum() + np.trace(sigma_r + sigma_g - 2 * covariance_mean))


def stft_distance(waveforms: list[np.ndarray], references: list[np.ndarray]) -> float:
    """Mean multi-resolution STFT distance (`HEARD_STFT_RESOLUTIONS`) of each waveform to its reference waveform."""
    distances = multi_resolution_stft_distance(
        torch.from_numpy(np.stack(waveforms)), torch.from_numpy(np.stack(references)), HEARD_STFT_RESOLUTIONS
    )
    return float(distances.mean())


def spectral_features(waveform: np.ndarray) -> np.ndarray:
    """Training-free embedding: mean and std over time of each log-mel bin and each chroma bin."""
    log_mel = _MEL(torch.from_numpy(waveform)).numpy()
    chroma = librosa.feature.chroma_stft(y=waveform, sr=SAMPLE_RATE, n_fft=2048, hop_length=1600)
    return np.concatenate([log_mel.mean(0), log_mel.std(0), chroma.mean(1), chroma.std(1)])


@torch.no_grad()
def clmp_audio_embeddings(pipe: MG2Pipeline, waveforms: list[np.ndarray]) -> np.ndarray:
    features = pipe.processor.feature_extractor(waveforms, return_tensors="pt")["input_features"]
    return pipe.clmp.get_audio_features(features.to(pipe.device)).cpu().numpy()


def chroma_peaks(waveform: np.ndarray) -> np.ndarray:
    """Mel acc's per-frame pitch class: 261.2 Hz Butterworth high-pass (order 2), chroma_stft (2048 / 256), argmax."""
    filtered = scipy.signal.sosfilt(_HIGHPASS, waveform).astype(np.float32)
    return librosa.feature.chroma_stft(y=filtered, sr=SAMPLE_RATE, n_fft=2048, hop_length=MEL_ACC_HOP).argmax(0)


def mel_accuracy(peaks: np.ndarray, reference_peaks: np.ndarray) -> float:
    """Share of frames whose chroma peaks agree (both from `chroma_peaks`)."""
    frames = min(len(peaks), len(reference_peaks))
    return float(np.mean(peaks[:frames] == reference_peaks[:frames]))


def melody_pitch_classes(melody: Melody, frames_per_second: float, frames: int) -> np.ndarray:
    """`(12, frames)` booleans: which pitch classes the melody sounds in each frame."""
    roll = melody.to_piano_roll(frames_per_second=frames_per_second)[:, :frames]
    classes = np.zeros((12, frames), dtype=bool)
    for pitch in np.flatnonzero(roll.any(1)):
        classes[pitch % 12, : roll.shape[1]] |= roll[pitch] > 0
    return classes


def chroma_note_share(peaks: np.ndarray, melody: Melody) -> float:
    """Share of the frames where the melody sounds whose chroma peak is a pitch class of the sounding note."""
    classes = melody_pitch_classes(melody, SAMPLE_RATE / MEL_ACC_HOP, len(peaks))
    sounding = classes.any(0)
    if not sounding.any():
        return 0.0
    return float(np.mean(classes[peaks, np.arange(len(peaks))][sounding]))


def semitone_miss_share(
    peaks: list[np.ndarray], reference_peaks: list[np.ndarray], melodies: list[Melody]
) -> float | None:
    """Of all frames where the reference clip's chroma peak is its sounding melody note's pitch class, the share whose
    peak is one chroma bin from it: a pitch drawn between two semitones, or a note a semitone wrong. None if no
    frame qualifies."""
    misses = frames_playing = 0
    for clip_peaks, clip_reference, melody in zip(peaks, reference_peaks, melodies):
        frames = min(len(clip_peaks), len(clip_reference))
        classes = melody_pitch_classes(melody, SAMPLE_RATE / MEL_ACC_HOP, frames)
        clip_peaks, clip_reference = clip_peaks[:frames], clip_reference[:frames]
        playing = classes[clip_reference, np.arange(frames)]
        misses += int(np.isin((clip_peaks - clip_reference) % 12, (1, 11))[playing].sum())
        frames_playing += int(playing.sum())
    return misses / frames_playing if frames_playing else None


def melody_adherence(waveform: np.ndarray, melody: Melody) -> float:
    """Mean cosine similarity of audio chroma to the melody's pitch class, over frames where the melody sounds."""
    chroma = librosa.feature.chroma_stft(y=waveform, sr=SAMPLE_RATE, n_fft=2048, hop_length=SAMPLE_RATE // CHROMA_FPS)
    target = melody_pitch_classes(melody, CHROMA_FPS, chroma.shape[1]).astype(np.float32)
    sounding = target.any(0)
    if not sounding.any():
        return 0.0
    a, b = chroma[:, sounding], target[:, sounding]
    return float(np.mean((a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0) + 1e-8)))


def tempo_matches(waveform: np.ndarray, bpm: float) -> tuple[float, bool, bool]:
    estimate = float(librosa.feature.tempo(y=waveform, sr=SAMPLE_RATE)[0])
    strict = abs(estimate - bpm) <= TEMPO_TOLERANCE * bpm
    octave = any(abs(estimate * factor - bpm) <= TEMPO_TOLERANCE * bpm for factor in (0.5, 1.0, 2.0))
    return estimate, strict, octave


class Bench:
    """The clips under test and everything measured against them: real audio, melodies, reference embeddings."""

    def __init__(
        self, rows: list[dict], seconds: float, validation_audio: list[np.ndarray], pipe: MG2Pipeline | None, seed: int
    ):
        self.rows, self.pipe = rows, pipe
        self.samples = int(round(seconds * SAMPLE_RATE))
        self.captions = [row["caption"] for row in rows]
        self.real = [self.fit(load_audio(row["audio"]["bytes"])) for row in rows]
        self.melodies = [Melody.from_notes(row["melody_notes"]).slice(0, seconds) for row in rows]
        # "another clip's melody": a seeded shift, so no clip is paired with itself
        shift = int(np.random.default_rng(seed).integers(1, len(rows)))
        self.other = [(index + shift) % len(rows) for index in range(len(rows))]
        self.real_peaks = [chroma_peaks(w) for w in self.real]
        self.melody_led = np.array(
            [chroma_note_share(p, m) >= MELODY_LED_SHARE for p, m in zip(self.real_peaks, self.melodies)]
        )
        self.real_spectral = np.stack([spectral_features(w) for w in self.real])
        self.real_clmp = clmp_audio_embeddings(pipe, self.real) if pipe is not None else None
        self.caption_embeds = pipe.encode_text(self.captions, pipe.device).cpu().numpy() if pipe is not None else None
        self.validation = [self.fit(w) for w in validation_audio]
        # The prompt's sound: each clip's melody program (the first of `programs`) and whether it is accompanied.
        self.programs = [row["programs"][0] if row.get("programs") else None for row in rows]
        self.accompanied = np.array([len(row.get("programs") or []) > 1 for row in rows])

    def fit(self, waveform: np.ndarray) -> np.ndarray:
        """Cut or zero-pad to the evaluated length."""
        return np.pad(waveform[: self.samples], (0, max(0, self.samples - len(waveform)))).astype(np.float32)

    def row(
        self,
        protocol: str,
        audio: str,
        kind: str,
        waveforms: list[np.ndarray],
        melodies: list[Melody] | None,
        mel_acc_against: list[int] | None = None,
        fad: bool = True,
        **extra,
    ) -> dict:
        """One table row: adherence of `waveforms` to `melodies` (chroma) and to the real clips `mel_acc_against`
        (indices; None = each its own clip, with Mel acc also on the melody-led clips and on the others, and the
        semitone miss share), FAD to the real test clips, CLMP score against the captions."""
        peaks = [chroma_peaks(w) for w in waveforms]
        against = mel_acc_against if mel_acc_against is not None else range(len(waveforms))
        accuracies = np.array([mel_accuracy(p, self.real_peaks[i]) for p, i in zip(peaks, against)])
        result = {
            "protocol": protocol,
            "audio": audio,
            "kind": kind,
            "clips": len(waveforms),
            "mel_acc": float(accuracies.mean()),
        }
        if mel_acc_against is None:
            led = self.melody_led[: len(waveforms)]
            result["mel_acc_melody_led"] = float(accuracies[led].mean()) if led.any() else None
            result["mel_acc_not_melody_led"] = float(accuracies[~led].mean()) if not led.all() else None
            result["semitone_miss_share"] = semitone_miss_share(peaks, self.real_peaks, self.melodies)
        if melodies is not None:
            result["chroma_vs_notes"] = float(np.mean([chroma_note_share(p, m) for p, m in zip(peaks, melodies)]))
            result["chroma_cosine"] = float(np.mean([melody_adherence(w, m) for w, m in zip(waveforms, melodies)]))
        if fad:
            result["fad_spectral"] = frechet_distance(
                self.real_spectral, np.stack([spectral_features(w) for w in waveforms])
            )
            if self.pipe is not None:
                embeddings = clmp_audio_embeddings(self.pipe, waveforms)
                result["fad_clmp"] = frechet_distance(self.real_clmp, embeddings)
                result["clmp_score"] = float(np.mean((embeddings * self.caption_embeds[: len(waveforms)]).sum(1)))
        return {**result, **extra}


@torch.no_grad()
def codec_rows(bench: Bench, vae: AutoencoderKL, vocoder) -> tuple[list[dict], list[np.ndarray]]:
    """Ceilings and floor that need no generator: real clips, through the vocoder, through VAE + vocoder (whose audio
    is returned too); and for reference what the melody condition itself draws: the plain melody sketch MG2 is given,
    through VAE + vocoder."""
    real_mels = torch.stack([_MEL(torch.from_numpy(w)) for w in bench.real])  # (clips, frames, 64)
    multiple = vae_scale_factor(vae)
    if real_mels.shape[1] % multiple:
        raise SystemExit(f"--seconds gives {real_mels.shape[1]} mel frames; the VAE needs a multiple of {multiple}.")

    def through_the_vae(mel: torch.Tensor) -> torch.Tensor:
        return vae.decode(vae.encode(mel[None, None]).latent_dist.mode()).sample[0, 0]

    def vocode(mel: torch.Tensor) -> np.ndarray:
        return vocoder(mel[None])[0].cpu().numpy()[: bench.samples]

    vocoded, reconstructed, through_vae, sketches = [], [], [], []
    progress = tqdm(
        zip(real_mels, bench.melodies), desc="codec: vocoder and VAE + vocoder", unit="clip", total=len(real_mels)
    )
    for mel, melody in progress:
        vocoded.append(vocode(mel))
        reconstructed.append(through_the_vae(mel))
        through_vae.append(vocode(reconstructed[-1]))
        sketches.append(
            vocode(through_the_vae(_MEL(torch.from_numpy(melody.render_tones(bench.samples, SAMPLE_RATE)))))
        )
    reconstructed = torch.stack(reconstructed)
    real = bench.row(
        "codec",
        "real clip (FAD: test vs validation clips)",
        "ceiling",
        bench.real,
        bench.melodies,
        fad=False,
        stft_distance=0.0,
    )
    real["fad_spectral"] = frechet_distance(
        bench.real_spectral, np.stack([spectral_features(w) for w in bench.validation])
    )
    if bench.pipe is not None:
        real["fad_clmp"] = frechet_distance(bench.real_clmp, clmp_audio_embeddings(bench.pipe, bench.validation))
    return [
        real,
        bench.row(
            "codec",
            "log-mel → vocoder",
            "ceiling",
            vocoded,
            bench.melodies,
            stft_distance=stft_distance(vocoded, bench.real),
        ),
        bench.row(
            "codec",
            CODEC_ROW,
            "ceiling",
            through_vae,
            bench.melodies,
            mel_l1=float((reconstructed - real_mels).abs().mean()),
            stft_distance=stft_distance(through_vae, bench.real),
        ),
        bench.row(
            "codec",
            "melody sketch (as MG2 is given it) → VAE → vocoder",
            "reference",
            sketches,
            bench.melodies,
            fad=False,
        ),
        bench.row(
            "codec",
            "real clip vs another clip's melody / audio",
            "floor",
            bench.real,
            [bench.melodies[i] for i in bench.other],
            mel_acc_against=bench.other,
            fad=False,
            stft_distance=stft_distance(bench.real, [bench.real[i] for i in bench.other]),
        ),
    ], through_vae


def melody_led_summary(bench: Bench, results: list[dict]) -> str:
    """Mel acc through the codec and of MG2 given the clip's melody, on the melody-led clips and on the others, and
    how often each reads one chroma bin off where the real clip's peak is its melody's note."""
    led, clips = int(bench.melody_led.sum()), len(bench.melody_led)
    parts = [row for row in results if row["audio"] == CODEC_ROW]
    parts += [row for row in results if row["protocol"] == "given melody" and row["kind"] == "model"]
    parts = [row for row in parts if row["clips"] == clips]
    names = "the codec and MG2 given the clip's melody" if len(parts) == 2 else "the codec"

    def figures(key: str) -> str:
        values = [row[key] for row in parts]
        ratio = f" ({values[1] / values[0]:.2f} × the codec)" if len(values) == 2 and values[0] else ""
        return " and ".join(f"{value:.3f}" for value in values) + ratio

    semitones = ""
    if all(row["semitone_miss_share"] is not None for row in parts):
        semitones = (
            f" Of the frames where the real clip's chroma peak is its melody's note, {names} read one chroma bin from "
            f"it (a pitch between two semitones, or a note a semitone wrong) in {figures('semitone_miss_share')} of "
            "them; a chroma peak at random would be in 2 of 12."
        )
    if not 0 < led < clips:
        return f"{'All' if led else 'None'} of the {clips} clips are melody-led.{semitones}"
    return (
        f"Mel acc of {names} on the melody-led clips ({led} of {clips}, whose own chroma peak is the melody's note "
        f"in ≥ {MELODY_LED_SHARE * 100:.0f} % of frames): {figures('mel_acc_melody_led')}; on the other clips, "
        f"where overtones and accompaniment also move the peaks: {figures('mel_acc_not_melody_led')}.{semitones}"
    )


def generate(
    pipe: MG2Pipeline,
    bench: Bench,
    args,
    melodies: list[Melody] | None = None,
    steps: int | None = None,
    clips: int | None = None,
    melody_guidance_scale: float | None = None,
    prompts: list[str] | None = None,
    desc: str = "",
) -> tuple[list[np.ndarray], list]:
    """Waveforms and guiding melodies for the captions (or `prompts`), with `melodies` given or retrieved, one seeded
    generator per clip."""
    captions = (prompts or bench.captions)[:clips]
    waveforms, guides = [], []
    for start in tqdm(range(0, len(captions), args.batch_size), desc=desc, unit="batch"):
        fit_threads()
        batch = captions[start : start + args.batch_size]
        output = pipe(
            batch,
            melody=melodies[start : start + len(batch)] if melodies is not None else None,
            num_inference_steps=steps or args.steps,
            guidance_scale=args.guidance_scale,
            audio_length_in_s=args.seconds,
            melody_guidance_scale=args.melody_guidance_scale
            if melody_guidance_scale is None
            else melody_guidance_scale,
            guidance_interval=args.guidance_interval,
            generator=[torch.Generator().manual_seed(args.seed + start + i) for i in range(len(batch))],
        )
        waveforms += [bench.fit(w) for w in output.audios]
        guides += output.melodies
    return waveforms, guides


def model_rows(
    bench: Bench,
    pipe: MG2Pipeline,
    pooled: MG2Pipeline | None,
    ablation: MG2Pipeline | None,
    args,
    prompts: dict | None = None,
) -> tuple[list[dict], dict]:
    """The two protocols (given melody, then retrieved melody) for MG2, each beside its floors: another clip's melody,
    melody guidance 0, and (when given) the pooled-only and caption-only models. With `prompts` (`instrument_prompts`),
    also the instrument prompts' audio for the sound table: given melody with the clip's and another family's
    instrument, and retrieved."""
    others = [bench.melodies[i] for i in bench.other]
    audio = {}

    def tempo(waveforms):
        return float(np.mean([tempo_matches(w, row["tempo_bpm"])[2] for w, row in zip(waveforms, bench.rows)]))

    def heard(melodies):  # the part of each guiding melody that the evaluated seconds can play
        return [melody.slice(0, args.seconds) if melody.onsets[0] < args.seconds else melody for melody in melodies]

    audio["given"], _ = generate(pipe, bench, args, melodies=bench.melodies, desc="MG2, given melody")
    audio["given-no-guidance"], _ = generate(
        pipe,
        bench,
        args,
        melodies=bench.melodies,
        melody_guidance_scale=0.0,
        desc="MG2, given melody, melody guidance 0",
    )
    audio["retrieved"], guides = generate(pipe, bench, args, desc="MG2, retrieved melody")
    if prompts is not None:
        audio["instrument"], _ = generate(
            pipe,
            bench,
            args,
            melodies=bench.melodies,
            prompts=prompts["own"],
            desc="MG2, given melody, prompt naming the clip's instrument",
        )
        audio["other-instrument"], _ = generate(
            pipe,
            bench,
            args,
            melodies=bench.melodies,
            prompts=prompts["other"],
            desc="MG2, given melody, prompt naming another family",
        )
        audio["instrument-retrieved"], _ = generate(
            pipe,
            bench,
            args,
            prompts=prompts["own"],
            desc="MG2, retrieved melody, prompt naming the clip's instrument",
        )
    guiding = heard([guide.melody for guide in guides])
    given = [
        bench.row(
            "given melody",
            f"MG2, given the clip's melody (melody guidance {args.melody_guidance_scale:g})",
            "model",
            audio["given"],
            bench.melodies,
            tempo_half_double=tempo(audio["given"]),
        ),
        bench.row(
            "given melody",
            "MG2's output for another clip (its caption and melody), vs this clip",
            "floor",
            [audio["given"][i] for i in bench.other],
            bench.melodies,
            fad=False,
        ),
        bench.row(
            "given melody",
            "MG2, given the clip's melody, melody guidance 0",
            "floor",
            audio["given-no-guidance"],
            bench.melodies,
            fad=False,
        ),
    ]
    retrieved = [
        bench.row(
            "retrieved melody",
            "MG2 vs the melody that guided it",
            "model",
            audio["retrieved"],
            guiding,
            tempo_half_double=tempo(audio["retrieved"]),
        ),
        bench.row("retrieved melody", "MG2 vs another clip's melody", "floor", audio["retrieved"], others, fad=False),
    ]
    if pooled is not None:
        audio["pooled-given"], _ = generate(
            pooled, bench, args, melodies=bench.melodies, desc="pooled-only model, given melody"
        )
        audio["pooled-retrieved"], pooled_guides = generate(
            pooled, bench, args, desc="pooled-only model, retrieved melody"
        )
        given.append(
            bench.row(
                "given melody",
                "pooled-only model (the paper's condition), given the clip's melody",
                "floor",
                audio["pooled-given"],
                bench.melodies,
                tempo_half_double=tempo(audio["pooled-given"]),
            )
        )
        retrieved.append(
            bench.row(
                "retrieved melody",
                "pooled-only model vs the melody that guided it",
                "floor",
                audio["pooled-retrieved"],
                heard([guide.melody for guide in pooled_guides]),
            )
        )
    if ablation is not None:
        audio["caption-only"], _ = generate(ablation, bench, args, desc="caption-only model")
        given.append(
            bench.row(
                "given melody",
                "caption-only model",
                "floor",
                audio["caption-only"],
                bench.melodies,
                tempo_half_double=tempo(audio["caption-only"]),
            )
        )
        retrieved.append(
            bench.row(
                "retrieved melody",
                "caption-only model vs the melody MG2 retrieved",
                "floor",
                audio["caption-only"],
                guiding,
                fad=False,
            )
        )
    if args.ddim_clips:
        subset = min(args.ddim_clips, len(bench.rows))
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        audio["retrieved-ddim"], ddim_guides = generate(
            pipe, bench, args, steps=args.ddim_steps, clips=subset, desc=f"MG2, DDIM {args.ddim_steps}"
        )
        retrieved.append(
            bench.row(
                "retrieved melody",
                f"MG2, DDIM {args.ddim_steps} steps (first {subset} clips; no FAD)",
                "model",
                audio["retrieved-ddim"],
                heard([guide.melody for guide in ddim_guides]),
                fad=False,
            )
        )
    return given + retrieved, audio


def instrument_prompts(bench: Bench, path: str) -> dict:
    """Per clip, a prompt naming its melody instrument and one naming an instrument of another family (same phrasing)."""
    templates = InstrumentPrompts(path)
    other = [templates.other_family_program(i, program) for i, program in enumerate(bench.programs)]
    return {
        "own": [templates.prompt(i, program) for i, program in enumerate(bench.programs)],
        "other": [templates.prompt(i, program) for i, program in enumerate(other)],
        "own_programs": np.array(bench.programs),
        "other_programs": np.array(other),
    }


def sound_rows(bench: Bench, classifier: SoundClassifier, audio: dict, prompts: dict) -> list[dict]:
    """The prompt's sound: instrument family and program accuracy, paired preference, accompaniment and onset clicks
    (on audio that follows the given melody: its onsets are where clicks are looked for), for the real and codec audio
    (ceilings), each generated set in `audio` that exists, and chance."""
    features = {name: np.stack([timbre_features(w) for w in waveforms]) for name, waveforms in audio.items()}
    probabilities = {name: classifier.family_probabilities(f) for name, f in features.items()}
    own = prompts["own_programs"]
    onsets = [melody.onsets for melody in bench.melodies]
    # A real clip's partner: the next test clip of another family (clips without one are left out of the pairs).
    others = [
        [j % len(own) for j in range(i + 1, i + len(own)) if family_of(own[j % len(own)]) != family_of(own[i])]
        for i in range(len(own))
    ]
    paired = np.array([i for i in range(len(own)) if others[i]])
    partner = np.array([others[i][0] for i in paired], dtype=int)

    def row(name, label, kind, programs=own, paired_with=None, accompaniment=False, clicks=False):
        families = [family_of(p) for p in programs]
        predicted = [FAMILIES[i] for i in probabilities[name].argmax(1)]
        result = {
            "audio": label,
            "kind": kind,
            "clips": len(programs),
            "family_accuracy": float(np.mean([p == f for p, f in zip(predicted, families)])),
            "program_accuracy": float(np.mean(classifier.programs(features[name]) == programs)),
        }
        if paired_with is not None and len(paired_with[2]):
            other_name, other_programs, clips, order = paired_with
            result["paired_preference"] = paired_preference(
                probabilities[name][clips],
                probabilities[other_name][order],
                [families[i] for i in clips],
                [family_of(p) for p in other_programs[order]],
            )
        if accompaniment:
            heard = classifier.accompanied(features[name])
            result["accompanied_when_asked"] = (
                float(heard[bench.accompanied].mean()) if bench.accompanied.any() else None
            )
            result["accompanied_when_solo"] = (
                float(heard[~bench.accompanied].mean()) if (~bench.accompanied).any() else None
            )
        if clicks:
            # The median over clips: a few real clips of plucked or struck instruments, silent between notes above
            # 2 kHz, have attacks hundreds of times their mean power and would decide a mean.
            result["onset_clicks"] = float(np.median([onset_click_energy(w, o) for w, o in zip(audio[name], onsets)]))
        return result

    rows = [
        row(
            "real",
            "real clips",
            "ceiling",
            paired_with=("real", own, paired, partner),
            accompaniment=True,
            clicks=True,
        ),
        row(
            "codec",
            "real clips through the codec (log-mel → VAE → vocoder)",
            "ceiling",
            paired_with=("codec", own, paired, partner),
            accompaniment=True,
            clicks=True,
        ),
    ]
    every = np.arange(len(own))
    if "instrument" in audio:
        rows += [
            row(
                "instrument",
                "MG2, given melody, prompt naming the clip's instrument",
                "model",
                paired_with=("other-instrument", prompts["other_programs"], every, every),
                clicks=True,
            ),
            row(
                "other-instrument",
                "MG2, given melody, prompt naming another family (scored against that family)",
                "model",
                programs=prompts["other_programs"],
            ),
            row(
                "other-instrument",
                "MG2, given melody, prompt naming another family, read as the clip's own family",
                "floor",
            ),
            row("instrument-retrieved", "MG2, retrieved melody, prompt naming the clip's instrument", "model"),
            row("given", "MG2, given melody, the clip's caption", "model", accompaniment=True, clicks=True),
            row("given-no-guidance", "MG2, given melody, the clip's caption, melody guidance 0", "model"),
        ]
    if "caption-only" in audio:
        rows.append(row("caption-only", "caption-only model, the clip's caption", "ablation", accompaniment=True))
    if "pooled-given" in audio:
        rows.append(
            row("pooled-given", "pooled-only model, given melody, the clip's caption", "ablation", accompaniment=True)
        )
    # Chance: always naming the test clips' most common family (program); pairs at random.
    rows.append(
        {
            "audio": "chance (the most common family / program of these clips)",
            "kind": "floor",
            "clips": len(own),
            "family_accuracy": max(np.mean([family_of(p) == f for p in own]) for f in FAMILIES),
            "program_accuracy": max(np.mean(own == p) for p in set(own)),
            "paired_preference": 0.5,
        }
    )
    codec_clicks = rows[1]["onset_clicks"]
    for result in rows:
        if "onset_clicks" in result:
            result["onset_clicks_vs_codec"] = result["onset_clicks"] / codec_clicks if codec_clicks else None
    return rows


def format_sound_table(rows: list[dict]) -> str:
    columns = [
        ("family_accuracy", "family acc ↑", "{:.2f}"),
        ("program_accuracy", "program acc ↑", "{:.2f}"),
        ("paired_preference", "paired preference ↑", "{:.2f}"),
        ("accompanied_when_asked", "accompanied, caption asks", "{:.2f}"),
        ("accompanied_when_solo", "accompanied, caption solo ↓", "{:.2f}"),
        ("onset_clicks", "onset clicks ↓", "{:.3f}"),
        ("onset_clicks_vs_codec", "clicks ÷ codec", "{:.2f}"),
    ]
    lines = [
        "| audio | bound | " + " | ".join(title for _, title, _ in columns) + " |",
        "|" + "---|" * (2 + len(columns)),
    ]
    for row in rows:
        cells = [form.format(row[key]) if row.get(key) is not None else "–" for key, _, form in columns]
        lines.append(
            f"| {row['audio']} | {row['kind'] if row['kind'] != 'model' else '**model**'} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    columns = [
        ("mel_acc", "Mel acc ↑", "{:.3f}"),
        ("chroma_vs_notes", "chroma-vs-notes ↑", "{:.3f}"),
        ("chroma_cosine", "chroma cosine ↑", "{:.3f}"),
        ("fad_clmp", "FAD CLMP ↓", "{:.4f}"),
        ("fad_spectral", "FAD spectral ↓", "{:.2f}"),
        ("clmp_score", "CLMP score ↑", "{:.3f}"),
        ("mel_l1", "mel L1 ↓", "{:.3f}"),
        ("stft_distance", "STFT distance ↓", "{:.3f}"),
        ("tempo_half_double", "tempo ±15 % (½×/2×)", "{:.2f}"),
    ]
    columns = [column for column in columns if any(column[0] in row for row in rows)]
    lines = [
        "| protocol | audio | bound | " + " | ".join(title for _, title, _ in columns) + " |",
        "|" + "---|" * (3 + len(columns)),
    ]
    for row in rows:
        cells = [form.format(row[key]) if key in row else "–" for key, _, form in columns]
        bound = "**model**" if row["kind"] == "model" else row["kind"]
        lines.append(f"| {row['protocol']} | {row['audio']} | {bound} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="A saved MG2 pipeline (text + melody condition).")
    parser.add_argument(
        "--pooled",
        default=None,
        help="The pooled-only pipeline (no aligned melody) trained with the same preset and data.",
    )
    parser.add_argument(
        "--ablation", default=None, help="The caption-only pipeline trained with the same preset, data and steps."
    )
    parser.add_argument(
        "--codec_only", action="store_true", help="Only the codec rows (real, vocoder, VAE + vocoder, floor)."
    )
    parser.add_argument("--vae", default=None, help="Evaluate this VAE folder instead of the model's (codec rows).")
    parser.add_argument(
        "--vocoder",
        default=None,
        help="A trained vocoder folder (VocosVocoder or SpeechT5HifiGan) instead of the model's.",
    )
    parser.add_argument("--dataset", default="data/mg2-folk")
    parser.add_argument("--split", default="test")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_clips", type=int, default=32)
    parser.add_argument("--ddim_clips", type=int, default=0, help="Clips for an extra DDIM row (0 = none).")
    parser.add_argument("--seconds", type=float, default=10.24)
    parser.add_argument("--steps", type=int, default=None, help="Default: the pipeline's default_num_inference_steps.")
    parser.add_argument("--ddim_steps", type=int, default=200)
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's.")
    parser.add_argument("--melody_guidance_scale", type=float, default=None, help="Default: the pipeline's.")
    parser.add_argument(
        "--guidance_interval",
        default="0,1",
        help="LOW,HIGH: both guidance scales apply only while t / num_train_timesteps is in [LOW, HIGH].",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save_audio", action="store_true", help="Write every generated clip under OUTPUT/audio/.")
    parser.add_argument(
        "--prompts", default=DEFAULT_PROMPTS, help="Instrument prompt templates for the text-adherence rows."
    )
    parser.add_argument(
        "--classifier_clips",
        type=int,
        default=1500,
        help="Real train-split clips the instrument and accompaniment classifiers are fitted on.",
    )
    args = parser.parse_args(argv)
    try:
        args.guidance_interval = tuple(float(bound) for bound in args.guidance_interval.split(","))
    except ValueError:
        parser.error(f"--guidance_interval must be LOW,HIGH, got {args.guidance_interval!r}")
    if args.split == "train":
        parser.error(
            "--split train: the sound classifier is fitted on the train split; evaluate on validation or test"
        )
    if args.num_clips < 2:
        parser.error("--num_clips must be >= 2 (FAD needs a covariance, the floor another clip)")
    if not args.model and not (args.codec_only and args.vae):
        parser.error("pass --model, or --codec_only with --vae")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    pipe = MG2Pipeline.from_pretrained(args.model) if args.model else None
    if pipe is not None:
        pipe.set_progress_bar_config(disable=True)
        if args.steps is None:
            args.steps = pipe.default_num_inference_steps
        # The comparison models are generated at --model's scales: refuse defaults that differ (a distilled one's).
        for flag, path in (("--pooled", args.pooled), ("--ablation", args.ablation)):
            distilled = MG2Pipeline.load_config(path).get("distilled_guidance_scale") if path else None
            scales_given = args.guidance_scale is not None and args.melody_guidance_scale is not None
            if path and distilled != pipe.config.get("distilled_guidance_scale") and not scales_given:
                raise SystemExit(
                    f"{flag} {path} and --model {args.model} default to different guidance (one is guidance-"
                    "distilled): pass --guidance_scale and --melody_guidance_scale to compare them at the same scales."
                )
        args.guidance_scale, args.melody_guidance_scale = pipe.guidance_scales(
            args.guidance_scale, args.melody_guidance_scale
        )
    vae = load_vae(args.vae) if args.vae else pipe.vae
    if args.vocoder:
        vocoder = load_vocoder(args.vocoder)
    else:
        vocoder = pipe.vocoder if pipe is not None else GriffinLimVocoder()
    rows = [row for row, _ in zip(load_mg2_dataset(args.dataset, args.split), range(args.num_clips))]
    validation = [
        load_audio(row["audio"]["bytes"])
        for row, _ in zip(load_mg2_dataset(args.dataset, "validation"), range(len(rows)))
    ]
    bench = Bench(rows, args.seconds, validation, pipe, args.seed)

    results, codec_audio = codec_rows(bench, vae.eval(), vocoder.eval())
    audio, sound, prompts = {}, [], None
    # A transcribed dataset names no instruments, and one without solo or accompanied clips trains no classifier.
    measurable = all(program in FAMILY_OF_PROGRAM for program in bench.programs)
    if measurable:
        try:
            classifier = SoundClassifier.fit_on_rows(
                load_mg2_dataset(args.dataset, "train"), args.classifier_clips, args.seed
            )
            prompts = instrument_prompts(bench, args.prompts)
        except ValueError as error:
            print(f"No sound table: {error}")
            measurable = False
    if not args.codec_only:
        ablation = pooled = None
        if args.pooled:
            pooled = MG2Pipeline.from_pretrained(args.pooled)
            pooled.set_progress_bar_config(disable=True)
            if pooled.config.aligned_melody is not None or pooled.config.condition != "text_melody":
                raise SystemExit(
                    f"--pooled {args.pooled} is not a pooled-only model (aligned_melody={pooled.config.aligned_melody!r})."
                )
        if args.ablation:
            ablation = MG2Pipeline.from_pretrained(args.ablation)
            ablation.set_progress_bar_config(disable=True)
            if ablation.config.condition != "text":
                raise SystemExit(
                    f"--ablation {args.ablation} is not a caption-only model (condition={ablation.config.condition!r})."
                )
        generated_rows, audio = model_rows(bench, pipe, pooled, ablation, args, prompts)
        results += generated_rows
    if measurable:
        sound = sound_rows(bench, classifier, {"real": bench.real, "codec": codec_audio, **audio}, prompts)

    os.makedirs(args.output_dir, exist_ok=True)
    if args.save_audio:
        for name, waveforms in audio.items():
            os.makedirs(os.path.join(args.output_dir, "audio", name), exist_ok=True)
            for index, waveform in enumerate(waveforms):
                save_audio(os.path.join(args.output_dir, "audio", name, f"{index:03d}.wav"), waveform)
    table = format_table(results)
    sound_table = format_sound_table(sound) if sound else ""
    payload = {
        "results": results,
        "sound": sound,
        "split": args.split,
        "dataset": args.dataset,
        "seconds": round(time.perf_counter() - start, 1),
        "settings": {k: v for k, v in vars(args).items() if k != "output_dir"},
    }
    with open(os.path.join(args.output_dir, "eval_results.json"), "w") as handle:
        json.dump(payload, handle, indent=2)
    sampling = (
        f"{args.steps} DPM-Solver steps, guidance {args.guidance_scale} (text) and {args.melody_guidance_scale} (melody)"
        f"{'' if args.guidance_interval == (0.0, 1.0) else f' within guidance_interval {args.guidance_interval}'}; "
        if pipe is not None
        else ""
    )
    markdown = (
        f"Test split of `{args.dataset}`, first {len(rows)} clips, {args.seconds} s each, {sampling}"
        "every row in one run on the same clips.\n\n"
        f"{table}\n\nMel acc: chroma peaks (261.2 Hz high-pass, chroma_stft) agreeing with the real clip's; chance ≈ 0.08. "
        "chroma-vs-notes: frames whose chroma peak is the sounding melody note's pitch class. Ceilings are real audio "
        "and real audio through this model's codec; floors are another clip's melody, melody guidance 0, and the pooled-only "
        "and caption-only models where given. The reference is the melody sketch MG2 is given (plain tones) through the "
        "codec: the pitch its condition draws. "
        f"FAD on {len(rows)} clips is biased upward: compare rows with each other. "
        f"{melody_led_summary(bench, results)}\n"
    )
    if sound:
        markdown += (
            f"\nThe prompt's sound, same clips and run: an instrument classifier and an accompaniment classifier "
            f"fitted on {classifier.train_clips} real train-split clips (timbre features, logistic regression; no "
            f"CLMP) read each audio. Instrument prompts from `{os.path.basename(args.prompts)}`; another family's "
            "prompt uses the same melody, seed and phrasing. Onset clicks: the median over clips of the 2–8 kHz "
            "burst at the melody's "
            "note onsets relative to the clip's power.\n\n" + sound_table + "\n"
        )
    with open(os.path.join(args.output_dir, "eval_results.md"), "w") as handle:
        handle.write(markdown)
    if not args.codec_only:
        write_model_card(
            args.model,
            evaluation=markdown,
            datasets=[os.path.basename(os.path.normpath(args.dataset))],
            dataset_description=describe_dataset(args.dataset),
            model_description=describe_mg2_model(args.model, pipe),
            limitations=MG2_FOLK_LIMITATIONS,
        )
    print(table)
    print(sound_table)
    print(
        f"Wrote {os.path.join(args.output_dir, 'eval_results.json')} and eval_results.md"
        + ("" if args.codec_only else f"; model card {args.model}/README.md")
    )
    return payload


if __name__ == "__main__":
    main()
