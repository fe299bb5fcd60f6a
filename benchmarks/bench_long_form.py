#!/usr/bin/env python
"""Beyond one window, measured against one window in the same run (`MG2Pipeline` with a trained checkpoint).

    python benchmarks/bench_long_form.py --model checkpoints/mg2-small --dataset data/mg2-folk

- **cost**: seconds of compute per second of audio (median of runs adding up to about a minute of audio) and peak
  memory (each length in a fresh process, peak RSS) for one window, 60 s and 300 s; ratios to one window.
- **whole tune**: melodies of `--tune_clips` consecutive test clips laid end to end (≈ 60 s), generated in one call
  (windows) and clip by clip (one window each), same prompt, seed and settings; Mel acc (`training/evaluate.py`)
  against the real clips laid end to end. Ceiling: the real audio through the codec (log-mel → VAE → vocoder, window by
  window); floor: another tune's real audio.
- **seams**: in those long generations, the frame-to-frame log-mel change at window boundaries against its median
  elsewhere (1 = no seam).
- **audio-to-audio**: real test clips re-rendered with a new prompt at rising `strength`, for each text / melody
  guidance pair of `--a2a_guidance` and each new prompt of `--a2a_prompts`: Mel acc against the input (ceiling: the
  codec; floor: another clip), its paired fall from one strength to the next, and how far the CLMP text score (the new
  prompt's minus the clip caption's) moved from that of the same clip through the codec; each with its standard error
  over the clips.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))

from evaluate import chroma_peaks, clmp_audio_embeddings, mel_accuracy  # noqa: E402

from mg2_pipeline import LogMelSpectrogram, Melody, MG2AudioToAudioPipeline, MG2Pipeline, load_audio  # noqa: E402
from mg2_pipeline.audio import SAMPLE_RATE  # noqa: E402
from mg2_pipeline.data import load_mg2_dataset  # noqa: E402
from mg2_pipeline.pipeline_mg2 import window_starts  # noqa: E402

_MEL = LogMelSpectrogram()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="checkpoints/mg2-small")
    parser.add_argument("--dataset", default="data/mg2-folk")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument(
        "--lengths", default="10.24,60,300", help="Seconds for the cost rows; the first is the reference."
    )
    parser.add_argument("--tunes", type=int, default=2, help="Whole tunes (each --tune_clips clips long).")
    parser.add_argument("--tune_clips", type=int, default=6)
    parser.add_argument("--a2a_clips", type=int, default=24)
    parser.add_argument(
        "--a2a_prompts",
        nargs="+",
        help="The re-renderings' new prompts, one table each.",
        default=[
            "A slow, solemn chorale on church organ",
            "A bright, lively folk tune on trumpet",
            "A gentle folk song on piano",
        ],
    )
    parser.add_argument("--seed", type=int, default=0, help="Clip i of audio-to-audio is generated with seed + i.")
    parser.add_argument("--strengths", default="0.1,0.2,0.4,0.5,0.6,0.8,1.0")
    parser.add_argument(
        "--a2a_guidance",
        nargs="+",
        default=["3,3"],
        help="Text and melody guidance scales of the audio-to-audio rows, one or more pairs.",
    )
    parser.add_argument(
        "--a2a_guidance_interval", default="0,1", help="Their guidance_interval (fractions of the noise schedule)."
    )
    parser.add_argument("--parts", default="cost,tune,a2a")
    parser.add_argument("--output_json", default="benchmarks/results/long_form.json")
    parser.add_argument(
        "--measure_length", type=float, default=None, help=argparse.SUPPRESS
    )  # one cost row, in a child
    return parser.parse_args(argv)


def load(model: str) -> MG2Pipeline:
    pipe = MG2Pipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure_length(args) -> None:
    """Child process: generations of `--measure_length` seconds (repeated to about a minute of audio); prints the median
    wall time and the process's peak RSS."""
    pipe = load(args.model)
    pipe("A lively Irish jig on fiddle", audio_length_in_s=2.56, num_inference_steps=2)  # warm-up
    times = []
    for seed in range(max(1, round(60 / args.measure_length))):
        start = time.perf_counter()
        pipe(
            "A lively Irish jig on fiddle",
            audio_length_in_s=args.measure_length,
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(seed),
        )
        times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "length_s": args.measure_length,
                "runs": len(times),
                "compute_s": float(np.median(times)),
                "peak_rss_mib": peak_mib,
            }
        )
    )


