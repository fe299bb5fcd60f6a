#!/usr/bin/env python
"""Train MG2's diffusion model: a UNet on VAE latents of log-mels, conditioned on [CLMP text ‖ melody] embeddings.

    accelerate launch training/train_mg2.py --pipeline checkpoints/mg2-init --dataset data/mg2-folk --output_dir checkpoints/mg2-small
    accelerate launch training/train_mg2.py ... --condition text            # the text-only ablation, same code
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 training/train_mg2.py ...

`--pipeline` is a saved MG2Pipeline (its trained CLMP, retriever and VAE are used frozen; its UNet is
trained) or `preset:NAME` for a fresh one. The melody half of the pooled condition is, per clip, the crop's
own melody with probability `--gt_melody_prob`, otherwise the nearest *other* melody in the index
(the clip's own is excluded), retrieved with the clip's CLMP text embedding as at inference. The
time-aligned melody frames (`--aligned_melody`) are always the crop's own melody: they must match the audio.
For text and melody guidance, the text alone (`--text_dropout`), the melody alone (`--melody_dropout`: its
pooled half becomes the empty text's embedding, its frames zeros) and both (`--condition_dropout`) are dropped; a
dropped text is the empty text, pooled and (with `--text_attention on`) as the token states the UNet attends to.
With `--sketch_timbre random` each clip's melody sketch is rendered with its own random sound, so that the sketch
gives the UNet pitch and timing but no instrument to copy.

Everything that does not change between epochs (audio decoding, log-mel, VAE encoding, the melody frames,
CLMP text embeddings, with `--text_attention on` the caption's token states, and retrieval) is computed once into a
latent cache under `--latent_cache`, keyed by the VAE, CLMP, index, setting and dataset, so a changed one builds a new
cache; training streams random crops of it and runs no frozen model but the melody tower.
"""

