#!/usr/bin/env python
"""Train MG2's mel VAE: diffusers' `AutoencoderKL` on 1-channel log-mel images, as AudioLDM's; a `MelAutoencoderKL`,
whose latent patches are folded into channels, where `--latent_fold` (default: the preset's; `small` folds 2) is > 1.

    accelerate launch training/train_vae.py --preset small --dataset data/mg2-folk --output_dir checkpoints/vae-small
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 training/train_vae.py ...

Loss: L1 reconstruction of the log-mel + `--kl_weight` × KL to N(0, I) + `--spectral_weight` × the spectral
convergence of the linear mel magnitudes (‖M − M̂‖_F / ‖M‖_F, as in multi-resolution STFT losses): the log-domain
L1 weighs every bin alike, the noise floor as much as the loud partials that carry the melody's pitch, while
spectral convergence weighs bins by their energy. From `--disc_start` on, a
PatchGAN discriminator on the mel adds a hinge adversarial term, weighed as AudioLDM's (and Stable Diffusion's) VAE
recipe weighs it: `--disc_weight` × the ratio of the reconstruction loss's gradient norm to the adversarial term's at the
decoder's last layer, so neither swamps the other whatever their scales (that recipe also uses LPIPS, whose weights
cannot be fetched here). `--silence_probability`: digital silence in a span of some crops, so rests are drawn as
silence (`insert_silence`). At the end the latent
scaling factor (1 / std of the latents over `--scaling_batches` batches) is stored in the VAE config,
so diffusion sees unit-variance latents.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from torch import nn
from training_utils import (
    NonFiniteLossGuard,
    TrainingProgress,
    add_common_arguments,
    add_schedule_arguments,
    create_accelerator,
    epoch_dataloader,
    finish_run,
    learning_rate_schedule,
    optimizer_step,
    parse_arguments,
    push_output_dir,
    spectral_convergence,
    start_run,
    write_training_summary,
)

from mg2_pipeline.audio import LOG_FLOOR
from mg2_pipeline.autoencoder_mel import vae_scale_factor
from mg2_pipeline.data import MG2Example, load_mg2_dataset
from mg2_pipeline.presets import PIPELINE_PRESETS, build_vae, vae_config

logger = get_logger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_output_dir="checkpoints/vae-small")
    parser.add_argument("--preset", default="small", choices=PIPELINE_PRESETS)
    parser.add_argument(
        "--clip_seconds",
        type=float,
        default=2.56,
        help="Training crop, drawn at random inside each clip (the VAE is convolutional).",
    )
    parser.add_argument(
        "--latent_fold",
        type=int,
        default=None,
        help="Fold each latent_fold × latent_fold latent patch into channels in place of the last down-samplings: the "
        "same latent shape from a finer grid (`MelAutoencoderKL`; 1, 2 or 4 at the small preset, which folds 2).",
    )
    parser.add_argument("--train_batch_size", type=int, default=8, help="Per process.")
    parser.add_argument("--max_train_steps", type=int, default=400)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=4.5e-4)
    add_schedule_arguments(parser)
    parser.add_argument("--kl_weight", type=float, default=1e-6)
    parser.add_argument(
        "--spectral_weight", type=float, default=0.0, help="Weight of the linear-magnitude spectral convergence term."
    )
    parser.add_argument(
        "--disc_start", type=int, default=0, help="Step at which the adversarial term starts; 0 = never."
    )
    parser.add_argument(
        "--disc_weight",
        type=float,
        default=0.5,
        help="Scales the adaptive weight of the adversarial term (Stable Diffusion's VAE: 0.5).",
    )
    parser.add_argument(
        "--silence_probability",
        type=float,
        default=0.0,
        help="Share of training crops in which a random span of frames is made digitally silent (the log-mel floor), "
        "so the VAE learns to draw the rests that the data seldom holds.",
    )
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--scaling_batches", type=int, default=8)
    args = parse_arguments(
        parser,
        argv,
        __file__,
        positive=("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "scaling_batches"),
    )
    if not 0 <= args.silence_probability <= 1:
        parser.error(f"--silence_probability must be in [0, 1], got {args.silence_probability}")
    if args.silence_probability and args.clip_seconds < 0.16:
        parser.error(
            f"--silence_probability needs crops of at least 0.16 s (16 frames), got --clip_seconds {args.clip_seconds}"
        )
    try:
        args.latent_fold = vae_config(args.preset, args.latent_fold)["latent_fold"]
    except ValueError as error:
        parser.error(f"--{error}")
    return args


class VAEWithLosses(nn.Module):
    """The VAE's training forward (reconstruction and KL) as one module, so DDP wraps and syncs it."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(mel).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        return reconstruction, posterior.kl().mean() / mel[0].numel()


