#!/usr/bin/env python
"""Generate a handful of demo clips with a trained pipeline: `samples/NN-name.wav` with a spectrogram PNG beside each.

    python training/generate_samples.py --model checkpoints/mg2-small --output_dir samples

The prompts vary instrument, tempo and tune type; the last ones are guided by a user melody instead
of retrieval: typed notes, and a MIDI file (`samples/ode-to-joy.mid`, written first). Each PNG shows the
log-mel spectrogram of the clip above the piano roll of the melody that guided it. Then one melody and seed with
prompts that differ only in the instrument: `samples/same-tune-*.wav`, and their spectrograms one above the other in
`samples/same-tune.png`.
"""

from __future__ import annotations

import argparse
import os

import torch

from mg2_pipeline import Melody, save_audio
from mg2_pipeline.defaults import (
    DEFAULT_MODEL,
)
from mg2_pipeline.plotting import figure_to_png, plot_spectrogram, plot_spectrograms
from mg2_pipeline.presets import load_pipeline

DEMO_PROMPTS = [
    ("jig-fiddle", "A lively Irish jig played on fiddle at 120 BPM in D major, in 6/8 time", None),
    ("waltz-accordion", "A gentle waltz on accordion with bass and chords at 90 BPM, in 3/4 time", None),
    ("reel-flute", "A fast reel on flute at 140 BPM in G major", None),
    ("chorale-organ", "A slow chorale on church organ at 70 BPM, solemn and calm", None),
    ("march-trumpet", "A bright march on trumpet at 110 BPM in 2/4 time", None),
    (
        "user-melody-piano",
        "A simple folk song on piano at 100 BPM",
        "D4:0.3 G4:0.3 G4:0.3 A4:0.3 B4:0.6 A4:0.3 G4:0.3 E4:0.6 D4:0.6 G4:0.3 B4:0.3 D5:0.9 B4:0.3 A4:0.9",
    ),
    ("midi-melody-clarinet", "A calm melody on clarinet at 100 BPM", "ode-to-joy.mid"),
]
# One melody and seed, prompts that differ only in the instrument they name.
SAME_TUNE_PROMPT = "A slow tune on solo {instrument}"
SAME_TUNE_INSTRUMENTS = ("piano", "trumpet")
SAME_TUNE_MELODY = (
    "G4:0.6 A4:0.3 B4:0.6 D5:0.3 E5:0.9 D5:0.6 B4:0.3 A4:0.6 G4:0.3 E4:0.9 D4:0.6 G4:0.3 A4:0.6 B4:0.3 G4:1.2"
)
ODE_TO_JOY = "E5:0.4 E5:0.4 F5:0.4 G5:0.4 G5:0.4 F5:0.4 E5:0.4 D5:0.4 C5:0.4 C5:0.4 D5:0.4 E5:0.4 E5:0.6 D5:0.2 D5:0.8"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--output_dir", default="samples")
    parser.add_argument("--seconds", type=float, default=10.24)
    parser.add_argument("--steps", type=int, default=None, help="Default: the pipeline's default_num_inference_steps.")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's.")
    parser.add_argument("--melody_guidance_scale", type=float, default=None, help="Default: the pipeline's.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pipe = load_pipeline(args.model)
    os.makedirs(args.output_dir, exist_ok=True)
    Melody.from_string(ODE_TO_JOY).to_midi(os.path.join(args.output_dir, "ode-to-joy.mid"))
    for index, (name, prompt, melody) in enumerate(DEMO_PROMPTS):
        if melody is not None and melody.endswith(".mid"):
            melody = os.path.join(args.output_dir, melody)
        output = pipe(
            prompt,
            melody=melody,
            audio_length_in_s=args.seconds,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            melody_guidance_scale=args.melody_guidance_scale,
            generator=torch.Generator().manual_seed(args.seed),
        )
        stem = os.path.join(args.output_dir, f"{index:02d}-{name}")
        save_audio(f"{stem}.wav", output.audios[0], output.sampling_rate)
        guide = output.melodies[0]
        source = (
            "your melody"
            if guide is None or guide.id is None
            else f"retrieved: {guide.metadata.get('title', '?')} ({guide.score:.2f})"
        )
        figure = plot_spectrogram(
            output.audios[0], output.sampling_rate, guide.as_played() if guide else None, f"{prompt} — {source}"
        )
        figure_to_png(figure, f"{stem}.png")
        print(f"{stem}.wav  {stem}.png  ← {prompt!r}, melody {source}")
    prompts = [SAME_TUNE_PROMPT.format(instrument=instrument) for instrument in SAME_TUNE_INSTRUMENTS]
    output = pipe(
        prompts,
        melody=SAME_TUNE_MELODY,
        audio_length_in_s=args.seconds,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        melody_guidance_scale=args.melody_guidance_scale,
        generator=[torch.Generator().manual_seed(args.seed) for _ in prompts],
    )
    for instrument, waveform in zip(SAME_TUNE_INSTRUMENTS, output.audios):
        save_audio(os.path.join(args.output_dir, f"same-tune-{instrument}.wav"), waveform, output.sampling_rate)
    guide = output.melodies[0]
    figure = plot_spectrograms(output.audios, output.sampling_rate, prompts, guide.as_played() if guide else None)
    figure_to_png(figure, os.path.join(args.output_dir, "same-tune.png"))
    print(f"{os.path.join(args.output_dir, 'same-tune.png')} ← the same melody and seed, {' / '.join(prompts)}")
    print(f"Samples are in {os.path.abspath(args.output_dir)}")


if __name__ == "__main__":
    main()
