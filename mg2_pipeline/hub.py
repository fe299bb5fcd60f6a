"""Sharing MG2 checkpoints on the Hugging Face Hub: model cards, and pushing a saved folder.

Downloading needs nothing of ours: `MG2Pipeline.from_pretrained("org/name", revision=...)`,
`DiffusionPipeline.from_pretrained("org/name", trust_remote_code=True)` or `huggingface_hub.snapshot_download`
fill the usual HF cache (`HF_HOME`), which later loads use offline (`HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import os

MODEL_CARD_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_card.md")
GENERIC_LIMITATIONS = "Not documented by the uploader: see the training data and evaluation sections."
# Left out of every push, as diffusers' training examples do: resumable training state and logs.
TRAINING_STATE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "*.tmp", "*.tmp/**", "logs/**"]


def write_model_card(
    model_dir: str,
    evaluation: str = "Not evaluated yet: run `training/evaluate.py`.",
    dataset_description: str | None = None,
    model_description: str | None = None,
    datasets: list[str] | None = None,
    repo_id: str | None = None,
    limitations: str = GENERIC_LIMITATIONS,
) -> str:
    """Render the MG2 model card template (a huggingface_hub `ModelCard` Jinja template) into `model_dir/README.md`."""
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-audio",
        license="apache-2.0",
        tags=["music", "text-to-music", "melody", "mg2", "audio"],
        datasets=datasets or None,
    )
    name = os.path.basename(os.path.normpath(model_dir))
    # Loaded as remote code (this file copied into a checkpoint), the template is not beside us: use the Hub's default.
    template = MODEL_CARD_TEMPLATE if os.path.isfile(MODEL_CARD_TEMPLATE) else None
    card = ModelCard.from_template(
        card_data,
        template_path=template,
        model_name=name,
        repo_id=repo_id or name,
        evaluation=evaluation,
        dataset_description=dataset_description or "See the dataset card of the training data.",
        model_description=model_description or "See `model_index.json` and the component configs.",
        limitations=limitations,
    )
    path = os.path.join(model_dir, "README.md")
    card.save(path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def describe_pipeline(pipe) -> str:
    """A markdown list of an `MG2Pipeline`'s components: class, parameters, and what the index holds."""
    aligned = pipe.config.get("aligned_melody")
    pooled_only = " (pooled only)" if pipe.config.condition == "text_melody" else ""
    lines = [
        f"Condition: `{pipe.config.condition}`"
        + (f" with the time-aligned melody `{aligned}`" if aligned else pooled_only)
        + (", the UNet attending to the prompt's token states" if pipe.config.get("text_attention") else "")
        + f", {pipe.scheduler.config.prediction_type} prediction; {pipe.sampling_rate} Hz audio, trained length "
        f"{pipe.default_audio_length_in_s:.2f} s, {pipe.default_num_inference_steps} steps by default for its task."
        + (
            f" Guidance-distilled: one UNet pass per step gives the prediction guided at scale "
            f"{pipe.config.get('distilled_guidance_scale'):g}, so guidance defaults to 1."
            if pipe.config.get("distilled_guidance_scale") is not None
            else ""
        ),
        "",
    ]
    for name, component in pipe.components.items():
        if component is None:
            continue
        detail = type(component).__name__
        if name == "retriever":
            detail += f", {len(component)} melodies"
        elif hasattr(component, "parameters"):
            count = sum(p.numel() for p in component.parameters())
            detail += f", {count / 1e6:.2f} M parameters" if count else ", no trained parameters"
        lines.append(f"- `{name}`: {detail}")
    return "\n".join(lines)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
):
    """Upload a saved folder (pipeline, CLMP, VAE, …) to the model repo `repo_id`, creating the repo (and the
    branch `revision`) when missing. Training checkpoints and logs are left out. Returns the `CommitInfo`."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"folder {folder!r} is not a directory: save the model first (save_pretrained).")
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"repo_id must look like 'name' or 'org/name', got {repo_id!r}.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload {os.path.basename(os.path.normpath(folder))}",
            ignore_patterns=TRAINING_STATE_PATTERNS,
        )
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code in (401, 403):
            raise PermissionError(
                f"{api.endpoint} refused to let you push to {repo_id} (HTTP {error.response.status_code}): a write token is "
                "needed. Pass token=... (--hub_token), set HF_TOKEN, or run `hf auth login`."
            ) from error
        raise