class PatchDiscriminator(nn.Module):
    """A small PatchGAN on log-mel images `(batch, 1, frames, mels)`: one real/fake logit per patch."""

    def __init__(self, channels: int = 32, layers: int = 3):
        super().__init__()
        blocks, width = [nn.Conv2d(1, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)], channels
        for _ in range(layers - 1):
            blocks += [
                nn.Conv2d(width, width * 2, 4, stride=2, padding=1),
                nn.GroupNorm(8, width * 2),
                nn.LeakyReLU(0.2),
            ]
            width *= 2
        blocks.append(nn.Conv2d(width, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.net(mel)


def main(argv=None):
    args = parse_args(argv)
    accelerator = create_accelerator(args, args.gradient_accumulation_steps)

    vae = build_vae(vae_config(args.preset, args.latent_fold))
    model = VAEWithLosses(vae)
    scale = vae_scale_factor(vae)
    frames = int(round(args.clip_seconds * 100))
    if frames % scale:
        raise SystemExit(f"--clip_seconds gives {frames} mel frames; the VAE needs a multiple of {scale}.")
    discriminator = PatchDiscriminator()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, betas=(0.5, 0.9))
    disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=args.learning_rate, betas=(0.5, 0.9))
    lr_scheduler = learning_rate_schedule(args, optimizer, accelerator.num_processes)
    model, discriminator, optimizer, disc_optimizer, lr_scheduler = accelerator.prepare(
        model, discriminator, optimizer, disc_optimizer, lr_scheduler
    )

    dataset = load_mg2_dataset(args.dataset, split="train")
    transform = MG2Example(clip_seconds=args.clip_seconds, random_crop=True, seed=args.seed)
    recipe = {"latent_fold": args.latent_fold, "mid_block_add_attention": vae.config.mid_block_add_attention}
    global_step, epoch, batches_in_epoch = start_run(
        accelerator, args, "train_vae", logger, recipe, lr_scheduler=lr_scheduler
    )
    logger.info(
        f"***** Training the {args.preset} mel VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, "
        f"×{scale}, {vae.config.latent_channels} latent channels, latent_fold {args.latent_fold} *****"
    )

    guard = NonFiniteLossGuard(accelerator, args.max_nonfinite_steps)
    progress = TrainingProgress(accelerator, args, global_step)
    losses = []
    while global_step < args.max_train_steps:
        for batch in epoch_dataloader(dataset, transform, args, accelerator, epoch, batches_in_epoch):
            batches_in_epoch += 1
            mel = insert_silence(batch["log_mel"][:, :frames], args.silence_probability).unsqueeze(1)
            mel = mel.to(accelerator.device)
            adversarial = bool(args.disc_start) and global_step >= args.disc_start
            with accelerator.accumulate(model):
                reconstruction, kl = model(mel)
                l1 = F.l1_loss(reconstruction, mel)
                convergence = spectral_convergence(reconstruction, mel)
                loss = l1 + args.kl_weight * kl + args.spectral_weight * convergence
                adversarial_weight = torch.zeros(())
                if adversarial:
                    generator_loss = -discriminator(reconstruction).mean()
                    last_layer = accelerator.unwrap_model(model).vae.decoder.conv_out.weight
                    adversarial_weight = args.disc_weight * adaptive_weight(loss, generator_loss, last_layer)
                    loss = loss + adversarial_weight * generator_loss
                if guard.should_skip(loss):
                    optimizer.zero_grad()
                    continue
                optimizer_step(accelerator, loss, optimizer, lr_scheduler, model.parameters(), args.max_grad_norm)
            disc_loss = torch.zeros(())
            if adversarial:
                disc_optimizer.zero_grad()
                disc_loss = (
                    F.relu(1 - discriminator(mel)).mean() + F.relu(1 + discriminator(reconstruction.detach())).mean()
                ) / 2
                accelerator.backward(disc_loss)
                disc_optimizer.step()
                disc_optimizer.zero_grad()
            progress.add_samples(len(mel))
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            losses.append(l1.item())
            logs = {
                "l1": l1.item(),
                "kl": kl.item(),
                "spectral_convergence": convergence.item(),
                "disc_loss": disc_loss.item(),
                "adaptive_disc_weight": adversarial_weight.item(),
                "lr": lr_scheduler.get_last_lr()[0],
                "samples_per_second": progress.samples_per_second(),
            }
            progress.end_step(global_step, logs, epoch=epoch, batches_in_epoch=batches_in_epoch, **recipe)
            if global_step >= args.max_train_steps:
                break
        else:
            epoch, batches_in_epoch = epoch + 1, 0

    accelerator.wait_for_everyone()
    vae = accelerator.unwrap_model(model).vae.eval()
    loader = epoch_dataloader(dataset, transform, args, accelerator, epoch + 1, 0)
    scaling_factor = latent_scaling_factor(vae, loader, frames, args.scaling_batches, accelerator)
    if accelerator.is_main_process:
        vae.register_to_config(scaling_factor=scaling_factor)
        vae.save_pretrained(args.output_dir)
        summary = write_training_summary(
            args.output_dir, {"l1": losses}, **progress.summary(global_step, guard), scaling_factor=scaling_factor
        )
        logger.info(f"Saved the VAE to {args.output_dir}: {summary}")
        push_output_dir(args)
    finish_run(accelerator, model, discriminator)


