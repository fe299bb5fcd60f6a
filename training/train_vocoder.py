#!/usr/bin/env python
"""Train a vocoder from MG2 log-mels to 16 kHz audio: a Vocos (`VocosVocoder`, ConvNeXt blocks at the frame rate and an
inverse STFT) or a HiFi-GAN (transformers' `SpeechT5HifiGan`, AudioLDM's vocoder class).

    accelerate launch training/train_vocoder.py --config training/configs/small.yaml --output_dir checkpoints/vocoder
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 training/train_vocoder.py ...

The HiFi-GAN recipe, which Vocos trains with too: multi-period (periods 2, 3, 5, 7, 11) and multi-scale (3 scales)
discriminators, least-squares adversarial losses, feature matching (×2) and mel L1 (×45); AdamW 2e-4, betas
(0.8, 0.99). `--stft_weight` adds Parallel WaveGAN's multi-resolution STFT loss (STFTs of 512, 1024 and 2048 samples),
which constrains phase where the discriminators have not yet learnt to; `--adversarial_weight 0` trains without the
discriminators, what a CPU budget affords (their cost: `docs/training.md`).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from training_utils import (
    NonFiniteLossGuard,
    TrainingProgress,
    add_common_arguments,
    create_accelerator,
    epoch_dataloader,
    finish_run,
    parse_arguments,
    push_output_dir,
    start_run,
    write_training_summary,
)
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

from mg2_pipeline import VocosVocoder
from mg2_pipeline.audio import HOP_LENGTH, LogMelSpectrogram, multi_resolution_stft_distance
from mg2_pipeline.data import MG2Example, load_mg2_dataset
from mg2_pipeline.presets import PIPELINE_PRESETS, hifigan_config, vocos_config

logger = get_logger(__name__)
# Resolutions of the STFT loss; training/evaluate.py judges vocoders at others, so the loss is not the measure.
STFT_LOSS_RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_output_dir="checkpoints/vocoder-small")
    parser.add_argument("--preset", default="small", choices=PIPELINE_PRESETS)
    parser.add_argument("--architecture", default="vocos", choices=("vocos", "hifigan"))
    parser.add_argument(
        "--segment_seconds", type=float, default=0.64, help="Training crop, drawn at random inside each clip."
    )
    parser.add_argument("--train_batch_size", type=int, default=8, help="Per process.")
    parser.add_argument("--max_train_steps", type=int, default=200)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--mel_weight", type=float, default=45.0)
    parser.add_argument("--feature_matching_weight", type=float, default=2.0)
    parser.add_argument(
        "--adversarial_weight", type=float, default=1.0, help="0 trains without the discriminators (and their cost)."
    )
    parser.add_argument("--stft_weight", type=float, default=0.0, help="Multi-resolution STFT loss weight.")
    args = parse_arguments(parser, argv, __file__, positive=("train_batch_size", "max_train_steps"))
    if args.architecture not in ("vocos", "hifigan"):  # a config file's value skips argparse's choices
        parser.error(f"--architecture must be vocos or hifigan, got {args.architecture!r}")
    for name in ("mel_weight", "feature_matching_weight", "adversarial_weight", "stft_weight"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    return args


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN's MPD member: the waveform folded into `period` columns, 2-D convolutions over time."""

    def __init__(self, period: int):
        super().__init__()
        self.period = period
        widths = [1, 32, 128, 256, 512]
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(a, b, (5, 1), (3, 1), padding=(2, 0))) for a, b in zip(widths, widths[1:])
        )
        self.output = weight_norm(nn.Conv2d(512, 1, (3, 1), padding=(1, 0)))

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        padding = (-waveform.shape[-1]) % self.period
        x = F.pad(waveform, (0, padding), mode="reflect").view(waveform.shape[0], 1, -1, self.period)
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            features.append(x)
        x = self.output(x)
        return x.flatten(1), features + [x]


class ScaleDiscriminator(nn.Module):
    """HiFi-GAN's MSD member: grouped 1-D convolutions over the (average-pooled) waveform."""

    def __init__(self):
        super().__init__()
        layers = [
            (1, 16, 15, 1, 1),
            (16, 64, 41, 4, 4),
            (64, 256, 41, 4, 16),
            (256, 512, 41, 4, 16),
            (512, 512, 5, 1, 1),
        ]
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv1d(i, o, k, s, padding=k // 2, groups=g)) for i, o, k, s, g in layers
        )
        self.output = weight_norm(nn.Conv1d(512, 1, 3, padding=1))

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, features = waveform.unsqueeze(1), []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            features.append(x)
        x = self.output(x)
        return x.flatten(1), features + [x]


class HiFiGANDiscriminators(nn.Module):
    """Multi-period (2, 3, 5, 7, 11) and multi-scale (×1, ×2, ×4) discriminators as one module."""

    def __init__(self):
        super().__init__()
        self.periods = nn.ModuleList(PeriodDiscriminator(p) for p in (2, 3, 5, 7, 11))
        self.scales = nn.ModuleList(ScaleDiscriminator() for _ in range(3))

    def forward(self, real: torch.Tensor, fake: torch.Tensor):
        """Both waveforms in one pass (one forward per backward, as DDP wants); per discriminator
        `(real_logits, real_features), (fake_logits, fake_features)`."""
        waveform = torch.cat([real, fake])
        outputs = [d(waveform) for d in self.periods]
        for index, discriminator in enumerate(self.scales):
            pooled = (
                waveform
                if index == 0
                else F.avg_pool1d(waveform.unsqueeze(1), 4**index, 2**index, padding=2**index).squeeze(1)
            )
            outputs.append(discriminator(pooled))
        half = len(real)
        return [
            ((logits[:half], [f[:half] for f in features]), (logits[half:], [f[half:] for f in features]))
            for logits, features in outputs
        ]


