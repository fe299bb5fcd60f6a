#!/usr/bin/env python
"""What a VAE shape costs: its own training step, encoding and decoding a 10.24 s clip (the latent cache and the
pipeline), and the `small` UNet's training step on its latents, as ratios to the unfolded ×8 VAE with 32 latent channels
(the `small` preset before it folded) in the same run.

    python benchmarks/bench_codec.py [--threads 2]

Each step is forward + backward + AdamW on a batch of 8 crops of 2.56 s (random data: cost does not
depend on the values); the figure is the median of `--steps` after 2 warm-up steps (encode and decode: of 5 after 1).
The codec's quality rows come from `training/evaluate.py --codec_only --vae DIR`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from mg2_pipeline.presets import build_vae, unet_config, vae_config

SMALL, FOLDED = vae_config("small", latent_fold=1), vae_config("small")
BASELINE = ("×8, 32 latent channels (the small preset before it folded)", SMALL)
CANDIDATES = [
    ("×4, 8 channels, 2 × 2 folded into 32 (the small preset)", FOLDED),
    ("the same with a mid-block attention", {**FOLDED, "mid_block_add_attention": True}),
    (
        "×4, 8 channels, not folded",
        {**FOLDED, "latent_channels": 8, "latent_fold": 1, "mid_block_add_attention": True},
    ),
    # MelAutoencoderKL downsamples both axes alike: this row only prices the UNet on another latent grid.
    (
        "×8 time, ×4 frequency (UNet only)",
        {**FOLDED, "latent_channels": 8, "latent_fold": 1, "latent_grid": (1 / 8, 1 / 4)},
    ),
]


def median_step_seconds(model: torch.nn.Module, make_loss, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        make_loss().backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def median_seconds(run, repeats: int = 5) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(config: dict, batch: int, frames: int, steps: int) -> dict[str, float | None]:
    """Seconds of a VAE training step, a 10.24 s encode and decode, and a UNet training step on the VAE's latents
    (only the UNet's for a `latent_grid` row, on random latents of that grid)."""
    latent_grid = config.pop("latent_grid", None)
    seconds = {"vae": None, "encode": None, "decode": None}
    if latent_grid:
        latents = torch.randn(batch, config["latent_channels"], int(frames * latent_grid[0]), int(64 * latent_grid[1]))
    else:
        vae = build_vae(config)
        mel = torch.randn(batch, 1, frames, 64)
        seconds["vae"] = median_step_seconds(vae, lambda: (vae(mel).sample - mel).abs().mean(), steps)
        with torch.no_grad():
            latents = vae.encode(mel).latent_dist.mode()
            clip = torch.randn(1, 1, 1024, 64)
            clip_latent = vae.encode(clip).latent_dist.mode()
            seconds["encode"] = median_seconds(lambda: vae.encode(clip))
            seconds["decode"] = median_seconds(lambda: vae.decode(clip_latent))
    channels = latents.shape[1]
    unet = UNet2DConditionModel(**{**unet_config("small", 512), "in_channels": channels, "out_channels": channels})
    condition, timesteps = torch.randn(batch, 1024), torch.randint(0, 1000, (batch,))
    seconds["unet"] = median_step_seconds(
        unet,
        lambda: (
            (unet(latents, timesteps, encoder_hidden_states=None, class_labels=condition).sample - latents)
            .pow(2)
            .mean()
        ),
        steps,
    )
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--clip_seconds", type=float, default=2.56)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    frames = int(round(args.clip_seconds * 100))
    columns = ("vae", "encode", "decode", "unet")
    base = measure(dict(BASELINE[1]), args.batch_size, frames, args.steps)
    print(
        "| VAE | VAE step s (×) | encode 10.24 s (×) | decode 10.24 s (×) | UNet step s on its latents (×) |\n"
        "|---|---|---|---|---|"
    )
    for name, config in [BASELINE, *CANDIDATES]:
        seconds = base if config is SMALL else measure(dict(config), args.batch_size, frames, args.steps)
        cells = [f"{seconds[c]:.3f} ({seconds[c] / base[c]:.2f})" if seconds[c] else "–" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