def cost_rows(args) -> list[dict]:
    rows = []
    for length in tqdm([float(x) for x in args.lengths.split(",")], desc="cost"):
        result = subprocess.run(
            [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--steps",
                str(args.steps),
                "--measure_length",
                str(length),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row["compute_per_audio_s"] = row["compute_s"] / length
        rows.append(row)
    for row in rows:
        row["cost_ratio"] = row["compute_per_audio_s"] / rows[0]["compute_per_audio_s"]
        row["memory_ratio"] = row["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    return rows


def seam_ratio(pipe: MG2Pipeline, waveform: np.ndarray) -> dict:
    """Frame-to-frame log-mel change (mean over bins) at the frames where windows start or end, against elsewhere."""
    log_mel = _MEL(torch.from_numpy(waveform)).numpy()
    change = np.abs(np.diff(log_mel, axis=0)).mean(1)  # change[t]: frame t → t + 1
    latent_frames = pipe.mel_frames(len(waveform) / SAMPLE_RATE) // pipe.vae_scale_factor
    starts = window_starts(
        latent_frames, pipe.window_frames, pipe.window_overlap, pipe.frames_multiple // pipe.vae_scale_factor
    )
    edges = sorted(
        {s * pipe.vae_scale_factor for s in starts[1:]}
        | {(s + pipe.window_frames) * pipe.vae_scale_factor for s in starts[:-1]}
    )
    at_edges = np.array([change[edge - 1] for edge in edges if 0 < edge <= len(change)])
    elsewhere = np.delete(change, [edge - 1 for edge in edges if 0 < edge <= len(change)])
    return {
        "edges": len(at_edges),
        "median_ratio": float(np.median(at_edges) / np.median(elsewhere)),
        "mean_ratio": float(at_edges.mean() / elsewhere.mean()),
        "max_ratio": float(at_edges.max() / np.median(elsewhere)),
    }


def through_codec(pipe: MG2Pipeline, waveform: np.ndarray) -> np.ndarray:
    """Real audio → log-mel → VAE → vocoder, window by window like generated audio."""
    samples = pipe.mel_frames(len(waveform) / SAMPLE_RATE) * pipe.hop_length
    padded = torch.from_numpy(np.pad(waveform, (0, samples - len(waveform))))[None]
    latents = pipe.encode_waveforms(padded, pipe.device)
    return pipe.vocode(pipe.decode_latents(latents))[0, : len(waveform)].float().numpy()


def tune_rows(args, pipe: MG2Pipeline, test: list[dict]) -> tuple[list[dict], list[dict]]:
    clip_s = len(load_audio(test[0]["audio"]["bytes"])) / SAMPLE_RATE
    tunes = []
    for tune in range(args.tunes):
        rows = test[tune * args.tune_clips : (tune + 1) * args.tune_clips]
        real = np.concatenate(
            [np.pad(w := load_audio(row["audio"]["bytes"]), (0, int(clip_s * SAMPLE_RATE) - len(w))) for row in rows]
        )
        melodies = [Melody.from_notes(row["melody_notes"]).slice(0, clip_s) for row in rows]
        whole = Melody(
            np.concatenate([m.notes + np.array([0, i * clip_s, i * clip_s]) for i, m in enumerate(melodies)])
        )
        tunes.append({"caption": rows[0]["caption"], "real": real, "melodies": melodies, "whole": whole})
    results, seams = (
        {
            "one call, windows": [],
            "clip by clip, one window each": [],
            "ceiling: real → codec": [],
            "floor: another tune's real audio": [],
        },
        [],
    )
    for index, tune in enumerate(tqdm(tunes, desc="whole tunes")):
        seconds = len(tune["real"]) / SAMPLE_RATE
        reference = chroma_peaks(tune["real"])
        long = pipe(
            tune["caption"],
            melody=tune["whole"],
            audio_length_in_s=seconds,
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(index),
        ).audios[0]
        pieces = np.concatenate(
            [
                pipe(
                    tune["caption"],
                    melody=melody,
                    audio_length_in_s=clip_s,
                    num_inference_steps=args.steps,
                    generator=torch.Generator().manual_seed(index),
                ).audios[0]
                for melody in tune["melodies"]
            ]
        )
        other = tunes[(index + 1) % len(tunes)]["real"]
        for name, waveform in (
            ("one call, windows", long),
            ("clip by clip, one window each", pieces),
            ("ceiling: real → codec", through_codec(pipe, tune["real"])),
            ("floor: another tune's real audio", other),
        ):
            results[name].append(mel_accuracy(chroma_peaks(waveform), reference))
        seams.append({"tune": index, "seconds": seconds, **seam_ratio(pipe, long)})
    return [
        {"audio": name, "mel_acc": float(np.mean(values)), "tunes": len(values)} for name, values in results.items()
    ], seams


def standard_error(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values)))


def a2a_rows(args, pipe: MG2Pipeline, test: list[dict]) -> list[dict]:
    """One table per prompt of `--a2a_prompts`: the bounds, every guidance setting at every strength, and per setting
    the paired fall of Mel acc from each strength to the next."""
    audio_to_audio = MG2AudioToAudioPipeline.from_pipe(pipe)
    rows = test[: args.a2a_clips]
    real = [load_audio(row["audio"]["bytes"]) for row in rows]
    references = [chroma_peaks(w) for w in real]
    captions = pipe.encode_text([row["caption"] for row in rows], pipe.device).cpu().numpy()
    codec = [through_codec(pipe, w) for w in real]
    # What the melody condition of audio-to-audio holds: the input's transcription, played as plain tones.
    tones = [pipe.transcribe(torch.from_numpy(w)).render_tones(len(w)) for w in real]
    guidance_interval = tuple(float(g) for g in args.a2a_guidance_interval.split(","))
    settings = [tuple(float(g) for g in pair.split(",")) for pair in args.a2a_guidance]
    strengths = [float(s) for s in args.strengths.split(",")]
    tables = []
    for prompt in args.a2a_prompts:
        new_text = pipe.encode_text([prompt], pipe.device).cpu().numpy()[0]

        def text_scores(waveforms) -> np.ndarray:
            embeddings = clmp_audio_embeddings(pipe, waveforms)
            return embeddings @ new_text - (embeddings * captions).sum(1)

        codec_scores = text_scores(codec)

        def row(name, waveforms, against=None):
            against = against if against is not None else references
            mel_acc = np.array([mel_accuracy(chroma_peaks(w), r) for w, r in zip(waveforms, against)])
            # Clip by clip, how far the text score moved from the same clip through the codec (the input as the model
            # draws it): the codec alone moves it, so the input itself is the wrong reference.
            moves = text_scores(waveforms) - codec_scores
            return {
                "audio": name,
                "mel_acc": float(mel_acc.mean()),
                "mel_acc_standard_error": standard_error(mel_acc),
                "text_score_minus_codec": float(moves.mean()),
                "text_score_minus_codec_standard_error": standard_error(moves),
                "mel_acc_per_clip": mel_acc.round(4).tolist(),
            }

        table = [
            row("ceiling: real → codec", codec),
            row("the input itself", real),
            row("the input's transcribed melody as tones", tones),
            row("floor: another clip", real[1:] + real[:1]),
        ]
        falls = []
        for guidance_scale, melody_guidance_scale in settings:
            by_strength = []
            for strength in tqdm(
                strengths, desc=f"audio-to-audio, {guidance_scale:g} / {melody_guidance_scale:g}, {prompt!r}"
            ):
                outputs = [
                    audio_to_audio(
                        prompt,
                        audio=w,
                        strength=strength,
                        num_inference_steps=args.steps,
                        guidance_scale=guidance_scale,
                        melody_guidance_scale=melody_guidance_scale,
                        guidance_interval=guidance_interval,
                        generator=torch.Generator().manual_seed(args.seed + i),
                    ).audios[0]
                    for i, w in enumerate(real)
                ]
                by_strength.append(
                    row(f"strength {strength:g}, guidance {guidance_scale:g} / {melody_guidance_scale:g}", outputs)
                )
                table.append(
                    {
                        **by_strength[-1],
                        "strength": strength,
                        "guidance_scale": guidance_scale,
                        "melody_guidance_scale": melody_guidance_scale,
                    }
                )
            for (low, high), (a, b) in zip(zip(strengths, strengths[1:]), zip(by_strength, by_strength[1:])):
                fall = np.array(a["mel_acc_per_clip"]) - np.array(b["mel_acc_per_clip"])
                falls.append(
                    {
                        "guidance": f"{guidance_scale:g} / {melody_guidance_scale:g}",
                        "strengths": (low, high),
                        "mel_acc_fall": float(fall.mean()),
                        "standard_error": standard_error(fall),
                    }
                )
        tables.append({"prompt": prompt, "rows": table, "mel_acc_falls": falls})
    return tables


def main(argv=None):
    args = parse_args(argv)
    if args.measure_length is not None:
        return measure_length(args)
    parts = set(args.parts.split(","))
    results = {
        "model": args.model,
        "steps": args.steps,
        "a2a_prompts": args.a2a_prompts,
        "a2a_guidance": args.a2a_guidance,
        "a2a_guidance_interval": args.a2a_guidance_interval,
        "seed": args.seed,
    }
    if "cost" in parts:
        results["cost"] = cost_rows(args)
    if parts & {"tune", "a2a"}:
        pipe = load(args.model)
        test = list(load_mg2_dataset(args.dataset, split="test", streaming=False))
        if "tune" in parts:
            results["whole_tune"], results["seams"] = tune_rows(args, pipe, test)
        if "a2a" in parts:
            results["audio_to_audio"] = a2a_rows(args, pipe, test)
    os.makedirs(os.path.dirname(args.output_json) or ".", exist_ok=True)
    with open(args.output_json, "w") as handle:
        json.dump(results, handle, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
