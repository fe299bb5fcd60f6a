"""`mg2` command line: generate music from a prompt; push a checkpoint to the Hub and pull one from it.

    mg2 generate "a lively Irish jig on fiddle" --output jig.wav [--melody tune.mid | --melody "G4:0.5 A4:0.5"]
                 [--seed 0] [--steps 25] [--duration 10.24] [--guidance 3.0] [--melody-guidance 3.0]
                 [--model checkpoints/mg2-small]
    mg2 push checkpoints/mg2-small org/mg2-small [--private] [--revision BRANCH]
    mg2 pull org/mg2-small [--revision REV]
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_MODEL = "checkpoints/mg2-small"
DEFAULT_MELODY_GUIDANCE_SCALE = 3.0  # MG2Pipeline's; not imported from it so that `mg2 --help` stays fast


def generate(args) -> None:
    import torch

    from .audio import save_audio
    from .presets import load_pipeline

    if not args.output.lower().endswith((".wav", ".flac")):
        raise SystemExit("--output must end in .wav or .flac")
    if args.model == DEFAULT_MODEL and not os.path.isdir(DEFAULT_MODEL):
        raise SystemExit(f"No model at {DEFAULT_MODEL}: run `make demo` first, or pass --model DIR|REPO_ID|preset:tiny.")
    pipe = load_pipeline(args.model)
    try:
        output = pipe(args.prompt, negative_prompt=args.negative_prompt, melody=args.melody, audio_length_in_s=args.duration,
                      num_inference_steps=args.steps, guidance_scale=args.guidance,
                      melody_guidance_scale=args.melody_guidance,
                      generator=torch.Generator().manual_seed(args.seed))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_audio(args.output, output.audios[0], output.sampling_rate)
    guide = output.melodies[0]
    if guide.id is None:
        print(f"Melody: yours ({guide.melody})")
    else:
        print(f"Melody: retrieved #{guide.id} {guide.metadata.get('title', '')!r} "
              f"from {guide.metadata.get('source', '?')} (similarity {guide.score:.3f}): {guide.melody}")
    print(f"Wrote {args.output} ({len(output.audios[0]) / output.sampling_rate:.2f} s at {output.sampling_rate} Hz)")


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
    gen.add_argument("--melody", default=None, help="A MIDI/MusicXML/ABC/audio file or notes like 'G4:0.5 A4:0.5' (default: retrieve).")
    gen.add_argument("--negative_prompt", default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=25)
    gen.add_argument("--duration", type=float, default=None, help="Seconds (default: the model's training length).")
    gen.add_argument("--guidance", type=float, default=3.0, help="Text guidance scale.")
    gen.add_argument("--melody-guidance", dest="melody_guidance", type=float, default=DEFAULT_MELODY_GUIDANCE_SCALE,
                     help="Melody guidance scale: 0 ignores the melody, larger follows it more tightly.")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="A pipeline folder, a Hub repo id, or preset:tiny|small.")
    gen.set_defaults(run=generate)
    push_parser = commands.add_parser("push", help="Upload a saved pipeline or model folder to a Hub model repo.")
    push_parser.add_argument("folder")
    push_parser.add_argument("repo_id", help="'org/name' (created when missing).")
    push_parser.add_argument("--private", action="store_true", help="Create the repo private.")
    push_parser.add_argument("--revision", default=None, help="A branch to push to (created when missing; default main).")
    push_parser.set_defaults(run=push)
    pull_parser = commands.add_parser("pull", help="Download a Hub repo into the HF cache; prints its local folder.")
    pull_parser.add_argument("repo_id")
    pull_parser.add_argument("--revision", default=None, help="A branch, tag or commit (default main).")
    pull_parser.set_defaults(run=pull)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
