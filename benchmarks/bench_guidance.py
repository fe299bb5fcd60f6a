#!/usr/bin/env python
"""Guidance scales: MG2's melody, instrument, accompaniment and sound at several (text, melody) guidance pairs, in one
run on the same clips, to choose the defaults on clips the test table does not use.

    python benchmarks/bench_guidance.py --model checkpoints/mg2-small --split validation --pairs 3,3 4,4 3,5

For each pair, the first clips of the split are generated with their own melodies three times: with a prompt naming
the clip's instrument, with a prompt naming another family (same melody, seed and phrasing) and with the clip's
caption. Reported per pair: Mel acc against the real clip, family accuracy and paired preference (`evaluate.py`'s
instrument classifier, fitted on real train-split clips), FAD (CLMP) to the real clips, accompaniment when the caption
asks for it and when it does not, onset clicks, and seconds per clip as a ratio against the first pair. In the same
run: the ceilings (real clips; real clips through the codec) and the floors (melody guidance 0; chance).

`--checkpoints checkpoint-4800 checkpoint-6400`, when `--model` is a `train_mg2.py` output folder, measures those
checkpoints' EMA weights too, at every pair and on the same clips and seeds: how the figures grow with training steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

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
from sound_measures import (  # noqa: E402
    FAMILIES,
    FAMILY_OF_PROGRAM,
    SoundClassifier,
    family_of,
    onset_click_energy,
    paired_preference,
    timbre_features,
)
from training_utils import checkpoint_dirs, ema_weights_path, load_ema_weights  # noqa: E402

from mg2_pipeline import MG2Pipeline, load_audio  # noqa: E402
from mg2_pipeline.data import load_mg2_dataset  # noqa: E402


def guidance_pair(text: str) -> tuple[float, float]:
    try:
        text_scale, melody_scale = (float(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a guidance pair is TEXT,MELODY (e.g. 3,3), got {text!r}") from None
    return text_scale, melody_scale


def share(heard: np.ndarray | None, clips: np.ndarray) -> float | None:
    """The share of `clips` (a mask) heard as accompanied; None without audio or without such clips."""
    return None if heard is None or not clips.any() else float(heard[clips].mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A saved MG2 pipeline.")
    parser.add_argument("--dataset", default="data/mg2-folk")
    parser.add_argument("--split", default="validation", choices=["validation", "test"])
    parser.add_argument("--num_clips", type=int, default=32)
    parser.add_argument("--classifier_clips", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=None, help="Default: the pipeline's default_num_inference_steps.")
    parser.add_argument("--pairs", type=guidance_pair, nargs="+", default=[(3.0, 3.0), (4.0, 4.0), (3.0, 5.0)])
    parser.add_argument(
        "--checkpoints", nargs="+", default=[], help="checkpoint-N folders of --model to measure too (EMA weights)."
    )
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    if args.num_clips < 2:
        parser.error("--num_clips must be >= 2 (FAD needs a covariance)")
    if len(set(args.pairs)) < len(args.pairs):
        parser.error(f"--pairs has a pair twice: {args.pairs}")
    available = [os.path.basename(d) for d in checkpoint_dirs(args.model)]
    missing = sorted(set(args.checkpoints) - set(available))
    if missing:
        parser.error(f"--checkpoints: {args.model} has no {missing} (it has {available or 'no checkpoints'})")
    if len(set(args.checkpoints)) < len(args.checkpoints):
        parser.error(f"--checkpoints names a checkpoint twice: {args.checkpoints}")
    without_ema = [
        name for name in args.checkpoints if not os.path.isfile(ema_weights_path(os.path.join(args.model, name)))
    ]
    if without_ema:
        parser.error(f"--checkpoints: {without_ema} hold no EMA weights (a LoRA run keeps none)")
    settings = parse_args(["--model", args.model, "--output_dir", "-"])  # evaluate.py's seeds, length, batch

    pipe = MG2Pipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    steps = args.steps or pipe.default_num_inference_steps
    rows = [row for row, _ in zip(load_mg2_dataset(args.dataset, args.split), range(args.num_clips))]
    reference_split = "test" if args.split == "validation" else "validation"
    reference = [
        load_audio(row["audio"]["bytes"])
        for row, _ in zip(load_mg2_dataset(args.dataset, reference_split), range(args.num_clips))
    ]
    bench = Bench(rows, settings.seconds, reference, pipe, settings.seed)  # `bench.validation`: the reference clips
    if not all(program in FAMILY_OF_PROGRAM for program in bench.programs):
        parser.error(f"{args.dataset} does not name every clip's melody instrument: no family to measure")
    classifier = SoundClassifier.fit_on_rows(load_mg2_dataset(args.dataset, "train"), args.classifier_clips)
    prompts = instrument_prompts(bench, settings.prompts)
    own = [family_of(program) for program in prompts["own_programs"]]
    other = [family_of(program) for program in prompts["other_programs"]]

    def probabilities(waveforms):
        return classifier.family_probabilities(np.stack([timbre_features(w) for w in waveforms]))

    def measure(waveforms, other_family=None, captioned=None, fad_against=None, seconds=None) -> dict:
        """Mel acc, family accuracy, FAD (CLMP) and clicks of `waveforms` (each clip's own instrument asked for);
        paired preference against `other_family` (the same melodies asked for another family); accompaniment of
        `captioned` (the same melodies with the clips' captions)."""
        own_probabilities = probabilities(waveforms)
        accompanied = (
            None if captioned is None else classifier.accompanied(np.stack([timbre_features(w) for w in captioned]))
        )
        return {
            "mel_acc": float(np.mean([mel_accuracy(chroma_peaks(w), p) for w, p in zip(waveforms, bench.real_peaks)])),
            "family_accuracy": float(np.mean([FAMILIES[i] == f for i, f in zip(own_probabilities.argmax(1), own)])),
            "paired_preference": None
            if other_family is None
            else paired_preference(own_probabilities, probabilities(other_family), own, other),
            "fad_clmp": frechet_distance(bench.real_clmp, clmp_audio_embeddings(pipe, fad_against or waveforms)),
            "accompanied_when_asked": share(accompanied, bench.accompanied),
            "accompanied_when_solo": share(accompanied, ~bench.accompanied),
            "onset_clicks": float(
                np.median([onset_click_energy(w, m.onsets) for w, m in zip(waveforms, bench.melodies)])
            ),
            "seconds_per_clip": seconds,
        }

    def generated(prompt_set, text_scale, melody_scale, desc):
        scales = argparse.Namespace(**{**vars(settings), "guidance_scale": text_scale})
        waveforms, _ = generate(
            pipe,
            bench,
            scales,
            melodies=bench.melodies,
            steps=steps,
            melody_guidance_scale=melody_scale,
            prompts=prompt_set,
            desc=desc,
        )
        return waveforms

    _, codec_audio = codec_rows(bench, pipe.vae.eval(), pipe.vocoder.eval())
    results = {
        f"real clips (ceiling; FAD: {args.split} vs {reference_split} clips)": measure(
            bench.real, captioned=bench.real, fad_against=bench.validation
        ),
        "real clips through the codec (ceiling)": measure(codec_audio, captioned=codec_audio),
    }
    floor_text = args.pairs[0][0]
    results[f"floor: guidance {floor_text:g} / melody 0"] = measure(
        generated(prompts["own"], floor_text, 0.0, "floor: melody guidance 0")
    )
    for checkpoint in [None, *args.checkpoints]:  # the saved model, then each checkpoint's EMA weights
        if checkpoint is not None:
            load_ema_weights(pipe.unet, os.path.join(args.model, checkpoint))
        for text_scale, melody_scale in args.pairs:
            name = f"guidance {text_scale:g} / melody {melody_scale:g}"
            name = name if checkpoint is None else f"{checkpoint}, {name}"
            start = time.perf_counter()
            waveforms = generated(prompts["own"], text_scale, melody_scale, name)
            seconds = (time.perf_counter() - start) / len(waveforms)
            results[name] = measure(
                waveforms,
                other_family=generated(prompts["other"], text_scale, melody_scale, f"{name}, another family"),
                captioned=generated(bench.captions, text_scale, melody_scale, f"{name}, captions"),
                seconds=seconds,
            )
            print(f"{name}: {results[name]}", flush=True)

    first = results[f"guidance {args.pairs[0][0]:g} / melody {args.pairs[0][1]:g}"]["seconds_per_clip"]
    columns = ["Mel acc ↑", "family acc ↑", "paired ↑", "FAD CLMP ↓", "acc. asked ↑", "acc. solo ↓", "clicks ↓"]
    lines = [
        f"{args.split} split, first {len(rows)} clips, {steps} steps",
        "",
        f"| audio | {' | '.join(columns)} | s / clip | × first pair |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    keys = [
        "mel_acc",
        "family_accuracy",
        "paired_preference",
        "fad_clmp",
        "accompanied_when_asked",
        "accompanied_when_solo",
        "onset_clicks",
    ]
    for name, result in results.items():
        cells = ["–" if result[key] is None else f"{result[key]:.3f}" for key in keys]
        seconds = result["seconds_per_clip"]
        timing = ["–", "–"] if seconds is None else [f"{seconds:.2f}", f"{seconds / first:.2f}"]
        lines.append(f"| {name} | {' | '.join(cells + timing)} |")
    chance = max(np.mean([family == f for family in own]) for f in FAMILIES)
    lines.append(
        f"| chance (the most common family; pairs at random) | – | {chance:.3f} | 0.500 | – | – | – | – | – | – |"
    )
    print("\n".join(lines))
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(
                {"model": args.model, "split": args.split, "clips": len(rows), "results": results}, handle, indent=2
            )


if __name__ == "__main__":
    main()
