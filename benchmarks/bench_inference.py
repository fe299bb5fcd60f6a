#!/usr/bin/env python
"""Inference cost of MG2Pipeline per stage, against a bare diffusers denoising loop with the same UNet and scheduler.

    python benchmarks/bench_inference.py                         # the `small` preset, random weights
    python benchmarks/bench_inference.py --model checkpoints/mg2-small

For 10.24 s of audio (`--steps` DPM-Solver steps, by default the pipeline's, at its default guidance: two UNet
passes per step at text and melody guidance 3, three when the scales differ, one for a guidance-distilled model at
1): wall time of CLMP text encoding (`encode_condition`: the prompt's and the negative prompt's embeddings and token
states), retrieval, the denoising loop, VAE decoding and the vocoder; the real-time factor; the same log-mel through
Griffin-Lim as shipped until 2026-12-04 (`previous_vocoder.PreviousGriffinLim`), and the whole pipeline at
`--reference_steps` with that vocoder, as a ratio; MG2's prompt → latents time over a bare loop (precomputed condition
and melody frames, same latents, same scheduler) — the overhead the pipeline adds; and the UNet's achieved FLOP/s
against this machine's fp32 matmul peak, measured in the same run.
Medians over --repeats runs, the two contenders interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from previous_vocoder import PreviousGriffinLim
from torch.utils.flop_counter import FlopCounterMode

from mg2_pipeline.conditioning import DROPPED_TEXT, melody_frames_condition, pooled_condition
from mg2_pipeline.defaults import DEFAULT_GUIDANCE_SCALE, DEFAULT_MELODY_GUIDANCE_SCALE
from mg2_pipeline.presets import load_pipeline


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


class StageTimer:
    """Wraps callables of the pipeline to add up their wall time per stage."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            return result

        return timed


def unet_input(pipe, latents: torch.Tensor, t, frames: torch.Tensor | None, passes: int) -> torch.Tensor:
    model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * passes), t)
    return model_input if frames is None else torch.cat([model_input, frames], dim=1)


