"""Training code shared by the recipes in this folder: arguments, the Accelerator, streamed epochs, checkpoints and
resuming, the non-finite-loss guard, summaries and model cards."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable

import torch
import yaml
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import get_wsd_schedule

from mg2_pipeline.hub import describe_pipeline, push_folder
from mg2_pipeline.threads import FIT_EVERY_STEPS, fit_threads

CHECKPOINT_PREFIX = "checkpoint-"
MG2_FOLK_LIMITATIONS = (
    "Trained on a few hours of SoundFont-rendered folk tunes (mg2-folk) on CPU: expect simple timbres, "
    "General-MIDI instruments and a Griffin-Lim vocoder's phasiness, not studio audio. Captions are "
    "templated, so free-form prompts far from them retrieve and generate less reliably."
)


def load_config_defaults(parser, argv, script_file: str):
    """`--config FILE`: the section of a preset file (`training/configs/*.yaml`) named after the script
    (`train_vae`, …) becomes the parser's defaults; flags on the command line still win. Returns `argv`."""
    known, _ = parser.parse_known_args(argv)
    if known.config:
        script = os.path.splitext(os.path.basename(script_file))[0]
        with open(known.config) as handle:
            values = (yaml.safe_load(handle) or {}).get(script, {})
        unknown = sorted(set(values) - {action.dest for action in parser._actions})
        if unknown:
            parser.error(f"{known.config}: unknown settings for {script}: {unknown}")
        parser.set_defaults(**values)
    return argv


def push_output_dir(args) -> None:
    """With `--push_to_hub`: upload the saved output_dir to `--hub_model_id`, leaving out checkpoints and logs."""
    if args.push_to_hub:
        repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
        commit = push_folder(args.output_dir, repo_id, token=args.hub_token, commit_message="End of training")
        logging.getLogger(__name__).info(f"Pushed {args.output_dir} to {repo_id} at revision {commit.oid}")


def describe_mg2_model(model_dir: str, pipe) -> str:
    """The model card's model paragraph for a pipeline trained by train_mg2.py (from its training_summary.json)."""
    summary_path = os.path.join(model_dir, "training_summary.json")
    training = ""
    if os.path.isfile(summary_path):
        with open(summary_path) as handle:
            summary = json.load(handle)
        unet_parameters = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
        clips = f"{summary['samples']} clips" + (
            f" of {summary['clip_seconds']} s" if "clip_seconds" in summary else ""
        )
        training = (
            f"UNet {unet_parameters:.1f} M parameters ({summary['condition']} condition), trained "
            f"{summary['steps']} steps on {clips} ({summary['processes']} process(es), "
            f"{summary['seconds'] / 60:.1f} min); frozen CLMP, melody index and VAE"
            + (
                "; each clip's melody sketch rendered with its own random sound"
                if summary.get("sketch_timbre") == "random"
                else ""
            )
            + (
                f"; in steps {summary['decoded_spectral_from_step'] + 1}–{summary['steps']}, plus "
                f"{summary['decoded_spectral_weight']} × the spectral convergence between the VAE's decodings of the "
                "predicted and the target latents"
                if summary.get("decoded_spectral_weight")
                else ""
            )
            + ".\n\n"
        )
    return training + describe_pipeline(pipe)


