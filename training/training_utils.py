"""Training code shared by the recipes in this folder: checkpoints, resuming, and the non-finite-loss guard."""

from __future__ import annotations

import json
import os
import shutil

import torch
import yaml
from accelerate import Accelerator

CHECKPOINT_PREFIX = "checkpoint-"
MODEL_CARD_TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_card.md")
DEFAULT_LIMITATIONS = (
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


def write_model_card(model_dir: str, evaluation: str = "Not evaluated yet: run `training/evaluate.py`.",
                     dataset_description: str | None = None, model_description: str | None = None,
                     datasets: list[str] | None = None, repo_id: str | None = None) -> str:
    """Render `model_card.md` (huggingface_hub `ModelCard` Jinja template) into `model_dir/README.md`."""
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-audio", license="apache-2.0",
                              tags=["music", "text-to-music", "melody", "mg2", "audio"], datasets=datasets or None)
    card = ModelCard.from_template(
        card_data, template_path=MODEL_CARD_TEMPLATE, model_name=os.path.basename(os.path.normpath(model_dir)),
        repo_id=repo_id or os.path.basename(os.path.normpath(model_dir)), evaluation=evaluation,
        dataset_description=dataset_description or "See the dataset card of the training data.",
        model_description=model_description or "See `model_index.json` and the component configs.",
        limitations=DEFAULT_LIMITATIONS,
    )
    path = os.path.join(model_dir, "README.md")
    card.save(path)
    return path


def describe_dataset(dataset: str) -> str:
    """One paragraph about an MG2 dataset for a model card (from its summary.json when it is a local folder)."""
    summary_path = os.path.join(dataset, "summary.json")
    if not os.path.isfile(summary_path):
        return f"The MG2-format dataset `{dataset}`."
    with open(summary_path) as handle:
        summary = json.load(handle)
    sources = ", ".join(f"{name} {count}" for name, count in summary.get("sources", {}).items())
    return (f"`{os.path.basename(os.path.normpath(dataset))}`: {summary['clips']} clips, {summary['hours']} hours, "
            f"{summary['tunes']} tunes from music21's corpus ({sources}), rendered with a General-MIDI SoundFont; "
            f"splits by tune: {summary.get('clips_per_split')}.")


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoint folders (`checkpoint-N`, never a `.tmp` being written), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX):].isdigit()]
    return [os.path.join(output_dir, d) for d in sorted(names, key=lambda d: int(d[len(CHECKPOINT_PREFIX):]))]


def save_checkpoint(accelerator: Accelerator, output_dir: str, total_limit: int | None, global_step: int,
                    **training_state) -> str:
    """`accelerator.save_state` into `checkpoint-N`: written to `checkpoint-N.tmp` and renamed when complete,
    so a run killed mid-write never leaves a folder that `latest` would pick. Keeps the newest `total_limit`."""
    if accelerator.is_main_process and total_limit:
        existing = checkpoint_dirs(output_dir)
        for old in existing[: max(0, len(existing) - total_limit + 1)]:
            shutil.rmtree(old)
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    temporary = final + ".tmp"
    accelerator.save_state(temporary)
    if accelerator.is_main_process:
        with open(os.path.join(temporary, "training_state.json"), "w") as handle:
            json.dump({"global_step": global_step, **training_state}, handle)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(temporary, final)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator: Accelerator, output_dir: str, resume_from_checkpoint: str | None) -> dict:
    """Load `resume_from_checkpoint` (a folder, or `latest` in `output_dir`) and return its training state
    plus `checkpoint` (its path); `{}` when there is nothing to resume."""
    if not resume_from_checkpoint:
        return {}
    path = resume_from_checkpoint
    if path == "latest":
        existing = checkpoint_dirs(output_dir)
        if not existing:
            return {}
        path = existing[-1]
    accelerator.load_state(path)
    with open(os.path.join(path, "training_state.json")) as handle:
        return {**json.load(handle), "checkpoint": path}


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