@torch.no_grad()
def bare_loop(
    pipe,
    condition: torch.Tensor,
    frames: torch.Tensor | None,
    text: tuple,
    latents: torch.Tensor,
    steps: int,
    terms: tuple[bool, bool, bool],
    guidance_scale: float,
    melody_guidance_scale: float,
) -> torch.Tensor:
    """The textbook diffusers loop with MG2's text and melody guidance terms: what any pipeline must at least do.
    `terms` are the pipeline's `guidance_terms` (equal scales are plain classifier-free guidance, two passes; unequal
    ones add the melody-free prediction; scales of 1 need one pass). `text`: the token states the UNet attends to and
    their mask ((None, None) without `text_attention`)."""
    _, melody_term, text_term = terms
    pipe.scheduler.set_timesteps(steps)
    latents = latents * pipe.scheduler.init_noise_sigma
    for t in pipe.scheduler.timesteps:
        prediction = pipe.unet(
            unet_input(pipe, latents, t, frames, len(condition)),
            t,
            encoder_hidden_states=text[0],
            encoder_attention_mask=text[1],
            class_labels=condition,
        ).sample
        predictions = list(prediction.chunk(len(condition)))
        guided = no_melody = predictions.pop(0)
        if melody_term:
            no_melody = predictions.pop(0)
            guided = no_melody + melody_guidance_scale * (guided - no_melody)
        if text_term:
            guided = guided + (guidance_scale - 1) * (no_melody - predictions.pop(0))
        latents = pipe.scheduler.step(guided, t, latents).prev_sample
    return latents


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="preset:small")
    parser.add_argument("--seconds", type=float, default=10.24)
    parser.add_argument("--steps", type=int, default=None, help="Default: the pipeline's default_num_inference_steps.")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the pipeline's.")
    parser.add_argument("--melody_guidance_scale", type=float, default=None, help="Default: the pipeline's.")
    parser.add_argument(
        "--reference_steps",
        type=int,
        default=25,
        help="The setting this one is timed against, in the same run: that many steps and the previous Griffin-Lim.",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results/inference.json")
    args = parser.parse_args(argv)

    pipe = load_pipeline(args.model, device="cpu")  # the benchmark builds its tensors on the CPU
    pipe.set_progress_bar_config(disable=True)
    if args.steps is None:
        args.steps = pipe.default_num_inference_steps
    args.guidance_scale, args.melody_guidance_scale = pipe.guidance_scales(
        args.guidance_scale, args.melody_guidance_scale
    )
    prompt = "a lively Irish jig on fiddle, 120 BPM"
    timer = StageTimer()
    pipe.encode_condition = timer.wrap("CLMP text encoding", pipe.encode_condition)
    pipe.retriever.search = timer.wrap("retrieval", pipe.retriever.search)
    pipe.decode_latents = timer.wrap("VAE decode", pipe.decode_latents)
    vocoder_forward = pipe.vocoder.forward
    pipe.vocoder.forward = timer.wrap("vocoder", vocoder_forward)

    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pipe(prompt, num_inference_steps=2, audio_length_in_s=args.seconds, generator=generator())  # warm-up
    full, to_latents, bare, stages, reference = [], [], [], [], []
    for _ in range(args.repeats):
        timer.seconds = {}
        start = time.perf_counter()
        pipe(
            prompt,
            num_inference_steps=args.reference_steps,
            guidance_scale=DEFAULT_GUIDANCE_SCALE,  # a guided model's defaults, also for a distilled one
            melody_guidance_scale=DEFAULT_MELODY_GUIDANCE_SCALE,
            audio_length_in_s=args.seconds,
            generator=generator(),
        )
        reference.append(time.perf_counter() - start - timer.seconds["vocoder"])  # its vocoder is added below

        timer.seconds = {}
        start = time.perf_counter()
        audio = pipe(
            prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            melody_guidance_scale=args.melody_guidance_scale,
            audio_length_in_s=args.seconds,
            generator=generator(),
        ).audios
        full.append(time.perf_counter() - start)
        stages.append(dict(timer.seconds))

        start = time.perf_counter()
        latents = pipe(
            prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            melody_guidance_scale=args.melody_guidance_scale,
            audio_length_in_s=args.seconds,
            generator=generator(),
            output_type="latent",
        ).audios
        to_latents.append(time.perf_counter() - start)

        # the bare loop gets the condition, the melody frames and the initial noise for free
        text, empty = pipe.encode_text([prompt, DROPPED_TEXT], pipe.device).chunk(2)
        hits = pipe.retriever.search_matching(text, [prompt], k=1)  # the melody the pipeline retrieves
        melody = torch.from_numpy(hits.embeddings[:, 0])
        terms = pipe.guidance_terms  # the pipeline's, for the scales of the call it just made
        conditions = [pooled_condition(text, melody, empty)]
        if terms[1]:
            conditions.append(pooled_condition(text, None, empty, drop_melody=True))
        if terms[2]:
            conditions.append(pooled_condition(text, None, empty, drop_text=True, drop_melody=True))
        condition = torch.cat(conditions)
        text_states = pipe.prepare_text_states(
            pipe.encode_condition(prompt, None, None, None, 1, pipe.device), terms[1], terms[2]
        )
        frames = None
        if pipe.config.aligned_melody is not None:
            guide = pipe.follow_prompt_tempo(hits.melodies[0][0], prompt).melody
            frames = pipe.prepare_melody_frames(
                [guide.fit_to(latents.shape[2] * pipe.vae_scale_factor * pipe.hop_length / pipe.sampling_rate)],
                latents.shape[2],
                pipe.device,
                pipe.unet.dtype,
            )
            frames = torch.cat([frames] + [melody_frames_condition(frames, True)] * (len(condition) - 1))
        noise = torch.randn(latents.shape, generator=generator())
        start = time.perf_counter()
        bare_latents = bare_loop(
            pipe,
            condition,
            frames,
            text_states,
            noise,
            args.steps,
            terms,
            args.guidance_scale,
            args.melody_guidance_scale,
        )
        bare.append(time.perf_counter() - start)
    # same computation up to float rounding
    assert (bare_latents - latents).abs().max() <= 1e-4 * latents.abs().max(), (
        "the bare loop must compute what the pipeline computes"
    )

    peer_vocoder = PreviousGriffinLim()
    log_mel = pipe.decode_latents(latents)
    peer_vocoder_s = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        peer_vocoder(log_mel)
        peer_vocoder_s.append(time.perf_counter() - start)
    peer_vocoder_s = statistics.median(peer_vocoder_s)
    reference_s = statistics.median(reference) + peer_vocoder_s

    with FlopCounterMode(display=False) as counter:
        t = pipe.scheduler.timesteps[0]
        pipe.unet(
            unet_input(pipe, latents, t, frames, len(condition)),
            t,
            encoder_hidden_states=text_states[0],
            encoder_attention_mask=text_states[1],
            class_labels=condition,
        )
    unet_flops = counter.get_total_flops() * args.steps
    peak = matmul_peak_flops()

    stage_medians = {name: statistics.median(s[name] for s in stages) for name in stages[0]}
    full_s, latents_s, bare_s = statistics.median(full), statistics.median(to_latents), statistics.median(bare)
    denoise_s = latents_s - stage_medians["CLMP text encoding"] - stage_medians["retrieval"]
    results = {
        "model": args.model,
        "audio_seconds": args.seconds,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "unet_parameters_M": sum(p.numel() for p in pipe.unet.parameters()) / 1e6,
        "latent_shape": list(latents.shape),
        "samples": int(audio.shape[-1]),
        "stages_s": {**stage_medians, "denoising loop (incl. scheduler)": denoise_s},
        "total_s": full_s,
        "real_time_factor": full_s / args.seconds,
        "previous_griffin_lim_s": peer_vocoder_s,
        "reference_steps": args.reference_steps,
        "reference_s": reference_s,
        "time_over_reference": full_s / reference_s,
        "prompt_to_latents_s": latents_s,
        "bare_loop_s": bare_s,
        "overhead_vs_bare_loop": latents_s / bare_s - 1,
        "unet_gflops_per_run": unet_flops / 1e9,
        "achieved_gflop_per_s": unet_flops / bare_s / 1e9,
        "fp32_matmul_peak_gflop_per_s": peak / 1e9,
        "fraction_of_peak": unet_flops / bare_s / peak,
    }
    print(
        f"{args.model}: {args.seconds} s of audio, {args.steps} steps, {results['threads']} threads, "
        f"UNet {results['unet_parameters_M']:.1f} M on latents {results['latent_shape']}"
    )
    print("| stage | seconds |\n|---|---|")
    for name, seconds in results["stages_s"].items():
        print(f"| {name} | {seconds:.3f} |")
    print(f"| **total** | **{full_s:.3f}** (real-time factor {results['real_time_factor']:.3f}) |")
    print(
        "the same log-mel through the previous Griffin-Lim (32 iterations from bin phases, float64): "
        f"{peer_vocoder_s:.3f} s ({peer_vocoder_s / stage_medians['vocoder']:.2f} × the vocoder's time); "
        f"{args.reference_steps} steps with it: {reference_s:.3f} s (real-time factor {reference_s / args.seconds:.3f}); this setting takes "
        f"{results['time_over_reference']:.3f} × that"
    )
    print(
        f"prompt → latents {latents_s:.3f} s vs bare loop {bare_s:.3f} s: overhead {100 * results['overhead_vs_bare_loop']:+.1f} %"
    )
    print(
        f"UNet {results['achieved_gflop_per_s']:.1f} GFLOP/s achieved vs fp32 matmul peak "
        f"{results['fp32_matmul_peak_gflop_per_s']:.1f} GFLOP/s ({100 * results['fraction_of_peak']:.0f} %)"
    )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