def describe_dataset(dataset: str) -> str:
    """One paragraph about an MG2 dataset for a model card (from its summary.json when it is a local folder)."""
    summary_path = os.path.join(dataset, "summary.json")
    if not os.path.isfile(summary_path):
        return f"The MG2-format dataset `{dataset}`."
    with open(summary_path) as handle:
        summary = json.load(handle)
    sources = ", ".join(f"{name} {count}" for name, count in summary.get("sources", {}).items())
    return (
        f"`{os.path.basename(os.path.normpath(dataset))}`: {summary['clips']} clips, {summary['hours']} hours, "
        f"{summary['tunes']} tunes from music21's corpus ({sources}), rendered with a General-MIDI SoundFont; "
        f"splits by tune: {summary.get('clips_per_split')}."
    )


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoint folders (`checkpoint-N`, never a `.tmp` being written), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [
        d for d in os.listdir(output_dir) if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return [os.path.join(output_dir, d) for d in sorted(names, key=lambda d: int(d[len(CHECKPOINT_PREFIX) :]))]


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, total_limit: int | None, global_step: int, **training_state
) -> str:
    """`accelerator.save_state` into `checkpoint-N`: written to `checkpoint-N.tmp` and renamed when complete, so a run
    killed mid-write never leaves a folder that `latest` would pick. Then keeps the newest `total_limit`: older ones
    are deleted only once the new one is complete, so a kill at any moment leaves a checkpoint to resume from."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    temporary = final + ".tmp"
    accelerator.save_state(temporary)
    # Every process writes its own random state into the folder: it is complete only when all have.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(temporary, "training_state.json"), "w") as handle:
            json.dump({"global_step": global_step, **training_state}, handle)
        if os.path.isdir(final):  # the same step saved again (a resumed run): the new one replaces it
            shutil.rmtree(final)
        os.replace(temporary, final)
        logging.getLogger(__name__).info(f"Saved checkpoint {final}")
        if total_limit:
            existing = checkpoint_dirs(output_dir)
            for old in existing[: max(0, len(existing) - total_limit)]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resume(
    accelerator: Accelerator,
    output_dir: str,
    resume_from_checkpoint: str | None,
    recipe: dict | Callable[[int], dict] | None = None,
) -> dict:
    """Load `resume_from_checkpoint` (a folder, or `latest` in `output_dir`) and return its training state
    plus `checkpoint` (its path); `{}` when there is nothing to resume. A setting of `recipe` (or of `recipe(step)`,
    the settings a run has trained with by the checkpoint's step) that the checkpoint saved with another value is
    refused before anything loads."""
    if not resume_from_checkpoint:
        return {}
    path = resume_from_checkpoint
    if path == "latest":
        existing = checkpoint_dirs(output_dir)
        if not existing:
            return {}
        path = existing[-1]
    with open(os.path.join(path, "training_state.json")) as handle:
        state = json.load(handle)
    expected = recipe(state["global_step"]) if callable(recipe) else recipe or {}
    for key, value in expected.items():
        if key in state and state[key] != value:
            raise SystemExit(
                f"{path} was trained with {key}={state[key]!r}, this run has {value!r}: resume with the same "
                "settings, or start a new --output_dir."
            )
    accelerator.load_state(path)
    return {**state, "checkpoint": path}


def ema_weights_path(checkpoint: str) -> str:
    """Where a checkpoint folder of `train_mg2.py` keeps its EMA weights (accelerate's first custom object)."""
    return os.path.join(checkpoint, "custom_checkpoint_0.pkl")


def load_ema_weights(model: torch.nn.Module, checkpoint: str) -> None:
    """Copy the EMA weights a checkpoint folder of `train_mg2.py` holds into `model`."""
    path = ema_weights_path(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{checkpoint} holds no EMA weights ({path}): a LoRA run keeps none.")
    state = torch.load(path, map_location="cpu", weights_only=False)
    parameters = list(model.parameters())
    if len(state["shadow_params"]) != len(parameters):
        raise ValueError(
            f"{checkpoint} holds {len(state['shadow_params'])} EMA tensors; the model has {len(parameters)}."
        )
    with torch.no_grad():
        for parameter, shadow in zip(parameters, state["shadow_params"]):
            parameter.copy_(shadow)


class NonFiniteLossGuard:
    """Skips steps whose loss is NaN/inf on any process, and aborts after `patience` in a row."""

    def __init__(self, accelerator: Accelerator, patience: int):
        self.accelerator, self.patience = accelerator, patience
        self.skipped = 0
        self.in_a_row = 0

    def should_skip(self, loss: torch.Tensor) -> bool:
        bad = self.accelerator.gather((~torch.isfinite(loss.detach())).float().reshape(1)).sum().item() > 0
        if not bad:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.patience:
            raise RuntimeError(
                f"The loss was NaN or infinite for {self.in_a_row} steps in a row ({self.skipped} skipped in all); "
                "stopping with the weights of the last good step. Lower --learning_rate or check the data."
            )
        return True


def optimizer_step(accelerator: Accelerator, loss, optimizer, lr_scheduler, parameters, max_grad_norm: float) -> None:
    """Backward, clip the gradient norm when gradients sync, step the optimizer and its schedule, zero the gradients."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()


class TrainingProgress:
    """What every recipe does around its optimizer steps: the progress bar (main process), samples per second, the
    trackers, a checkpoint every `--checkpointing_steps` and at the last step, the figures of the summary, and compute
    threads fitted to the cores other processes leave free (`mg2_pipeline.threads`)."""

    def __init__(self, accelerator: Accelerator, args, global_step: int):
        self.accelerator, self.args = accelerator, args
        self.progress_bar = tqdm(
            range(args.max_train_steps),
            initial=global_step,
            desc="Steps",
            disable=not accelerator.is_local_main_process,
        )
        self.start_time, self.samples_seen = time.perf_counter(), 0
        fit_threads()

    def add_samples(self, batch_size: int) -> None:
        self.samples_seen += batch_size * self.accelerator.num_processes

    def samples_per_second(self) -> float:
        return self.samples_seen / (time.perf_counter() - self.start_time)

    def end_step(self, global_step: int, logs: dict, **training_state) -> None:
        """Show the first figure of `logs` and samples/s, log `logs`, checkpoint `training_state` when due."""
        shown = next(iter(logs))
        self.progress_bar.update(1)
        self.progress_bar.set_postfix(
            {shown: f"{logs[shown]:.4f}", "samples_s": f"{logs['samples_per_second']:.1f}"}, refresh=False
        )
        self.accelerator.log(logs, step=global_step)
        if global_step % FIT_EVERY_STEPS == 0:
            fit_threads()
        if global_step % self.args.checkpointing_steps == 0 or global_step == self.args.max_train_steps:
            save_checkpoint(
                self.accelerator,
                self.args.output_dir,
                self.args.checkpoints_total_limit,
                global_step,
                **training_state,
            )

    def summary(self, global_step: int, guard: NonFiniteLossGuard) -> dict:
        """The figures every `training_summary.json` reports: steps, samples, time, speed, processes, skipped steps."""
        elapsed = time.perf_counter() - self.start_time
        return dict(
            steps=global_step,
            samples=self.samples_seen,
            seconds=round(elapsed, 1),
            samples_per_second=round(self.samples_seen / elapsed, 2),
            processes=self.accelerator.num_processes,
            skipped_steps=guard.skipped,
        )


def add_common_arguments(parser, default_output_dir: str) -> None:
    """The flags every recipe shares: data, output, precision, checkpoints, logging, seed and the Hub."""
    parser.add_argument(
        "--config", default=None, help="A preset file of defaults (training/configs/*.yaml); flags win."
    )
    parser.add_argument("--dataset", default="data/mg2-folk", help="An MG2 dataset folder or Hub dataset id.")
    parser.add_argument("--output_dir", default=default_output_dir)
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--shuffle_buffer_size", type=int, default=1000)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--checkpointing_steps", type=int, default=100)
    parser.add_argument("--checkpoints_total_limit", type=int, default=2)
    parser.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder or 'latest'.")
    parser.add_argument(
        "--max_nonfinite_steps", type=int, default=5, help="Abort after this many NaN/inf losses in a row."
    )
    parser.add_argument("--report_to", default="tensorboard")
    parser.add_argument("--logging_dir", default="logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--push_to_hub",
        action="store_true",
        help="At the end, upload output_dir (without checkpoints and logs) to the Hub.",
    )
    parser.add_argument("--hub_model_id", default=None, help="The repo to push to (default: output_dir's name).")
    parser.add_argument("--hub_token", default=None, help="A write token (default: HF_TOKEN or the saved login).")


def add_schedule_arguments(parser, default_scheduler: str = "constant_with_warmup", default_warmup_steps: int = 20):
    """`--lr_scheduler`, `--lr_decay_fraction` and `--lr_warmup_steps`, for `learning_rate_schedule`."""
    parser.add_argument(
        "--lr_scheduler",
        default=default_scheduler,
        help="A diffusers schedule, or warmup_stable_decay: constant after the warmup, then a linear decay to 0 over "
        "the last --lr_decay_fraction of --max_train_steps (transformers' get_wsd_schedule).",
    )
    parser.add_argument(
        "--lr_decay_fraction",
        type=float,
        default=0.25,
        help="warmup_stable_decay: the share of the steps over which the rate decays (other schedules ignore it).",
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=default_warmup_steps)


def decay_steps(args) -> int:
    """How many of the `--max_train_steps` optimizer steps warmup_stable_decay's learning rate decays over: the last."""
    return max(1, round(args.lr_decay_fraction * args.max_train_steps))


def learning_rate_schedule(args, optimizer, num_processes: int):
    """`--lr_scheduler` for `optimizer`, counted in prepared-scheduler steps: every process steps it once per
    optimizer step."""
    if args.lr_scheduler == "warmup_stable_decay":
        return get_wsd_schedule(
            optimizer,
            num_warmup_steps=args.lr_warmup_steps * num_processes,
            num_decay_steps=decay_steps(args) * num_processes,
            num_training_steps=args.max_train_steps * num_processes,
            decay_type="linear",
        )
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
    )


def parse_arguments(parser, argv, script_file: str, positive: tuple[str, ...] = ()):
    """`parse_args` with `--config` defaults; every name in `positive` must be >= 1, and a `--lr_decay_fraction`
    (`add_schedule_arguments`) in (0, 1]."""
    args = parser.parse_args(load_config_defaults(parser, argv, script_file))
    for name in ("checkpointing_steps", *positive):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 < getattr(args, "lr_decay_fraction", 1) <= 1:
        parser.error(f"--lr_decay_fraction must be in (0, 1], got {args.lr_decay_fraction}")
    return args


def create_accelerator(args, gradient_accumulation_steps: int = 1) -> Accelerator:
    """An Accelerator logging to `output_dir/logs` (tensorboard unless `--report_to none`), seeded, output folder made."""
    from accelerate.utils import ProjectConfiguration, set_seed

    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.report_to != "none" else None,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def start_run(
    accelerator: Accelerator,
    args,
    name: str,
    logger,
    recipe: dict | Callable[[int], dict] | None = None,
    lr_scheduler=None,
) -> tuple[int, int, int]:
    """Resume if asked, start the trackers; returns `(global_step, epoch, batches_in_epoch)`. `recipe`: settings a
    resumed run must share with its checkpoint, or a function of the step giving those trained with by then (save them
    with it: `TrainingProgress.end_step(..., **recipe)`).
    `lr_scheduler`: the prepared schedule, which a resumed run must continue (`check_schedule_continues`)."""
    state = resume(accelerator, args.output_dir, args.resume_from_checkpoint, recipe)
    if state:
        if lr_scheduler is not None:
            check_schedule_continues(lr_scheduler, state["checkpoint"])
        logger.info(f"Resumed from {state['checkpoint']} at step {state['global_step']}")
    if accelerator.is_main_process:
        accelerator.init_trackers(
            name,
            config={key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, bool))},
        )
    return state.get("global_step", 0), state.get("epoch", 0), state.get("batches_in_epoch", 0)


