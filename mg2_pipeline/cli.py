"""`mg2` command line: generate music from a prompt; push a checkpoint to the Hub and pull one from it.

mg2 generate "a lively Irish jig on fiddle" --output jig.wav [--melody tune.mid | --melody "G4:0.5 A4:0.5"]
             [--audio in.wav [--strength 0.6 | --repaint 4.0:6.5]] [--seed 0] [--steps N] [--duration 10.24]
             [--guidance 3.0] [--melody-guidance 3.0] [--no-prompt-facts] [--model checkpoints/mg2-small]
mg2 push checkpoints/mg2-small org/mg2-small [--private] [--revision BRANCH]
mg2 pull org/mg2-small [--revision REV]
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from .defaults import (
    DEFAULT_DISTILLED_NUM_INFERENCE_STEPS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_MELODY_GUIDANCE_SCALE,
    DEFAULT_MODEL,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_STRENGTH,
    DEFAULT_X0_NUM_INFERENCE_STEPS,
    MAX_SEED,
)

# MG2Pipeline's argument names in its error messages → the flags that set them.
FLAGS = {
    "audio_length_in_s": "--duration",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "melody_guidance_scale": "--melody-guidance",
    "negative_prompt": "--negative_prompt",
    "melody": "--melody",
    "audio": "--audio",
    "strength": "--strength",
    "repaint_start_s": "--repaint start",
    "repaint_end_s": "--repaint end",
}
FLAG_PATTERN = re.compile(r"\b(" + "|".join(FLAGS) + r")\b")


def check_output(path: str) -> None:
    """Refuse an --output the WAV/FLAC could not be written to, before any generation."""
    if os.path.splitext(path)[1].lower() not in (".wav", ".flac"):  # as soundfile reads it: ".wav" alone has none
        raise SystemExit(f"error: --output must end in .wav or .flac, got {path!r}.")
    if os.path.isdir(path):
        raise SystemExit(f"error: --output {path!r} is a directory; name a .wav or .flac file.")
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SystemExit(f"error: --output {path!r} cannot be created: {existing!r} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"error: --output {path!r} cannot be written: {existing!r} is not writable.")


def parse_repaint(text: str | None) -> tuple[float | None, float | None]:
    """`--repaint START:END` in seconds → (START, END)."""
    if text is None:
        return None, None
    try:
        start, end = (float(part) for part in text.split(":"))
    except ValueError:
        raise SystemExit(f"error: --repaint must be START:END in seconds, like 4.0:6.5; got {text!r}.") from None
    return start, end


def check_continuation(pipe, audio: str, duration: float) -> None:
    """`--audio` with `--duration` continues the recording: a duration that would not (one that rounds to its mel
    frames or fewer) is refused, naming `--duration`."""
    import soundfile

    try:
        audio_s = soundfile.info(audio).duration
    except (OSError, RuntimeError) as error:
        raise SystemExit(f"error: could not read --audio {audio!r}: {error}") from None
    if pipe.mel_frames(duration) <= pipe.mel_frames(audio_s):
        raise SystemExit(
            f"error: --duration must be longer than --audio ({audio_s:.2f} s) to continue it, got {duration:g}; "
            "to re-render the recording pass --strength, to regenerate a span --repaint START:END."
        )


def generate(args) -> None:
    import torch

    from .audio import save_audio
    from .pipeline_mg2_audio_to_audio import MG2AudioToAudioPipeline
    from .pipeline_mg2_inpaint import MG2InpaintPipeline
    from .presets import load_pipeline
    from .threads import fit_threads

    check_output(args.output)
    repaint_start_s, repaint_end_s = parse_repaint(args.repaint)
    if args.audio is None and (args.strength is not None or args.repaint is not None):
        raise SystemExit("error: --strength and --repaint apply to a recording: pass --audio too.")
    if args.audio is not None and args.duration is not None and (args.strength is not None or args.repaint):
        raise SystemExit(
            "error: with --audio, --duration continues the recording, --strength re-renders it and --repaint "
            "regenerates a span of it: choose one."
        )
    if not 0 <= args.seed <= MAX_SEED:
        raise SystemExit(f"error: --seed must be an integer between 0 and {MAX_SEED}, got {args.seed}.")
    if args.model == DEFAULT_MODEL and not os.path.isdir(DEFAULT_MODEL):
        raise SystemExit(
            f"No model at {DEFAULT_MODEL}: run `make demo` first, or pass --model DIR|REPO_ID|preset:tiny."
        )
    try:
        pipe = load_pipeline(args.model)
    except (OSError, ValueError) as error:  # huggingface_hub's errors derive from these
        raise SystemExit(f"error: could not load --model {args.model!r}: {error}") from None
    fit_threads()
    common = {
        "negative_prompt": args.negative_prompt,
        "melody": args.melody,
        "guidance_scale": args.guidance,
        "melody_guidance_scale": args.melody_guidance,
        "generator": torch.Generator().manual_seed(args.seed),
    }
    if args.steps is not None:  # else each task's own default
        common["num_inference_steps"] = args.steps
    try:
        if args.audio is None:
            output = pipe(
                args.prompt, audio_length_in_s=args.duration, match_prompt_facts=not args.no_prompt_facts, **common
            )
        elif args.repaint is not None:
            output = MG2InpaintPipeline.from_pipe(pipe)(
                args.prompt, audio=args.audio, repaint_start_s=repaint_start_s, repaint_end_s=repaint_end_s,
                strength=1.0 if args.strength is None else args.strength, **common,
            )  # fmt: skip
        elif args.duration is not None:
            check_continuation(pipe, args.audio, args.duration)
            output = MG2InpaintPipeline.from_pipe(pipe)(
                args.prompt, audio=args.audio, repaint_end_s=args.duration,
                match_prompt_facts=not args.no_prompt_facts, **common,
            )  # fmt: skip
        else:
            strength = DEFAULT_STRENGTH if args.strength is None else args.strength
            output = MG2AudioToAudioPipeline.from_pipe(pipe)(
                args.prompt, audio=args.audio, strength=strength, **common
            )
    except (ValueError, TypeError) as error:
        raise SystemExit("error: " + FLAG_PATTERN.sub(lambda match: FLAGS[match[1]], str(error))) from None
    waveform = output.audios[0]
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        save_audio(args.output, waveform, output.sampling_rate)
    except (OSError, RuntimeError) as error:  # soundfile's errors are RuntimeErrors
        raise SystemExit(f"error: could not write --output {args.output!r}: {error}") from None
    guide = output.melodies[0]
    if guide is None:
        print("Melody: none (a text-only model)")
    elif guide.id is None:
        print(
            f"Melody: {'yours' if guide.metadata['source'] == 'user' else 'transcribed from --audio'} ({guide.melody})"
        )
    else:
        facts = ", ".join(
            f"{name.replace('_', ' ')} {guide.metadata[name]}"
            for name in ("tune_type", "meter", "key")
            if guide.metadata.get(name)
        )
        matched = ", ".join(guide.metadata.get("matched_facts", {}).values()) or "nothing it names"
        print(
            f"Melody: retrieved #{guide.id} {guide.metadata.get('title', '')!r} from {guide.metadata.get('source', '?')} "
            f"({facts}; similarity {guide.score:.3f}; matches the prompt's {matched}): {guide.melody}"
        )
    if guide is not None:
        start, end = guide.metadata["audio_span_s"]
        repeats = guide.metadata["repeats"]
        print(
            f"It plays from {start:.2f} s to {end:.2f} s{f' ({repeats} times through)' if repeats > 1 else ''}, "
            f"in {len(guide.metadata['windows'])} window(s) of {pipe.default_audio_length_in_s:.2f} s."
        )
    print(f"Wrote {args.output} ({len(waveform) / output.sampling_rate:.2f} s at {output.sampling_rate} Hz)")


def push(args) -> None:
    from .hub import push_folder

    try:
        commit = push_folder(args.folder, args.repo_id, private=args.private or None, revision=args.revision)
    except (ValueError, PermissionError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"Pushed {args.folder} to {args.repo_id}: revision {commit.oid}")
    print(commit.commit_url)


def pull(args) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        print(snapshot_download(args.repo_id, revision=args.revision))
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise SystemExit(f"error: could not pull {args.repo_id}: {error}") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mg2", description="MG2: melody-guided text-to-music generation.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="Generate music for a text prompt.")
    gen.add_argument("prompt")
    gen.add_argument("--output", required=True, help="A .wav or .flac file to write.")
    gen.add_argument(
        "--melody",
        default=None,
        help="A MIDI/MusicXML/ABC/audio file or notes like 'G4:0.5 A4:0.5' (default: retrieve).",
    )
    gen.add_argument(
        "--audio",
        default=None,
        help="A recording to continue (with a longer --duration), re-render "
        "(--strength) or repaint (--repaint START:END); without --melody, its transcribed melody guides it.",
    )
    gen.add_argument(
        "--strength",
        type=float,
        default=None,
        help=f"With --audio: how much of it is re-generated, in (0, 1] (default {DEFAULT_STRENGTH}; 1 for a --repaint span).",
    )
    gen.add_argument(
        "--repaint", default=None, metavar="START:END", help="With --audio: regenerate this span (seconds)."
    )
    gen.add_argument("--negative_prompt", default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"Denoising steps (default {DEFAULT_X0_NUM_INFERENCE_STEPS} for text to music with an x0-predicting model "
        f"such as make demo's, {DEFAULT_DISTILLED_NUM_INFERENCE_STEPS} if it is guidance-distilled, else "
        f"{DEFAULT_NUM_INFERENCE_STEPS}).",
    )
    gen.add_argument(
        "--duration",
        type=float,
        default=None,
        help="Seconds, up to 600 (default: --audio's length, else the melody's, else the model's window).",
    )
    gen.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"Text guidance scale (default: the model's, {DEFAULT_GUIDANCE_SCALE:g} or 1 for a guidance-distilled one).",
    )
    gen.add_argument(
        "--melody-guidance",
        dest="melody_guidance",
        type=float,
        default=None,
        help="Melody guidance scale: 0 ignores the melody, larger follows it more tightly (default: the model's, "
        f"{DEFAULT_MELODY_GUIDANCE_SCALE:g} or 1 for a guidance-distilled one).",
    )
    gen.add_argument(
        "--no-prompt-facts",
        dest="no_prompt_facts",
        action="store_true",
        help="Retrieve the nearest melody only, ignoring the tune type, origin, meter and key the prompt names.",
    )
    gen.add_argument("--model", default=DEFAULT_MODEL, help="A pipeline folder, a Hub repo id, or preset:tiny|small.")
    gen.set_defaults(run=generate)
    push_parser = commands.add_parser("push", help="Upload a saved pipeline or model folder to a Hub model repo.")
    push_parser.add_argument("folder")
    push_parser.add_argument("repo_id", help="'org/name' (created when missing).")
    push_parser.add_argument("--private", action="store_true", help="Create the repo private.")
    push_parser.add_argument(
        "--revision", default=None, help="A branch to push to (created when missing; default main)."
    )
    push_parser.set_defaults(run=push)
    pull_parser = commands.add_parser("pull", help="Download a Hub repo into the HF cache; prints its local folder.")
    pull_parser.add_argument("repo_id")
    pull_parser.add_argument("--revision", default=None, help="A branch, tag or commit (default main).")
    pull_parser.set_defaults(run=pull)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