from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from datasets import load_dataset
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm
from training_utils import (
    MG2_FOLK_LIMITATIONS,
    NonFiniteLossGuard,
    TrainingProgress,
    add_common_arguments,
    add_schedule_arguments,
    create_accelerator,
    decay_steps,
    describe_dataset,
    describe_mg2_model,
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

from mg2_pipeline import CLMPModel, CLMPProcessor, MelodyRetriever, MG2Pipeline
from mg2_pipeline.audio import load_audio, save_audio
from mg2_pipeline.conditioning import (
    DROPPED_TEXT,
    melody_frames_condition,
    pooled_condition,
    text_states_condition,
)
from mg2_pipeline.data import LatentCrop, data_files, load_mg2_dataset, write_shard
from mg2_pipeline.hub import write_model_card
from mg2_pipeline.melody import PLAIN_SKETCH_ATTACK_S, PLAIN_SKETCH_RELEASE_S, Melody
from mg2_pipeline.pipeline_mg2 import CONDITIONS, MAX_GUIDANCE_SCALE, GuidanceInputs
from mg2_pipeline.presets import build_pipeline, load_vae, load_vocoder
from mg2_pipeline.retrieval import clmp_fingerprint

logger = get_logger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_output_dir="checkpoints/mg2-small")
    parser.add_argument("--pipeline", default="preset:small", help="A saved MG2Pipeline folder, or preset:tiny|small.")
    parser.add_argument(
        "--clmp", default=None, help="Replace the pipeline's CLMP (and processor) with this train_clmp.py folder."
    )
    parser.add_argument(
        "--retriever", default=None, help="Replace the pipeline's retriever with this build_index.py folder."
    )
    parser.add_argument("--vae", default=None, help="Replace the pipeline's VAE with this train_vae.py folder.")
    parser.add_argument(
        "--vocoder", default=None, help="Replace the pipeline's vocoder with this train_vocoder.py folder."
    )
    parser.add_argument("--condition", default="text_melody", choices=CONDITIONS)
    parser.add_argument(
        "--aligned_melody",
        default="keep",
        choices=["keep", "none", "sketch", "roll"],
        help="The time-aligned melody input: keep the pipeline's setting, none (pooled only), sketch or roll.",
    )
    parser.add_argument(
        "--text_attention",
        default="keep",
        choices=["keep", "on", "off"],
        help="Whether the UNet attends to the caption's token states: keep the pipeline's setting, on or off.",
    )
    parser.add_argument(
        "--sketch_timbre",
        default="plain",
        choices=["plain", "random"],
        help="The melody sketch's sound in training: plain tones (as at inference), or random per clip "
        "(no effect without the sketch).",
    )
    parser.add_argument(
        "--gt_melody_prob", type=float, default=0.5, help="Use the clip's own melody instead of a retrieved one."
    )
    parser.add_argument("--condition_dropout", type=float, default=0.1, help="Drop text and melody together.")
    parser.add_argument("--text_dropout", type=float, default=0.1, help="Drop the text alone.")
    parser.add_argument("--melody_dropout", type=float, default=0.1, help="Drop the melody alone.")
    parser.add_argument(
        "--latent_cache",
        default=None,
        help="Folder of latent caches, one per key (default: DATASET/latent-cache "
        "for a local dataset, else HF_HOME/mg2-latent-cache).",
    )
    parser.add_argument(
        "--latent_cache_workers",
        type=int,
        default=1,
        help="CPU processes that build the latent cache, one compute thread each (on 2 cores, 2 of them are 1.2× "
        "as fast as 1 process with 2 threads); GPU runs build it in 1.",
    )
    parser.add_argument(
        "--clip_seconds",
        type=float,
        default=10.24,
        help="Training crop, drawn at random inside each clip with its melody cut to match; "
        "a whole number of latent frames.",
    )
    parser.add_argument("--train_batch_size", type=int, default=8, help="Per process.")
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    add_schedule_arguments(parser)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument(
        "--prediction_type",
        default=None,
        choices=["epsilon", "v_prediction", "sample"],
        help="What the UNet predicts (default: the pipeline scheduler's); saved in the pipeline's scheduler.",
    )
    parser.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR-γ loss weighting (Hang et al. 2023), as diffusers' examples; 5.0 is their recommendation.",
    )
    parser.add_argument(
        "--decoded_spectral_weight",
        type=float,
        default=0.0,
        help="Weight of the spectral convergence between the frozen VAE's decodings of the predicted and the target "
        "latents (linear mel magnitudes: it weighs the loud partials whose filter ratios carry pitch). Needs "
        "--prediction_type sample.",
    )
    parser.add_argument(
        "--decoded_spectral_steps",
        choices=["all", "decay"],
        default="all",
        help="The steps that add the --decoded_spectral_weight term: all, or those of warmup_stable_decay's "
        "learning-rate decay (the last --lr_decay_fraction).",
    )
    parser.add_argument(
        "--use_lora", action="store_true", help="Fine-tune a saved pipeline with a LoRA adapter on its UNet."
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank.")
    parser.add_argument(
        "--distill_guidance",
        type=float,
        default=None,
        metavar="SCALE",
        help="Guidance distillation: the saved --pipeline's UNet, frozen, guided at text and melody scale SCALE is the "
        "target, so the trained UNet gives that guided prediction in one pass (the pipeline then defaults to guidance "
        "1). Needs no condition dropout.",
    )
    parser.add_argument("--validation_steps", type=int, default=100)
    parser.add_argument("--validation_prompt", default="a lively Irish jig on fiddle, 120 BPM")
    parser.add_argument("--validation_inference_steps", type=int, default=None, help="Default: the pipeline's.")
    args = parse_arguments(
        parser,
        argv,
        __file__,
        positive=(
            "train_batch_size",
            "max_train_steps",
            "gradient_accumulation_steps",
            "validation_steps",
            "max_nonfinite_steps",
            "latent_cache_workers",
        ),
    )
    if not args.decoded_spectral_weight >= 0:
        parser.error(f"--decoded_spectral_weight must be >= 0, got {args.decoded_spectral_weight}")
    if args.decoded_spectral_weight and args.prediction_type not in (None, "sample"):
        parser.error(f"--decoded_spectral_weight needs --prediction_type sample, not {args.prediction_type}")
    if (
        args.decoded_spectral_weight
        and args.decoded_spectral_steps == "decay"
        and args.lr_scheduler != "warmup_stable_decay"
    ):
        parser.error(
            f"--decoded_spectral_steps decay needs --lr_scheduler warmup_stable_decay, not {args.lr_scheduler}"
        )
    if args.use_lora and (args.pipeline.startswith("preset:") or args.rank < 1):
        parser.error("--use_lora fine-tunes a saved pipeline: pass --pipeline DIR and --rank >= 1")
    for name in ("gt_melody_prob", "condition_dropout", "text_dropout", "melody_dropout"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    if args.condition_dropout + args.text_dropout + args.melody_dropout > 1:
        parser.error("--condition_dropout + --text_dropout + --melody_dropout must be at most 1")
    if args.distill_guidance is not None:
        if args.pipeline.startswith("preset:") or args.use_lora:
            parser.error("--distill_guidance trains a saved pipeline's whole UNet: pass --pipeline DIR, no --use_lora")
        if not 1 < args.distill_guidance <= MAX_GUIDANCE_SCALE:
            parser.error(f"--distill_guidance must be in (1, {MAX_GUIDANCE_SCALE:g}], got {args.distill_guidance}")
        if args.condition_dropout or args.text_dropout or args.melody_dropout:
            parser.error(
                "--distill_guidance learns the guided prediction of the full condition: pass --condition_dropout 0 "
                "--text_dropout 0 --melody_dropout 0"
            )
    return args


def latent_cache_dir(pipe, args) -> str:
    """`--latent_cache/KEY`: KEY hashes the VAE and CLMP weights, the index, the aligned-melody setting (and the
    sketch's timbre, and a plain sketch's envelope), whether it holds token states (`text_attention`), the text length
    and the dataset."""
    files = data_files(args.dataset).get("train", []) if os.path.isdir(args.dataset) else []
    identity = {
        "vae": clmp_fingerprint(pipe.vae)["float16"],
        "clmp": clmp_fingerprint(pipe.clmp)["float16"],
        "index": [len(pipe.retriever), pipe.retriever.config.clmp_fingerprint],
        "aligned_melody": pipe.config.aligned_melody,
        "sketch_timbre": args.sketch_timbre if pipe.config.aligned_melody == "sketch" else None,
        "max_text_length": pipe.processor.max_text_length,
        "dataset": [[os.path.basename(f), os.path.getsize(f), int(os.path.getmtime(f))] for f in files]
        or args.dataset,
    }
    if pipe.vae.config.get("latent_fold", 1) > 1:  # a folded and an unfolded VAE can share weight shapes
        identity["latent_fold"] = pipe.vae.config.latent_fold
    if identity["sketch_timbre"] == "plain":  # a cache of plain sketches holds their envelope
        identity["plain_sketch_envelope_s"] = [PLAIN_SKETCH_ATTACK_S, PLAIN_SKETCH_RELEASE_S]
    if pipe.config.text_attention:  # a cache for text attention holds the captions' token states
        identity["text_states"] = "float16"
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    if args.latent_cache:
        return os.path.join(args.latent_cache, key)
    if os.path.isdir(args.dataset):
        return os.path.join(args.dataset, "latent-cache", key)
    from huggingface_hub.constants import HF_HOME

    return os.path.join(HF_HOME, "mg2-latent-cache", key)


@torch.no_grad()
def cache_rows(pipe, rows: list[dict], device, sketch_timbre: str = "plain") -> list[dict]:
    """Cache rows for dataset rows: the whole clip's VAE latents (posterior mode, scaled) and melody frames as float16
    (the sketch in its `sketch_timbre`, seeded by the clip id), its caption, CLMP text embedding and, for a
    `text_attention` UNet, the caption's token states (float16, its tokens only), and the embedding of the nearest
    other melody in the index. Training then never runs the frozen text tower."""
    tokens = pipe.tokenize([row["caption"] for row in rows], device)
    text, states = pipe.clmp.get_text_outputs(**tokens)  # one pass of the text tower for both
    lengths = tokens["attention_mask"].sum(1).tolist()
    own_ids = [pipe.retriever.id_of(row["melody_tokens"]) for row in rows]
    retrieved = pipe.retriever.search(
        text, k=1, exclude_ids=[[i] if i is not None else [] for i in own_ids]
    ).embeddings[:, 0]
    unit = pipe.vae_scale_factor * pipe.hop_length
    cached = []
    for index, (row, text_embeds, retrieved_embeds) in enumerate(zip(rows, text.cpu().numpy(), retrieved)):
        waveform = load_audio(row["audio"]["bytes"] if row["audio"].get("bytes") else row["audio"]["path"])
        waveform = torch.from_numpy(np.pad(waveform, (0, -len(waveform) % unit)))
        log_mel = pipe.mel(waveform)[None, None].to(device, pipe.vae.dtype)
        latents = pipe.vae.encode(log_mel).latent_dist.mode()[0] * pipe.vae.config.scaling_factor
        melody = (
            Melody.from_notes(row["melody_notes"])
            if row.get("melody_notes")
            else Melody.from_tokens(row["melody_tokens"])
        )
        entry = {
            "clip_id": row["clip_id"],
            "caption": row["caption"],
            "latents": latents.half().cpu().numpy().tobytes(),
            "latents_shape": list(latents.shape),
            "melody_notes": melody.to_list(),
            "text_embeds": text_embeds.tolist(),
            "retrieved_embeds": retrieved_embeds.tolist(),
            "melody_frames": None,
            "melody_frames_shape": None,
            "text_states": None,
            "text_states_shape": None,
        }
        if pipe.config.text_attention:
            row_states = states[index, : lengths[index]]
            entry.update(
                text_states=row_states.half().cpu().numpy().tobytes(), text_states_shape=list(row_states.shape)
            )
        if pipe.config.aligned_melody is not None:
            seeds = (
                [int(hashlib.md5(row["clip_id"].encode()).hexdigest()[:8], 16)] if sketch_timbre == "random" else None
            )
            frames = pipe.prepare_melody_frames([melody], latents.shape[1], device, torch.float16, timbre_seeds=seeds)[
                0
            ]
            entry.update(melody_frames=frames.cpu().numpy().tobytes(), melody_frames_shape=list(frames.shape))
        cached.append(entry)
    return cached


def build_latent_cache(pipe, args, folder: str, device) -> None:
    """Write the train split's cache rows as Parquet shards into `folder`, atomically (built in a temporary folder,
    renamed when complete; a concurrent builder of the same key may win). With `--latent_cache_workers` > 1 (CPU),
    forked processes each cache their part of the rows. Bad rows are skipped and counted in `cache_info.json`."""
    if pipe.config.text_attention and pipe.processor.tokenizer.padding_side != "right":
        raise ValueError("The latent cache keeps each caption's first tokens: the tokenizer must pad on the right.")
    temporary = f"{folder}.tmp-{os.getpid()}"
    start_time = time.perf_counter()
    workers = args.latent_cache_workers
    if workers > 1 and device.type != "cpu":
        raise ValueError(
            f"--latent_cache_workers > 1 builds the cache in forked CPU processes; on {device.type} pass 1."
        )
    dataset = load_mg2_dataset(args.dataset, split="train")
    if workers == 1:
        parts = [cache_part(pipe, dataset, temporary, device, rank=0, world_size=1, sketch_timbre=args.sketch_timbre)]
    else:
        _FORK_STATE.update(
            pipe=pipe,
            dataset=dataset,
            temporary=temporary,
            device=device,
            world_size=workers,
            sketch_timbre=args.sketch_timbre,
        )
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_cache_part_in_worker, range(workers))
        _FORK_STATE.clear()
    counts = {key: sum(part[key] for part in parts) for key in ("rows", "skipped_rows", "shards")}
    os.makedirs(temporary, exist_ok=True)
    with open(os.path.join(temporary, "cache_info.json"), "w") as handle:
        json.dump(
            {**counts, "workers": workers, "seconds": round(time.perf_counter() - start_time, 1)}, handle, indent=2
        )
    try:
        os.replace(temporary, folder)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(temporary)
    if counts["skipped_rows"]:
        logger.warning(f"{counts['skipped_rows']} corrupt rows skipped while building the latent cache.")
    logger.info(f"Latent cache {folder}: {counts['rows']} rows.")


def cache_part(
    pipe,
    dataset,
    temporary: str,
    device,
    rank: int,
    world_size: int,
    sketch_timbre: str = "plain",
    rows_per_shard: int = 512,
    batch_size: int = 32,
) -> dict:
    """Cache this part's rows (`split_dataset_by_node`) into `temporary/train-RANK-NNNNN.parquet`. A batch that fails
    to decode is redone row by row: bad rows are skipped and counted."""
    import pyarrow as pa
    from datasets.distributed import split_dataset_by_node

    schema = pa.schema(
        [
            ("clip_id", pa.string()),
            ("caption", pa.string()),
            ("latents", pa.binary()),
            ("latents_shape", pa.list_(pa.int32())),
            ("melody_notes", pa.list_(pa.list_(pa.float64()))),
            ("text_embeds", pa.list_(pa.float32())),
            ("retrieved_embeds", pa.list_(pa.float32())),
            ("melody_frames", pa.binary()),
            ("melody_frames_shape", pa.list_(pa.int32())),
            ("text_states", pa.binary()),
            ("text_states_shape", pa.list_(pa.int32())),
        ]
    )
    shard, counts = [], {"rows": 0, "skipped_rows": 0, "shards": 0}

    def add(batch: list[dict]) -> None:
        try:
            shard.extend(cache_rows(pipe, batch, device, sketch_timbre))
        except ValueError:
            if len(batch) == 1:
                counts["skipped_rows"] += 1
                return
            for row in batch:
                add([row])

    def flush() -> None:
        write_shard(shard, os.path.join(temporary, f"train-{rank:02d}-{counts['shards']:05d}.parquet"), schema)
        counts["rows"] += len(shard)
        counts["shards"] += 1
        shard.clear()

    if world_size > 1:
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    desc = "Latent cache (once per VAE, CLMP, index and dataset)" + (
        f", part {rank + 1}/{world_size}" if world_size > 1 else ""
    )
    batch = []
    for row in tqdm(dataset, desc=desc, position=rank):
        batch.append(row)
        if len(batch) == batch_size:
            add(batch)
            batch = []
            if len(shard) >= rows_per_shard:
                flush()
    if batch:
        add(batch)
    if shard:
        flush()
    return counts


_FORK_STATE = {}  # what forked cache workers inherit from build_latent_cache


def _cache_part_in_worker(rank: int) -> dict:
    torch.set_num_threads(1)
    state = _FORK_STATE
    return cache_part(
        state["pipe"],
        state["dataset"],
        state["temporary"],
        state["device"],
        rank,
        state["world_size"],
        state["sketch_timbre"],
    )


def build_condition(pipe, batch: dict, args, empty_text: tuple, generator: torch.Generator, device):
    """The pooled [text ‖ melody] condition, the melody frames (None without an aligned melody) and the caption's token
    states and mask (None without `text_attention`) of a batch of crops, with the text, the melody or both dropped for
    guidance (`mg2_pipeline.conditioning`; `empty_text`: the dropped text's embedding, token states and mask)."""
    empty, empty_states, empty_mask = empty_text
    text = batch["text_embeds"].to(device)
    frames = batch["melody_frames"].to(device) if "melody_frames" in batch else None
    if args.condition == "text":
        melody = text
    else:
        own = pipe.clmp.get_melody_features(
            batch["melody_input_ids"].to(device), batch["melody_attention_mask"].to(device)
        )
        use_own = (torch.rand(len(text), generator=generator) < args.gt_melody_prob)[:, None].to(device)
        melody = torch.where(use_own, own, batch["retrieved_embeds"].to(device))
    draw = torch.rand(len(text), generator=generator).to(device)
    drop_both = draw < args.condition_dropout
    drop_text, drop_melody = drop_both, drop_both
    if args.condition != "text":  # the ablation's melody half is its text: only both can be dropped
        drop_text = drop_both | (
            (draw >= args.condition_dropout) & (draw < args.condition_dropout + args.text_dropout)
        )
        drop_melody = drop_both | (
            (draw >= args.condition_dropout + args.text_dropout)
            & (draw < args.condition_dropout + args.text_dropout + args.melody_dropout)
        )
    condition = pooled_condition(text, melody, empty, drop_text, drop_melody)
    if frames is not None:
        frames = melody_frames_condition(frames, drop_melody)
    states = mask = None
    if pipe.config.text_attention:
        states, mask = text_states_condition(
            batch["text_states"].to(device), batch["text_mask"].to(device), empty_states, empty_mask, drop_text
        )
    return condition, frames, states, mask


@torch.no_grad()
def guided_target(
    teacher: MG2Pipeline,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    condition: torch.Tensor,
    melody_frames: torch.Tensor | None,
    text_states: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    empty_text: tuple,
    guidance_scale: float,
) -> torch.Tensor:
    """The teacher's prediction guided as the pipeline guides it at equal text and melody scales (its
    `predict_noise`): the full condition against the one with text and melody dropped."""
    empty, empty_states, empty_mask = empty_text
    half = condition.shape[1] // 2
    dropped = pooled_condition(condition[:, :half], condition[:, half:], empty, drop_text=True, drop_melody=True)
    if text_states is not None:
        dropped_states, dropped_mask = text_states_condition(text_states, text_mask, empty_states, empty_mask, True)
        text_states, text_mask = torch.cat([text_states, dropped_states]), torch.cat([text_mask, dropped_mask])
    if melody_frames is not None:
        melody_frames = torch.cat([melody_frames, melody_frames_condition(melody_frames, True)])
    guidance = GuidanceInputs(
        (False, False, True), torch.cat([condition, dropped]), text_states, text_mask, melody_frames
    )
    window = slice(0, noisy_latents.shape[2])
    return teacher.predict_noise(
        noisy_latents, torch.cat([timesteps] * 2), guidance, window, guidance_scale, guidance_scale, None
    )


def decoded_spectral_convergence(vae, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Spectral convergence between the frozen VAE's log-mel decodings of predicted and target latents (scaled as the
    UNet sees them); gradients reach the prediction only."""
    with torch.no_grad():
        target_mel = vae.decode(target / vae.config.scaling_factor).sample
    return spectral_convergence(vae.decode(prediction / vae.config.scaling_factor).sample, target_mel)


def main(argv=None):
    args = parse_args(argv)
    accelerator = create_accelerator(args, args.gradient_accumulation_steps)

    # Frozen CLMP, retriever and VAE; the UNet trains.
    aligned_melody = {"keep": "default", "none": None}.get(args.aligned_melody, args.aligned_melody)
    if args.condition == "text":
        aligned_melody = None
    text_attention = {"keep": "default", "on": True, "off": False}[args.text_attention]
    if args.pipeline.startswith("preset:"):
        pipe = build_pipeline(
            args.pipeline.split(":", 1)[1], aligned_melody=aligned_melody, text_attention=text_attention
        )
    else:
        pipe = MG2Pipeline.from_pretrained(args.pipeline)
        if aligned_melody not in ("default", pipe.config.aligned_melody):
            raise SystemExit(
                f"{args.pipeline} has aligned_melody={pipe.config.aligned_melody!r}; its UNet cannot change to "
                f"{aligned_melody!r}: start from a preset (--pipeline preset:NAME)."
            )
        if text_attention not in ("default", pipe.config.text_attention):
            raise SystemExit(
                f"{args.pipeline} has text_attention={pipe.config.text_attention}; its UNet cannot change: "
                "start from a preset (--pipeline preset:NAME)."
            )
    if pipe.config.get("distilled_guidance_scale") is not None and not args.use_lora:
        raise SystemExit(
            f"{args.pipeline} is guidance-distilled: its UNet gives a guided prediction, not the data. Train (or "
            "distil) from the model it was distilled from."
        )
    if args.decoded_spectral_weight and (args.prediction_type or pipe.scheduler.config.prediction_type) != "sample":
        raise SystemExit(
            "--decoded_spectral_weight decodes the predicted latents: it needs --prediction_type sample; "
            f"{args.pipeline} predicts {pipe.scheduler.config.prediction_type!r}."
        )
    parts = dict(pipe.components)
    if args.clmp:
        parts.update(
            clmp=CLMPModel.from_pretrained(args.clmp).eval(), processor=CLMPProcessor.from_pretrained(args.clmp)
        )
    if args.retriever:
        parts["retriever"] = MelodyRetriever.from_pretrained(args.retriever)
    if args.vae:
        parts["vae"] = load_vae(args.vae)
    if args.vocoder:
        parts["vocoder"] = load_vocoder(args.vocoder)
    pipe = MG2Pipeline(
        **parts,
        condition=args.condition,
        aligned_melody=pipe.config.aligned_melody,
        text_attention=pipe.config.text_attention,
        # a LoRA on a distilled UNet keeps its one-pass guidance
        distilled_guidance_scale=args.distill_guidance or pipe.config.get("distilled_guidance_scale"),
    )
    pipe.set_progress_bar_config(disable=True)
    teacher = None
    if args.distill_guidance is not None:
        # DDPM's scale_model_input is the identity for any batch of timesteps, as in training.
        teacher_unet = copy.deepcopy(pipe.unet).requires_grad_(False).eval().to(accelerator.device)
        teacher = MG2Pipeline(
            **{**parts, "unet": teacher_unet, "scheduler": DDPMScheduler.from_config(pipe.scheduler.config)},
            condition=args.condition,
            aligned_melody=pipe.config.aligned_melody,
            text_attention=pipe.config.text_attention,
        )
    for frozen in (pipe.clmp, pipe.vae, pipe.vocoder):
        frozen.requires_grad_(False).eval().to(accelerator.device)
    unet = pipe.unet
    if args.use_lora:
        from peft import LoraConfig

        # Attention projections and the ResBlocks' convolutions and FiLM (time + condition) projections.
        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=args.rank,
                lora_alpha=args.rank,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"],
            )
        )
    unet.train()
    frames_multiple = pipe.frames_multiple
    frames = int(round(args.clip_seconds * pipe.sampling_rate / pipe.hop_length))
    if frames % frames_multiple:
        raise SystemExit(
            f"--clip_seconds {args.clip_seconds} gives {frames} mel frames; use a multiple of {frames_multiple} "
            f"frames ({frames_multiple * pipe.hop_length / pipe.sampling_rate:.2f} s)."
        )
    if args.prediction_type is not None:
        if teacher is not None and args.prediction_type != pipe.scheduler.config.prediction_type:
            raise SystemExit(
                f"--prediction_type {args.prediction_type}: the student learns its teacher's prediction, which is "
                f"{pipe.scheduler.config.prediction_type!r}; leave --prediction_type out."
            )
        pipe.scheduler.register_to_config(prediction_type=args.prediction_type)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    # EMA of the full UNet; a LoRA run trains a small adapter and keeps none (as diffusers' LoRA examples).
    ema = (
        None
        if args.use_lora
        else EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=type(unet), model_config=unet.config)
    )
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    optimizer = torch.optim.AdamW(
        [p for p in unet.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.adam_weight_decay
    )
    lr_scheduler = learning_rate_schedule(args, optimizer, accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)

    cache = latent_cache_dir(pipe, args)
    with accelerator.main_process_first():
        if not os.path.isdir(cache):
            build_latent_cache(pipe, args, cache, accelerator.device)
    with open(os.path.join(cache, "cache_info.json")) as handle:
        cache_info = json.load(handle)
    dataset = load_dataset(
        "parquet", data_files=sorted(glob.glob(os.path.join(cache, "*.parquet"))), split="train", streaming=True
    )
    frame_seconds = pipe.vae_scale_factor * pipe.hop_length / pipe.sampling_rate
    transform = LatentCrop(
        frames // pipe.vae_scale_factor,
        frame_seconds,
        seed=args.seed,
        max_melody_length=pipe.processor.melody_max_length,
        max_text_length=pipe.processor.max_text_length,
    )
    empty_text = (
        pipe.encode_text([DROPPED_TEXT], accelerator.device),
        *pipe.encode_text_states([DROPPED_TEXT], accelerator.device),
    )

    decoded_spectral_start = {"all": 0, "decay": args.max_train_steps - decay_steps(args)}[args.decoded_spectral_steps]

    def decoded_spectral_trained(step: int) -> dict:
        """The decoded-mel term the steps before `step` trained with: saved with each checkpoint, and a resumed run
        must agree with it."""
        trained = args.decoded_spectral_weight > 0 and step > decoded_spectral_start
        return {"decoded_spectral": [args.decoded_spectral_weight, decoded_spectral_start] if trained else None}

    global_step, epoch, batches_in_epoch = start_run(
        accelerator, args, "train_mg2", logger, decoded_spectral_trained, lr_scheduler=lr_scheduler
    )
    logger.info(f"***** Training the MG2 UNet ({args.condition}) *****")
    logger.info(
        f"  UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters; global batch "
        f"{args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps}; steps {args.max_train_steps}"
    )

    # Per-batch randomness (noise, timesteps, melody choice, dropout) comes from a generator seeded by
    # (seed, process, epoch, batch), so a resumed run draws exactly what the uninterrupted one would have.
    guard = NonFiniteLossGuard(accelerator, args.max_nonfinite_steps)
    progress = TrainingProgress(accelerator, args, global_step)
    losses, skipped_rows = [], 0
    while global_step < args.max_train_steps:
        loader = epoch_dataloader(dataset, transform, args, accelerator, epoch, batches_in_epoch)
        for batch in loader:
            batches_in_epoch += 1
            generator = torch.Generator().manual_seed(
                args.seed * 1_000_003 + accelerator.process_index * 7919 + epoch * 100_003 + batches_in_epoch
            )
            latents = batch["latents"].to(accelerator.device)
            condition, melody_frames, text_states, text_mask = build_condition(
                pipe, batch, args, empty_text, generator, accelerator.device
            )
            noise = torch.randn(latents.shape, generator=generator).to(latents.device)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator
            ).to(latents.device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            guided = None
            if teacher is not None:
                guided = guided_target(
                    teacher, noisy, timesteps, condition, melody_frames, text_states, text_mask, empty_text,
                    args.distill_guidance,
                )  # fmt: skip
            if melody_frames is not None:
                noisy = torch.cat([noisy, melody_frames], dim=1)
            decoding = args.decoded_spectral_weight > 0 and global_step >= decoded_spectral_start
            with accelerator.accumulate(unet):
                prediction = unet(
                    noisy,
                    timesteps,
                    encoder_hidden_states=text_states,
                    encoder_attention_mask=text_mask,
                    class_labels=condition,
                ).sample
                target = {"epsilon": noise, "sample": latents}.get(prediction_type) if guided is None else guided
                if target is None:
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if args.snr_gamma is not None:  # min(SNR, γ) on the x0 error, in each target's units
                    snr = compute_snr(noise_scheduler, timesteps)
                    loss = (
                        loss
                        * torch.clamp(snr, max=args.snr_gamma)
                        / {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[prediction_type]
                    )
                loss = loss.mean()
                if decoding:
                    decoded_loss = decoded_spectral_convergence(pipe.vae, prediction.float(), target.float())
                    loss = loss + args.decoded_spectral_weight * decoded_loss
                if guard.should_skip(loss):
                    logger.warning(f"Non-finite loss at step {global_step}: step skipped ({guard.skipped} so far).")
                    optimizer.zero_grad()
                    continue
                optimizer_step(accelerator, loss, optimizer, lr_scheduler, unet.parameters(), args.max_grad_norm)
            progress.add_samples(len(latents))
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(accelerator.unwrap_model(unet).parameters())
            global_step += 1
            losses.append(loss.item())
            logs = {
                "loss": loss.item(),
                "lr": lr_scheduler.get_last_lr()[0],
                "skipped_steps": guard.skipped,
                "samples_per_second": progress.samples_per_second(),
            }
            if decoding:
                logs["decoded_spectral_convergence"] = decoded_loss.item()
            progress.end_step(
                global_step,
                logs,
                epoch=epoch,
                batches_in_epoch=batches_in_epoch,
                **decoded_spectral_trained(global_step),
            )
            if accelerator.is_main_process and (
                global_step % args.validation_steps == 0 or global_step == args.max_train_steps
            ):
                validate(pipe, accelerator, ema, args, global_step)
            if global_step >= args.max_train_steps:
                break
        else:
            epoch, batches_in_epoch = epoch + 1, 0
        skipped_rows += loader.dataset.skipped
        if loader.dataset.skipped:
            logger.warning(
                f"{loader.dataset.skipped} corrupt rows skipped (process {accelerator.process_index}).",
                main_process_only=False,
            )

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pipe.unet.eval()
        if args.use_lora:
            pipe.unet.save_lora_adapter(args.output_dir)  # the adapter only; apply with MG2Pipeline.load_lora_weights
        else:
            ema.copy_to(pipe.unet.parameters())
            pipe.save_pretrained(args.output_dir)
        figures = progress.summary(global_step, guard)
        summary = write_training_summary(
            args.output_dir,
            {"loss": losses},
            **figures,
            steps_per_second=round(len(losses) / figures["seconds"], 3),
            condition=args.condition,
            aligned_melody=pipe.config.aligned_melody,
            text_attention=pipe.config.text_attention,
            distilled_guidance_scale=pipe.config.get("distilled_guidance_scale"),
            sketch_timbre=args.sketch_timbre,
            **(
                dict(
                    decoded_spectral_weight=args.decoded_spectral_weight,
                    decoded_spectral_from_step=decoded_spectral_start,
                )
                if args.decoded_spectral_weight > 0
                else {}
            ),
            clip_seconds=args.clip_seconds,
            skipped_rows_main_process=skipped_rows,
            skipped_rows_latent_cache=cache_info["skipped_rows"],
            latent_cache=cache,
        )
        if not args.use_lora:
            write_model_card(
                args.output_dir,
                datasets=[os.path.basename(os.path.normpath(args.dataset))],
                dataset_description=describe_dataset(args.dataset),
                repo_id=args.hub_model_id,
                limitations=MG2_FOLK_LIMITATIONS,
                model_description=describe_mg2_model(args.output_dir, pipe),
            )
        logger.info(f"Saved the pipeline to {args.output_dir}: {summary}")
        push_output_dir(args)
    finish_run(accelerator, unet)


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
        output = pipe(
            args.validation_prompt,
            num_inference_steps=args.validation_inference_steps,
            audio_length_in_s=args.clip_seconds,
            generator=torch.Generator().manual_seed(args.seed),
        )
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