def check_schedule_continues(lr_scheduler, checkpoint: str) -> None:
    """Refuse a resumed run whose learning-rate schedule gives another rate at the checkpoint's step than the one the
    checkpoint trained with: another schedule, another process count, or a decay that a new `--max_train_steps`
    moved would otherwise change the rate without a word."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps the torch scheduler
    saved = scheduler.get_last_lr()
    scheduled = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    if any(abs(a - b) > 1e-9 * max(abs(a), abs(b)) for a, b in zip(saved, scheduled)):
        raise SystemExit(
            f"{checkpoint} trained at learning rate {saved[0]:.3g} at its step; this run's schedule gives "
            f"{scheduled[0]:.3g} there (another --lr_scheduler, number of processes, or a learning-rate decay moved by "
            "--max_train_steps): resume from a checkpoint before the decay, with the same settings, into a new "
            "--output_dir."
        )


def epoch_dataloader(dataset, transform, args, accelerator: Accelerator, epoch: int, skip_batches: int):
    """This process's streamed batches for `epoch`, skipping the first `skip_batches` (resuming mid-epoch)."""
    from mg2_pipeline.data import streaming_dataloader

    loader = streaming_dataloader(
        dataset,
        args.train_batch_size,
        transform,
        args.shuffle_buffer_size,
        seed=args.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=args.dataloader_num_workers,
        skip_examples=skip_batches * args.train_batch_size,
        drop_last=True,
    )
    loader.dataset.set_epoch(epoch)
    return loader


