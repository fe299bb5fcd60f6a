#!/usr/bin/env python
"""Few-step sampling: MG2's quality and speed at 25 / 12 / 8 / 4 steps for several schedulers, in one run.

    python benchmarks/bench_few_steps.py --model checkpoints/mg2-small --dataset data/mg2-folk --num_clips 32

Each scheduler setting generates the first test clips' melodies with prompts naming each clip's instrument
(`benchmarks/instrument_prompts.json`), with `training/evaluate.py`'s seeds and guidance. Reported per row: Mel acc
against the real clip, family accuracy (`evaluate.py`'s instrument classifier, fitted on real train-split clips), FAD
(CLMP) to the real clips, and seconds per clip as a ratio against the model's own scheduler at 25 steps. In the same
run: the ceilings (real clips; real clips through the codec) and the floors (real clips scored against another
clip's family and melody; the model's own scheduler at 25 steps with melody guidance 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))

from evaluate import (  # noqa: E402
    Bench,
    chroma_peaks,
    clmp_audio_embeddings,
    codec_rows,
    frechet_distance,
    generate,
    instrument_prompts,
    mel_accuracy,
    parse_args,
)
from sound_measures import FAMILIES, SoundClassifier, family_of, timbre_features  # noqa: E402

from mg2_pipeline import MG2Pipeline, load_audio  # noqa: E402
from mg2_pipeline.data import load_mg2_dataset  # noqa: E402

# Name → (scheduler class, config overrides); "saved" is the pipeline's own scheduler.
SCHEDULERS = {
    "saved": (None, {}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpm++2m-trailing": (DPMSolverMultistepScheduler, {"timestep_spacing": "trailing"}),
    "dpm++3m": (DPMSolverMultistepScheduler, {"solver_order": 3}),
    "dpm++2m-sigma-min": (DPMSolverMultistepScheduler, {"final_sigmas_type": "sigma_min"}),
    "unipc": (UniPCMultistepScheduler, {}),
    "unipc-trailing": (UniPCMultistepScheduler, {"timestep_spacing": "trailing"}),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A saved MG2 pipeline.")
    parser.add_argument("--dataset", default="data/mg2-folk")
    parser.add_argument("--num_clips", type=int, default=32)
    parser.add_argument("--classifier_clips", type=int, default=1500)
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 12, 8, 4])
    parser.add_argument("--schedulers", nargs="+", choices=sorted(SCHEDULERS), default=list(SCHEDULERS))
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    settings = parse_args(["--model", args.model, "--output_dir", "-"])  # evaluate.py's seeds, guidance, batch

    pipe = MG2Pipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    saved_scheduler = pipe.scheduler
    rows = [row for row, _ in zip(load_mg2_dataset(args.dataset, "test"), range(args.num_clips))]
    validation = [
        load_audio(row["audio"]["bytes"])
        for row, _ in zip(load_mg2_dataset(args.dataset, "validation"), range(args.num_clips))
    ]
    bench = Bench(rows, settings.seconds, validation, pipe, settings.seed)
    classifier = SoundClassifier.fit_on_rows(load_mg2_dataset(args.dataset, "train"), args.classifier_clips)
    prompts = instrument_prompts(bench, settings.prompts)
    families = [family_of(program) for program in prompts["own_programs"]]

    def measure(waveforms, against: list[int] | None = None, seconds: float | None = None, fad_against=None) -> dict:
        """Mel acc and family accuracy against each clip's own melody and family, or clip `against[i]`'s (the floor,
        which has no FAD); FAD (CLMP) of `fad_against` (default `waveforms`) to the real test clips."""
        fad = (
            None
            if against
            else frechet_distance(bench.real_clmp, clmp_audio_embeddings(pipe, fad_against or waveforms))
        )
        against = against or list(range(len(waveforms)))
        predicted = classifier.family_probabilities(np.stack([timbre_features(w) for w in waveforms])).argmax(1)
        return {
            "mel_acc": float(
                np.mean([mel_accuracy(chroma_peaks(w), bench.real_peaks[j]) for w, j in zip(waveforms, against)])
            ),
            "family_accuracy": float(np.mean([FAMILIES[p] == families[j] for p, j in zip(predicted, against)])),
            "fad_clmp": fad,
            "seconds_per_clip": seconds,
        }

    def timed_generation(desc: str, steps: int, melody_guidance_scale: float | None = None):
        start = time.perf_counter()
        waveforms, _ = generate(
            pipe,
            bench,
            settings,
            melodies=bench.melodies,
            steps=steps,
            melody_guidance_scale=melody_guidance_scale,
            prompts=prompts["own"],
            desc=desc,
        )
        return waveforms, (time.perf_counter() - start) / len(waveforms)

    _, codec_audio = codec_rows(bench, pipe.vae.eval(), pipe.vocoder.eval())
    results = {
        "real clips (ceiling; FAD: test vs validation clips)": measure(bench.real, fad_against=bench.validation),
        "real clips through the codec (ceiling)": measure(codec_audio),
        "floor: real clips vs another clip's family and melody": measure(bench.real, against=bench.other),
    }
    waveforms, seconds = timed_generation("floor: melody guidance 0", 25, melody_guidance_scale=0.0)
    results["floor: saved scheduler, 25 steps, melody guidance 0"] = measure(waveforms, seconds=seconds)
    for name in args.schedulers:
        scheduler_class, overrides = SCHEDULERS[name]
        pipe.scheduler = (
            saved_scheduler
            if scheduler_class is None
            else scheduler_class.from_config(saved_scheduler.config, **overrides)
        )
        for steps in args.steps:
            row = f"{name}, {steps} steps"
            waveforms, seconds = timed_generation(row, steps)
            results[row] = measure(waveforms, seconds=seconds)
            print(f"{row}: {results[row]}", flush=True)

    reference = results.get("saved, 25 steps", {}).get("seconds_per_clip")
    lines = [
        "| audio | Mel acc ↑ | family acc ↑ | FAD CLMP ↓ | s / clip | × saved 25 steps |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        timing = ("–", "–") if r["seconds_per_clip"] is None else (f"{r['seconds_per_clip']:.2f}", "–")
        if r["seconds_per_clip"] is not None and reference:
            timing = (timing[0], f"{r['seconds_per_clip'] / reference:.2f}")
        fad = "–" if r["fad_clmp"] is None else f"{r['fad_clmp']:.3f}"
        lines.append(f"| {name} | {r['mel_acc']:.3f} | {r['family_accuracy']:.2f} | {fad} | {' | '.join(timing)} |")
    lines.append(f"| chance (uniform over the families) | – | {1 / len(FAMILIES):.3f} | – | – | – |")
    print("\n".join(lines))
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump({"model": args.model, "clips": len(rows), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