def main(argv=None):
    args = parse_args(argv)
    accelerator = create_accelerator(args)

    if args.architecture == "vocos":
        generator = VocosVocoder(**vocos_config(args.preset))
    else:
        generator = SpeechT5HifiGan(SpeechT5HifiGanConfig(**hifigan_config(args.preset)))
    mel_transform = LogMelSpectrogram().to(accelerator.device)
    frames = int(round(args.segment_seconds * 100))
    samples = frames * HOP_LENGTH
    g_optimizer = torch.optim.AdamW(generator.parameters(), lr=args.learning_rate, betas=(0.8, 0.99))
    generator, g_optimizer = accelerator.prepare(generator, g_optimizer)
    adversarial = args.adversarial_weight > 0
    discriminators = HiFiGANDiscriminators() if adversarial else None
    if adversarial:
        d_optimizer = torch.optim.AdamW(discriminators.parameters(), lr=args.learning_rate, betas=(0.8, 0.99))
        discriminators, d_optimizer = accelerator.prepare(discriminators, d_optimizer)

    dataset = load_mg2_dataset(args.dataset, split="train")
    transform = MG2Example(clip_seconds=args.segment_seconds, random_crop=True, seed=args.seed)
    # A resumed run must build the same models: a checkpoint without discriminators cannot feed them.
    recipe = {"architecture": args.architecture, "adversarial": adversarial}
    global_step, epoch, batches_in_epoch = start_run(accelerator, args, "train_vocoder", logger, recipe)
    logger.info(
        f"***** Training the {args.preset} {args.architecture}: generator "
        f"{sum(p.numel() for p in generator.parameters()) / 1e6:.2f} M parameters, discriminators "
        + (f"{sum(p.numel() for p in discriminators.parameters()) / 1e6:.2f} M *****" if adversarial else "off *****")
    )

    guard = NonFiniteLossGuard(accelerator, args.max_nonfinite_steps)
    progress = TrainingProgress(accelerator, args, global_step)
    mel_losses = []
    while global_step < args.max_train_steps:
        for batch in epoch_dataloader(dataset, transform, args, accelerator, epoch, batches_in_epoch):
            batches_in_epoch += 1
            real = batch["waveform"][:, :samples].to(accelerator.device)
            mel = batch["log_mel"][:, :frames].to(accelerator.device)
            fake = generator(mel)[:, :samples]

            if adversarial:
                # Discriminators: real → 1, generated → 0 (least squares).
                d_loss = sum(
                    ((1 - real_out) ** 2).mean() + (fake_out**2).mean()
                    for (real_out, _), (fake_out, _) in discriminators(real, fake.detach())
                )
                if guard.should_skip(d_loss):
                    continue
                d_optimizer.zero_grad()
                accelerator.backward(d_loss)
                d_optimizer.step()

            # Generator: match the mel (and the STFTs), fool the discriminators, match their features on real audio.
            mel_loss = F.l1_loss(mel_transform(fake), mel)
            g_loss = args.mel_weight * mel_loss
            if args.stft_weight:
                stft_loss = multi_resolution_stft_distance(fake, real, STFT_LOSS_RESOLUTIONS, per_item=False)
                g_loss = g_loss + args.stft_weight * stft_loss
            if adversarial:
                outputs = discriminators(real, fake)
                fooled = sum(((1 - fake_out) ** 2).mean() for _, (fake_out, _) in outputs)
                feature_matching = sum(
                    F.l1_loss(f, r.detach()) for (_, rf), (_, ff) in outputs for r, f in zip(rf, ff)
                )
                g_loss = g_loss + args.adversarial_weight * fooled + args.feature_matching_weight * feature_matching
            if guard.should_skip(g_loss):
                continue
            g_optimizer.zero_grad()
            accelerator.backward(g_loss)
            g_optimizer.step()

            progress.add_samples(len(real))
            global_step += 1
            mel_losses.append(mel_loss.item())
            logs = {"mel_l1": mel_loss.item(), "generator_loss": g_loss.item()}
            if adversarial:
                logs["discriminator_loss"] = d_loss.item()
            logs["samples_per_second"] = progress.samples_per_second()
            progress.end_step(global_step, logs, epoch=epoch, batches_in_epoch=batches_in_epoch, **recipe)
            if global_step >= args.max_train_steps:
                break
        else:
            epoch, batches_in_epoch = epoch + 1, 0

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        vocoder = accelerator.unwrap_model(generator).eval()
        vocoder.save_pretrained(args.output_dir)
        summary = write_training_summary(
            args.output_dir, {"mel_l1": mel_losses}, **progress.summary(global_step, guard)
        )
        logger.info(f"Saved the vocoder to {args.output_dir}: {summary}")
        push_output_dir(args)
    finish_run(accelerator, generator, discriminators)


if __name__ == "__main__":
    main()