def insert_silence(mel: torch.Tensor, probability: float) -> torch.Tensor:
    """`mel` (batch, frames, mels) with, in each crop with `probability`, a span of 8 frames to half the crop set to
    the log-mel floor: digital silence, as a rest between notes gives."""
    if probability == 0:  # no draw either: other runs keep their random stream
        return mel
    mel = mel.clone()
    frames = mel.shape[1]
    for crop in torch.nonzero(torch.rand(len(mel)) < probability).flatten().tolist():
        length = int(torch.randint(8, frames // 2 + 1, ()))
        start = int(torch.randint(0, frames - length + 1, ()))
        mel[crop, start : start + length] = math.log(LOG_FLOOR)
    return mel


def adaptive_weight(reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor, last_layer: torch.Tensor):
    """‖∇ reconstruction‖ / ‖∇ adversarial‖ at `last_layer`, clamped to [0, 1e4] and detached (taming-transformers'
    `calculate_adaptive_weight`, which Stable Diffusion's and AudioLDM's VAEs train with)."""
    (reconstruction_grad,) = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    (generator_grad,) = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)
    return (reconstruction_grad.norm() / (generator_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


@torch.no_grad()
def latent_scaling_factor(vae, loader, frames: int, batches: int, accelerator) -> float:
    """1 / std of the latents over a few batches (all processes), as Stable Diffusion and AudioLDM set it."""
    samples = []
    for index, batch in enumerate(loader):
        if index >= batches:
            break
        samples.append(
            vae.encode(batch["log_mel"][:, :frames].unsqueeze(1).to(accelerator.device)).latent_dist.sample().flatten()
        )
    std = accelerator.gather(torch.cat(samples)).float().std().item()
    return 1.0 / std


if __name__ == "__main__":
    main()
