#!/usr/bin/env python
"""How the prompt's instrument and the melody take hold as a model trains: family accuracy, Mel acc and onset clicks
per checkpoint.

    python benchmarks/bench_text_adherence.py --run checkpoints/mg2-small --dataset data/mg2-folk --num_clips 32

For every `checkpoint-N` of a `train_mg2.py` output folder (train with `--checkpoints_total_limit` large enough to keep
them; the last is the saved pipeline), the checkpoint's EMA weights generate each test clip's melody (none for a
caption-only model) with a prompt naming the clip's instrument (`benchmarks/instrument_prompts.json`), same seeds as
`training/evaluate.py`. The instrument classifier of `evaluate.py` (fitted on real train-split clips) reads the
family; Mel acc compares chroma peaks with the real clip's; onset clicks are `evaluate.py`'s (the median over clips).
The real clips and the codec give the ceilings and real clips scored against another clip's family and melody the
floor, in the same run. `--guidance_scales 3 8 7:5` measures each checkpoint at several text (and melody) guidance
scales; `--checkpoints checkpoint-1600` only some checkpoints; `--steps 25` samples with 25 steps instead of the
pipeline's default; `--sketch_envelopes 10:10 40:50` renders the melody sketch that guides generation with each of
these attack and release times in milliseconds instead of the default's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))

from evaluate import Bench, chroma_peaks, codec_rows, generate, instrument_prompts, mel_accuracy, parse_args  # noqa: E402
from sound_measures import FAMILIES, SoundClassifier, family_of, onset_click_energy, timbre_features  # noqa: E402
from training_utils import ema_weights_path, load_ema_weights  # noqa: E402

from mg2_pipeline import MG2Pipeline, load_audio  # noqa: E402
from mg2_pipeline import melody as melody_module  # noqa: E402
from mg2_pipeline.data import load_mg2_dataset  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run", required=True, help="A train_mg2.py output folder (the saved pipeline and its checkpoints)."
    )
    parser.add_argument("--dataset", default="data/mg2-folk")
    parser.add_argument("--num_clips", type=int, default=32)
    parser.add_argument("--classifier_clips", type=int, default=1500)
    parser.add_argument(
        "--checkpoints", nargs="+", default=None, help="Only these checkpoint-N folders (default: all)."
    )
    parser.add_argument(
        "--guidance_scales",
        nargs="+",
        default=None,
        help="Guidance settings to measure each checkpoint at: TEXT or TEXT:MELODY scales (default: evaluate.py's).",
    )
    parser.add_argument("--steps", type=int, default=None, help="Sampling steps (default: the pipeline's).")
    parser.add_argument(
        "--sketch_envelopes",
        nargs="+",
        default=None,
        help="Attack and release of the guiding sketch's notes, ATTACK_MS:RELEASE_MS (default: the pipeline's).",
    )
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    settings = parse_args(["--model", args.run, "--output_dir", "-"])  # evaluate.py's defaults: seeds, batch
    settings.steps = args.steps
    # TEXT or TEXT:MELODY; a scale left out is the pipeline's default, filled in once it is loaded
    guidance = [
        tuple(float(scale) for scale in text.split(":")) if ":" in text else (float(text), None)
        for text in args.guidance_scales or []
    ] or [(None, None)]
    envelopes = [(melody_module.PLAIN_SKETCH_ATTACK_S * 1000, melody_module.PLAIN_SKETCH_RELEASE_S * 1000)]
    if args.sketch_envelopes:
        try:
            envelopes = [tuple(float(ms) for ms in text.split(":")) for text in args.sketch_envelopes]
        except ValueError:
            envelopes = []
        if not envelopes or not all(
            len(envelope) == 2 and all(0 < ms < 1000 for ms in envelope) for envelope in envelopes
        ):
            raise SystemExit(
                f"--sketch_envelopes takes ATTACK_MS:RELEASE_MS pairs of milliseconds in (0, 1000), "
                f"got {args.sketch_envelopes}."
            )

    pipe = MG2Pipeline.from_pretrained(args.run)
    pipe.set_progress_bar_config(disable=True)
    guidance = [pipe.guidance_scales(text, melody) for text, melody in guidance]
    if args.sketch_envelopes and pipe.config.aligned_melody != "sketch":
        raise SystemExit(
            f"--sketch_envelopes: {args.run} is not guided by a melody sketch (aligned_melody "
            f"{pipe.config.aligned_melody!r})."
        )
    rows = [row for row, _ in zip(load_mg2_dataset(args.dataset, "test"), range(args.num_clips))]
    validation = [
        load_audio(row["audio"]["bytes"]) for row, _ in zip(load_mg2_dataset(args.dataset, "validation"), range(2))
    ]
    bench = Bench(rows, settings.seconds, validation, pipe, settings.seed)
    classifier = SoundClassifier.fit_on_rows(load_mg2_dataset(args.dataset, "train"), args.classifier_clips)
    prompts = instrument_prompts(bench, settings.prompts)
    families = [family_of(program) for program in prompts["own_programs"]]

    def measure(waveforms, against: list[int] | None = None) -> dict:
        """Family accuracy and Mel acc against each clip's own family and melody, or against clip `against[i]`'s
        (the floor, which has no clicks figure); onset clicks at the clip's own note onsets."""
        clicks = [onset_click_energy(w, melody.onsets) for w, melody in zip(waveforms, bench.melodies)]
        clicks = clicks if against is None else [float("nan")]
        against = against or list(range(len(waveforms)))
        predicted = classifier.family_probabilities(np.stack([timbre_features(w) for w in waveforms])).argmax(1)
        return {
            "family_accuracy": float(np.mean([FAMILIES[p] == families[j] for p, j in zip(predicted, against)])),
            "mel_acc": float(
                np.mean([mel_accuracy(chroma_peaks(w), bench.real_peaks[j]) for w, j in zip(waveforms, against)])
            ),
            "onset_clicks": float(np.median(clicks)),
        }

    _, codec_audio = codec_rows(bench, pipe.vae.eval(), pipe.vocoder.eval())
    results = {
        "real clips (ceiling)": measure(bench.real),
        "real clips through the codec (ceiling)": measure(codec_audio),
        "floor: real clips vs another clip's family and melody": measure(bench.real, against=bench.other),
    }
    checkpoints = sorted(
        (d for d in os.listdir(args.run) if re.fullmatch(r"checkpoint-\d+", d)), key=lambda d: int(d.split("-")[1])
    )
    if args.checkpoints:
        missing = sorted(set(args.checkpoints) - set(checkpoints))
        if missing:
            raise SystemExit(f"--checkpoints: {args.run} has no {missing} (it has {checkpoints}).")
        checkpoints = [name for name in checkpoints if name in args.checkpoints]
    without_ema = [name for name in checkpoints if not os.path.isfile(ema_weights_path(os.path.join(args.run, name)))]
    if without_ema:
        raise SystemExit(f"{without_ema} hold no EMA weights (a LoRA run keeps none): measure its saved adapter.")
    if not checkpoints:
        raise SystemExit(
            f"{args.run} has no checkpoint-N folders: train with --checkpoints_total_limit large enough to keep them."
        )
    plain_envelope_s = melody_module.PLAIN_SKETCH_ATTACK_S, melody_module.PLAIN_SKETCH_RELEASE_S
    for name in checkpoints:
        load_ema_weights(pipe.unet, os.path.join(args.run, name))
        melodies = None if pipe.config.condition == "text" else bench.melodies
        for (text_scale, melody_scale), (attack_ms, release_ms) in itertools.product(guidance, envelopes):
            settings.guidance_scale, settings.melody_guidance_scale = text_scale, melody_scale
            # The pipeline renders the plain sketch with these module settings, read at each call.
            melody_module.PLAIN_SKETCH_ATTACK_S, melody_module.PLAIN_SKETCH_RELEASE_S = (
                attack_ms / 1000,
                release_ms / 1000,
            )
            row = name
            row += f", guidance {text_scale:g} / {melody_scale:g}" if len(guidance) > 1 else ""
            row += f", sketch attack / release {attack_ms:g} / {release_ms:g} ms" if args.sketch_envelopes else ""
            waveforms, _ = generate(pipe, bench, settings, melodies=melodies, prompts=prompts["own"], desc=row)
            results[row] = measure(waveforms)
            print(f"{row}: {results[row]}")
    melody_module.PLAIN_SKETCH_ATTACK_S, melody_module.PLAIN_SKETCH_RELEASE_S = plain_envelope_s
    lines = ["| audio | family acc ↑ | Mel acc ↑ | onset clicks ↓ |", "|---|---|---|---|"]
    lines += [
        f"| {name} | {r['family_accuracy']:.2f} | {r['mel_acc']:.3f} | "
        f"{'–' if np.isnan(r['onset_clicks']) else format(r['onset_clicks'], '.3f')} |"
        for name, r in results.items()
    ]
    lines.append(f"| chance (uniform over the families) | {1 / len(FAMILIES):.3f} | – | – |")
    print("\n".join(lines))
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump({"run": args.run, "clips": len(rows), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
