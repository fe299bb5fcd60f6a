#!/usr/bin/env python
"""Train MG2's diffusion model: a UNet on VAE latents of log-mels, conditioned on [CLMP text ‖ melody] embeddings.

    accelerate launch training/train_mg2.py --pipeline checkpoints/mg2-init --dataset data/mg2-folk --output_dir checkpoints/mg2-small
    accelerate launch training/train_mg2.py ... --condition text            # the text-only ablation, same code
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 training/train_mg2.py ...

`--pipeline` is a saved MG2Pipeline (its trained CLMP, retriever and VAE are used frozen; its UNet is
trained) or `preset:NAME` for a fresh one. The melody half of the condition is, per clip, the clip's
own melody with probability `--gt_melody_prob`, otherwise the nearest *other* melody in the index
(the clip's own is excluded), retrieved with the clip's CLMP text embedding as at inference.
Default 0.5: retrieved-only training teaches the model to treat the melody as a loose hint (it rarely
matches the audio), ground-truth-only teaches exact adherence but never sees what inference feeds it.
10 % of conditions are dropped to the empty-text embedding in both halves for classifier-free guidance.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from mg2_pipeline.audio import save_audio
from mg2_pipeline.data import MG2Example, load_mg2_dataset
from mg2_pipeline import CLMPModel, CLMPProcessor, MelodyRetriever, MG2Pipeline
from mg2_pipeline.pipeline_mg2 import CONDITIONS
from mg2_pipeline.presets import load_pipeline
from mg2_pipeline.hub import write_model_card
from training_utils import (MG2_FOLK_LIMITATIONS, NonFiniteLossGuard, add_common_arguments, create_accelerator, describe_dataset,
                            describe_mg2_model, epoch_dataloader, finish_run, parse_arguments, push_output_dir, save_checkpoint, start_run,
                            write_training_summary)

logger = get_logger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_output_dir="checkpoints/mg2-small")
    parser.add_argument("--pipeline", default="preset:small", help="A saved MG2Pipeline folder, or preset:tiny|small.")
    parser.add_argument("--clmp", default=None, help="Replace the pipeline's CLMP (and processor) with this train_clmp.py folder.")
    parser.add_argument("--retriever", default=None, help="Replace the pipeline's retriever with this build_index.py folder.")
    parser.add_argument("--vae", default=None, help="Replace the pipeline's VAE with this train_vae.py folder.")
    parser.add_argument("--condition", default="text_melody", choices=CONDITIONS)
    parser.add_argument("--gt_melody_prob", type=float, default=0.5, help="Use the clip's own melody instead of a retrieved one.")
    parser.add_argument("--condition_dropout", type=float, default=0.1)
    parser.add_argument("--clip_seconds", type=float, default=10.24, help="Training crop, drawn at random inside each clip with its melody cut to match; "
                        "a whole number of latent frames.")
    parser.add_argument("--train_batch_size", type=int, default=8, help="Per process.")
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--lr_scheduler", default="constant_with_warmup")
    parser.add_argument("--lr_warmup_steps", type=int, default=20)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--use_lora", action="store_true", help="Fine-tune a saved pipeline with a LoRA adapter on its UNet.")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank.")
    parser.add_argument("--validation_steps", type=int, default=100)
    parser.add_argument("--validation_prompt", default="a lively Irish jig on fiddle, 120 BPM")
    parser.add_argument("--validation_inference_steps", type=int, default=25)
    args = parse_arguments(parser, argv, __file__, positive=("train_batch_size", "max_train_steps", "gradient_accumulation_steps",
                                                             "validation_steps", "max_nonfinite_steps"))
    if args.use_lora and (args.pipeline.startswith("preset:") or args.rank < 1):
        parser.error("--use_lora fine-tunes a saved pipeline: pass --pipeline DIR and --rank >= 1")
    for name in ("gt_melody_prob", "condition_dropout"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    return args


@torch.no_grad()
def build_condition(pipe, batch: dict, args, generator: torch.Generator, device) -> torch.Tensor:
    """[text ‖ melody] per clip: the crop's own melody or a retrieved one (the clip's excluded), or [text ‖ text]
    for the ablation; a random `condition_dropout` share replaced by [empty ‖ empty]."""
    text = pipe.clmp.get_text_features(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    if args.condition == "text":
        melody = text
    else:
        own = pipe.clmp.get_melody_features(batch["melody_input_ids"].to(device), batch["melody_attention_mask"].to(device))
        own_ids = [pipe.retriever.id_of(tokens) for tokens in batch["clip_melody_tokens"]]
        exclude = [[i] if i is not None else [] for i in own_ids]
        retrieved = torch.from_numpy(pipe.retriever.search(text, k=1, exclude_ids=exclude).embeddings[:, 0]).to(device)
        use_own = torch.rand(len(text), generator=generator) < args.gt_melody_prob
        melody = torch.where(use_own[:, None].to(device), own, retrieved)
    condition = torch.cat([text, melody], dim=-1)
    empty = pipe.encode_text([""], device)
    dropped = (torch.rand(len(text), generator=generator) < args.condition_dropout)[:, None].to(device)
    return torch.where(dropped, torch.cat([empty, empty], dim=-1).expand_as(condition), condition)


def main(argv=None):
    args = parse_args(argv)
    accelerator = create_accelerator(args, args.gradient_accumulation_steps)

    # Frozen CLMP, retriever and VAE; the UNet trains.
    pipe = load_pipeline(args.pipeline)
    if args.clmp or args.retriever or args.vae:
        parts = dict(pipe.components)
        if args.clmp:
            parts.update(clmp=CLMPModel.from_pretrained(args.clmp).eval(), processor=CLMPProcessor.from_pretrained(args.clmp))
        if args.retriever:
            parts["retriever"] = MelodyRetriever.from_pretrained(args.retriever)
        if args.vae:
            parts["vae"] = AutoencoderKL.from_pretrained(args.vae)
        pipe = MG2Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(condition=args.condition)
    for frozen in (pipe.clmp, pipe.vae, pipe.vocoder):
        frozen.requires_grad_(False).eval().to(accelerator.device)
    unet = pipe.unet
    if args.use_lora:
        from peft import LoraConfig

        # Attention projections and the ResBlocks' convolutions and FiLM (time + condition) projections.
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"]))
    unet.train()
    frames_multiple = pipe.frames_multiple
    frames = int(round(args.clip_seconds * pipe.sampling_rate / pipe.hop_length))
    if frames % frames_multiple:
        raise SystemExit(f"--clip_seconds {args.clip_seconds} gives {frames} mel frames; use a multiple of {frames_multiple} "
                         f"frames ({frames_multiple * pipe.hop_length / pipe.sampling_rate:.2f} s).")
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                                    prediction_type="epsilon")
    # EMA of the full UNet; a LoRA run trains a small adapter and keeps none (as diffusers' LoRA examples).
    ema = None if args.use_lora else EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=type(unet), model_config=unet.config)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)

    dataset = load_mg2_dataset(args.dataset, split="train")
    transform = MG2Example(clip_seconds=args.clip_seconds, tokenizer=pipe.processor.tokenizer,
                           max_text_length=pipe.processor.max_text_length, max_melody_length=pipe.processor.melody_max_length,
                           random_crop=True, seed=args.seed)

    global_step, epoch, batches_in_epoch = start_run(accelerator, args, "train_mg2", logger)
    logger.info(f"***** Training the MG2 UNet ({args.condition}) *****")
    logger.info(f"  UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters; global batch "
                f"{args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps}; steps {args.max_train_steps}")

    # Per-batch randomness (noise, timesteps, melody choice, dropout) comes from a generator seeded by
    # (seed, process, epoch, batch), so a resumed run draws exactly what the uninterrupted one would have.
    guard = NonFiniteLossGuard(accelerator, args.max_nonfinite_steps)
    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    start_time, samples_seen, losses, skipped_rows = time.perf_counter(), 0, [], 0
    while global_step < args.max_train_steps:
        loader = epoch_dataloader(dataset, transform, args, accelerator, epoch, batches_in_epoch)
        for batch in loader:
            batches_in_epoch += 1
            generator = torch.Generator().manual_seed(
                args.seed * 1_000_003 + accelerator.process_index * 7919 + epoch * 100_003 + batches_in_epoch)
            with torch.no_grad():
                mel = batch["log_mel"][:, :frames].unsqueeze(1).to(accelerator.device)
                latents = pipe.vae.encode(mel).latent_dist.sample(generator=generator) * pipe.vae.config.scaling_factor
                condition = build_condition(pipe, batch, args, generator, accelerator.device)
            noise = torch.randn(latents.shape, generator=generator).to(latents.device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator).to(latents.device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            with accelerator.accumulate(unet):
                prediction = unet(noisy, timesteps, encoder_hidden_states=None, class_labels=condition).sample
                loss = F.mse_loss(prediction.float(), noise.float())
                if guard.should_skip(loss):
                    logger.warning(f"Non-finite loss at step {global_step}: step skipped ({guard.skipped} so far).")
                    optimizer.zero_grad()
                    continue
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            samples_seen += len(latents) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(accelerator.unwrap_model(unet).parameters())
            global_step += 1
            progress_bar.update(1)
            losses.append(loss.item())
            logs = {"loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0], "skipped_steps": guard.skipped,
                    "samples_per_second": samples_seen / (time.perf_counter() - start_time)}
            progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", samples_s=f"{logs['samples_per_second']:.1f}")
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                save_checkpoint(accelerator, args.output_dir, args.checkpoints_total_limit, global_step,
                                epoch=epoch, batches_in_epoch=batches_in_epoch)
            if accelerator.is_main_process and (global_step % args.validation_steps == 0 or global_step == args.max_train_steps):
                validate(pipe, accelerator, ema, args, global_step)
            if global_step >= args.max_train_steps:
                break
        else:
            epoch, batches_in_epoch = epoch + 1, 0
        skipped_rows += loader.dataset.skipped
        if loader.dataset.skipped:
            logger.warning(f"{loader.dataset.skipped} corrupt rows skipped (process {accelerator.process_index}).", main_process_only=False)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pipe.unet.eval()
        if args.use_lora:
            pipe.unet.save_lora_adapter(args.output_dir)  # the adapter only; apply with MG2Pipeline.load_lora_weights
        else:
            ema.copy_to(pipe.unet.parameters())
            pipe.save_pretrained(args.output_dir)
        elapsed = time.perf_counter() - start_time
        summary = write_training_summary(
            args.output_dir, {"loss": losses}, steps=global_step, samples=samples_seen, seconds=round(elapsed, 1),
            samples_per_second=round(samples_seen / elapsed, 2), steps_per_second=round(len(losses) / elapsed, 3),
            processes=accelerator.num_processes, condition=args.condition, clip_seconds=args.clip_seconds,
            skipped_steps=guard.skipped, skipped_rows_main_process=skipped_rows)
        if not args.use_lora:
            write_model_card(args.output_dir, datasets=[os.path.basename(os.path.normpath(args.dataset))],
                             dataset_description=describe_dataset(args.dataset), repo_id=args.hub_model_id,
                             limitations=MG2_FOLK_LIMITATIONS, model_description=describe_mg2_model(args.output_dir, pipe))
        logger.info(f"Saved the pipeline to {args.output_dir}: {summary}")
        push_output_dir(args)
    finish_run(accelerator)


@torch.no_grad()
def validate(pipe, accelerator, ema, args, global_step: int) -> None:
    """Generate the validation prompt with the EMA weights (or the LoRA adapter); WAV under output_dir/validation/,
    audio in tensorboard."""
    trained = pipe.unet  # the module the prepared (possibly DDP-wrapped) UNet trains
    if ema is not None:
        ema.store(trained.parameters())
        ema.copy_to(trained.parameters())
    trained.eval()
    try:
        output = pipe(args.validation_prompt, num_inference_steps=args.validation_inference_steps,
                      audio_length_in_s=args.clip_seconds, generator=torch.Generator().manual_seed(args.seed))
    finally:
        if ema is not None:
            ema.restore(trained.parameters())
        trained.train()
    path = os.path.join(args.output_dir, "validation", f"step-{global_step}.wav")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_audio(path, output.audios[0], output.sampling_rate)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_audio("validation", output.audios[0], global_step, sample_rate=output.sampling_rate)
    logger.info(f"Validation audio: {path}")


if __name__ == "__main__":
    main()
