#!/usr/bin/env python
"""What a VAE shape costs: its own training step, and the `small` UNet's training step on its latents,
as ratios to the previous `small` VAE (×8, 8 latent channels) in the same run.

    python benchmarks/bench_codec.py [--threads 2]

Each step is forward + backward + AdamW on a batch of 8 crops of 2.56 s (random data: cost does not
depend on the values); the figure is the median of `--steps` after 2 warm-up steps. The codec's
quality rows come from `training/evaluate.py --codec_only --vae DIR`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from mg2_pipeline.presets import unet_config, vae_config

BASELINE = ("previous small: ×8, 8 latent channels", {"latent_channels": 8})
CANDIDATES = [
    ("small preset now", {}),
    ("×8, 16 latent channels", {"latent_channels": 16}),
    ("×8, 32 latent channels", {"latent_channels": 32}),
    # AutoencoderKL downsamples both axes alike: these rows only price the UNet on other latent grids.
    ("×8 time, ×4 frequency (UNet only)", {"latent_channels": 8, "latent_grid": (1 / 8, 1 / 4)}),
    ("×4 time and frequency (UNet only)", {"latent_channels": 8, "latent_grid": (1 / 4, 1 / 4)}),
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


def measure(overrides: dict, batch: int, frames: int, steps: int) -> tuple[float | None, float]:
    latent_grid = overrides.pop("latent_grid", None)
    vae = AutoencoderKL(**{**vae_config("small"), **overrides})
    mel = torch.randn(batch, 1, frames, 64)
    vae_seconds = median_step_seconds(vae, lambda: (vae(mel).sample - mel).abs().mean(), steps)
    with torch.no_grad():
        latents = vae.encode(mel).latent_dist.mode()
    if latent_grid:
        latents = torch.randn(batch, latents.shape[1], int(frames * latent_grid[0]), int(64 * latent_grid[1]))
    channels = latents.shape[1]
    unet = UNet2DConditionModel(**{**unet_config("small", 512), "in_channels": channels, "out_channels": channels})
    condition, timesteps = torch.randn(batch, 1024), torch.randint(0, 1000, (batch,))
    unet_seconds = median_step_seconds(
        unet,
        lambda: (
            (unet(latents, timesteps, encoder_hidden_states=None, class_labels=condition).sample - latents)
            .pow(2)
            .mean()
        ),
        steps,
    )
    return (None if latent_grid else vae_seconds), unet_seconds


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
    base_vae, base_unet = measure(dict(BASELINE[1]), args.batch_size, frames, args.steps)
    print("| VAE | VAE step s | × | UNet step s on its latents | × |\n|---|---|---|---|---|")
    print(f"| {BASELINE[0]} | {base_vae:.3f} | 1.00 | {base_unet:.3f} | 1.00 |")
    for name, overrides in CANDIDATES:
        vae_seconds, unet_seconds = measure(dict(overrides), args.batch_size, frames, args.steps)
        vae_cells = f"{vae_seconds:.3f} | {vae_seconds / base_vae:.2f}" if vae_seconds else "– | –"
        print(f"| {name} | {vae_cells} | {unet_seconds:.3f} | {unet_seconds / base_unet:.2f} |")


if __name__ == "__main__":
    main()