def finish_run(accelerator: Accelerator, *models: torch.nn.Module | None) -> None:
    """End the trackers and the process group, every process together. `models` are what `accelerator.prepare`
    returned: none of them may still hold the process group when it is destroyed."""
    # Every process leaves together: ending while the main process still saves can hang the process group.
    accelerator.wait_for_everyone()
    # A DDP model's reducer holds the process group. Left to die with the model, the group's destructor joins gloo's
    # threads while holding the GIL, and deadlocks if one of them is releasing a tensor, which needs the GIL
    # (pytorch/pytorch#56297). Without the model's references, the group's last owner is its Python object, whose
    # destructor releases the GIL.
    for model in models:
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
        if isinstance(model, DistributedDataParallel):
            del model.logger, model.reducer, model.process_group
    accelerator.end_training()


def write_training_summary(output_dir: str, losses: dict[str, list[float]], **values) -> dict:
    """`training_summary.json`: the given figures plus the mean of the first and last 10 values of each loss."""
    summary = dict(values)
    for name, history in losses.items():
        summary[f"{name}_first_10"] = float(sum(history[:10]) / len(history[:10])) if history else None
        summary[f"{name}_last_10"] = float(sum(history[-10:]) / len(history[-10:])) if history else None
    with open(os.path.join(output_dir, "training_summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def spectral_convergence(reconstruction: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
    """‖exp(mel) − exp(reconstruction)‖_F / ‖exp(mel)‖_F per example, averaged (log-mels in, linear magnitudes
    compared)."""
    target, estimate = mel.exp(), reconstruction.clamp(max=mel.max().item() + 2).exp()
    return ((target - estimate).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1).clamp(min=1e-5)).mean()
