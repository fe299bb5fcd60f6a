"""MG2Pipeline: text → retrieved melody → music.

prompt ──CLMP text tower──► text embedding ──HNSW──► nearest melody (or the user's) ──► its notes, fitted to the length
                                  └──────── [text ‖ melody] condition ────────┘                 │
                                                                     melody sketch frames (time-aligned)
                                                                                                │
noise ──UNet (FiLM on the condition, sketch as extra input channels, text and melody guidance)──► latents
      ──VAE──► log-mel ──vocoder──► waveform
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, SchedulerMixin, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, ProcessorMixin, SpeechT5HifiGan

from .audio import LogMelSpectrogram, load_audio, peak_safe
from .autoencoder_mel import MelAutoencoderKL, vae_scale_factor
from .conditioning import DROPPED_TEXT, melody_frames_condition, pooled_condition
from .defaults import (
    DEFAULT_DISTILLED_NUM_INFERENCE_STEPS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_MELODY_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_X0_NUM_INFERENCE_STEPS,
)
from .hub import describe_pipeline, push_folder, write_model_card
from .melody import Melody
from .retrieval import GuidingMelody, MelodyRetriever
from .vocoder import GriffinLimVocoder
from .vocos_vocoder import VocosVocoder

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("np", "pt", "latent")
# "text_melody": MG2's [text ‖ melody] condition; "text": the text-only ablation, [text ‖ text], same UNet shape.
CONDITIONS = ("text_melody", "text")
# How the guiding melody reaches the UNet beside the pooled [text ‖ melody] FiLM condition (None: pooled only, the paper's
# model). "sketch": the melody as plain harmonic tones → log-mel → the frozen VAE encoder, concatenated with the latents
# (as diffusers' inpainting UNets take their masked-image latents). "roll": 12 pitch-class channels + pitch height.
ALIGNED_MELODY = (None, "sketch", "roll")
ROLL_CHANNELS = 13


def melody_channels(aligned_melody: str | None, latent_channels: int) -> int:
    """UNet input channels the aligned melody adds beside the latents."""
    return {None: 0, "sketch": latent_channels, "roll": ROLL_CHANNELS}[aligned_melody]


# Longer audio is denoised in overlapping windows of the UNet's training length (MultiDiffusion): the cost grows linearly
# with the length and the memory stays that of one window. Consecutive windows share at least 1/32 of a window.
MAX_AUDIO_LENGTH_S = 600.0
WINDOW_OVERLAP = 1 / 32
# A transcribed melody's rests shorter than this are filled: the model renders rests in the melody sketch as silence.
TRANSCRIPTION_MAX_GAP_S = 0.5
MAX_GUIDANCE_SCALE = 100.0
# Bounds on the work one call may ask for.
MAX_INFERENCE_STEPS = 1000
MAX_WAVEFORMS = 64  # prompts × num_waveforms_per_prompt
MAX_PROMPT_CHARACTERS = 2000
MAX_LATENT_NOISE = 1000.0  # × the scheduler's init_noise_sigma; standard normal noise never comes near
BPM_PATTERN = re.compile(r"(\d+(?:\.\d+)?)\s*bpm\b", re.IGNORECASE)


def prompt_bpm(prompt: str) -> float | None:
    """The tempo a prompt names ("… 120 BPM"), or None."""
    match = BPM_PATTERN.search(prompt)
    return float(match.group(1)) if match and 20 <= float(match.group(1)) <= 400 else None


def check_number(name: str, value, low: float, high: float, integer: bool = False) -> None:
    """A `TypeError` unless `value` is a real number (an integer if `integer`; numpy scalars count, bool does not),
    a `ValueError` unless it lies in [low, high] (NaN never does); both name the argument and the range."""
    expected = f"{'an integer' if integer else 'a number'} between {_plain(low)} and {_plain(high)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__}).")
    if not low <= value <= high:
        raise ValueError(f"{name} must be {expected}, got {value!r}.")


def _plain(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def check_tensor(name: str, value, shape: tuple) -> None:
    """A `TypeError` unless `value` is a floating-point tensor, a `ValueError` unless it has `shape` (None: any size)
    and only finite values."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {kind}.")
    if value.ndim != len(shape) or any(
        size is not None and size != actual for size, actual in zip(shape, value.shape)
    ):
        expected = "(" + ", ".join("any" if size is None else str(size) for size in shape) + ")"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}.")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} has NaN or infinite values.")


def check_embeddings(name: str, value, shape: tuple) -> None:
    """As `check_tensor`, and every row must have unit length, as CLMP's embeddings have (the UNet knows no others)."""
    check_tensor(name, value, shape)
    norms = value.float().norm(dim=-1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-2):
        raise ValueError(
            f"{name} must be CLMP embeddings, every row of unit length; got row norms {norms.tolist()[:4]}."
        )


def window_starts(total: int, window: int, overlap: int, multiple: int) -> list[int]:
    """Starts of the fewest `window`-long windows covering `total` frames with consecutive windows sharing at least
    `overlap` frames, spread evenly (the last ends at `total`), each a multiple of `multiple`; `[0]` when one fits."""
    if total <= window:
        return [0]
    count = math.ceil((total - window) / (window - overlap)) + 1
    last = total - window
    starts = [int(i * last / (count - 1)) // multiple * multiple for i in range(count - 1)]
    return starts + [last]


def fade_ramp(length: int, overlap: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Weights for cross-fading overlapping windows: 1 inside, linear ramps over `overlap` frames at both ends (never 0)."""
    position = torch.arange(length, device=device, dtype=torch.float64)
    ramp = torch.minimum(position + 1, length - position) / (overlap + 1)
    return ramp.clamp(max=1).to(dtype)


def map_in_windows(
    function: Callable,
    inputs: torch.Tensor,
    dim: int,
    window: int,
    overlap: int,
    multiple: int,
    scale: float,
    out_dim: int | None = None,
) -> torch.Tensor:
    """`function` applied to overlapping `window`-long pieces of `inputs` along `dim` (one call when it fits), its outputs
    (`scale` frames per input frame, along `out_dim`, default `dim`) cross-faded over the overlaps: memory bounded by
    one window."""
    out_dim = dim if out_dim is None else out_dim
    total = inputs.shape[dim]
    starts = window_starts(total, window, overlap, multiple)
    if len(starts) == 1:
        return function(inputs)
    output = weights = None
    for start in starts:
        piece = function(inputs.narrow(dim, start, window))
        ramp = fade_ramp(piece.shape[out_dim], round(overlap * scale), piece.device, piece.dtype)
        if output is None:
            size = list(piece.shape)
            size[out_dim] = round(total * scale)
            output, weights = piece.new_zeros(size), piece.new_zeros(size[out_dim])
        view = [1] * piece.ndim
        view[out_dim] = -1
        output.narrow(out_dim, round(start * scale), piece.shape[out_dim]).add_(piece * ramp.view(view))
        weights.narrow(0, round(start * scale), piece.shape[out_dim]).add_(ramp)
    return output / weights.view(view)


def _is_own_module(name: str) -> bool:
    """Whether `name` is a module of this package (as `save_pretrained` writes them into `model_index.json`)."""
    return re.fullmatch(r"\w+", name) is not None and os.path.isfile(
        os.path.join(os.path.dirname(__file__), f"{name}.py")
    )


def _copy_module_with_imports(module: str, target_dir: str) -> None:
    """Copy `{module}.py` of this package and every module it imports relatively into `target_dir`."""
    from diffusers.utils.dynamic_modules_utils import get_relative_import_files, get_relative_imports

    source = os.path.join(os.path.dirname(__file__), f"{module}.py")
    needed = sorted(set(get_relative_import_files(source)))
    # diffusers' loader copies only the modules a remote-code file imports itself, not their imports.
    indirect = {os.path.basename(path)[:-3] for path in needed} - set(get_relative_imports(source))
    if indirect:
        raise RuntimeError(f"{module}.py must import {sorted(indirect)} directly to load as remote code.")
    os.makedirs(target_dir, exist_ok=True)
    for path in [source, *needed]:
        shutil.copy(path, os.path.join(target_dir, os.path.basename(path)))


@dataclass
class Conditioning:
    """What one call is conditioned on, one row per waveform: the prompts (as text and CLMP embeddings), the negative
    prompt's embeddings, the melody's embedding and its time-aligned frames. A callback may replace the embeddings."""

    prompts: list[str] | None
    negative_prompt: str | list[str] | None
    num_waveforms_per_prompt: int
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    melody_embeds: torch.Tensor | None = None
    melody_frames: torch.Tensor | None = None
    # With `text_attention`: (token states, attention mask) of the prompts and of the negative prompts, one row per
    # prompt, from the same pass of the text tower as their embeddings.
    text_states: tuple[torch.Tensor, torch.Tensor] | None = None
    negative_text_states: tuple[torch.Tensor, torch.Tensor] | None = None


class GuidanceInputs(NamedTuple):
    """What the UNet takes for one set of guidance terms (`MG2Pipeline.prepare_guidance_inputs`)."""

    terms: tuple[bool, bool, bool]
    condition: torch.Tensor
    text_states: torch.Tensor | None
    text_mask: torch.Tensor | None
    melody_frames: torch.Tensor | None


@dataclass
class MG2PipelineOutput(BaseOutput):
    """Generated audio and the melody that guided each waveform.

    Args:
        audios: `(batch, samples)` waveforms (numpy or torch) within [-1, 1] (one peaking above 1 is scaled down to
            peak at 1, `audio.peak_safe`), or latents for `output_type="latent"`.
        melodies: per waveform, a `GuidingMelody` — from the index (id, score, metadata), the user's melody
            (`id=None`, `metadata["source"] == "user"`) or the one transcribed from `audio` (`"audio"`); its metadata
            also says where it plays (`audio_span_s`), how often (`repeats`) and which span of it guided each
            denoising window (`windows`). None where `melody_embeds` were passed, the model is text-only, or there was no melody to follow.
        sampling_rate: samples per second of `audios`.
    """

    audios: np.ndarray | torch.Tensor
    melodies: list[GuidingMelody | None]
    sampling_rate: int


class MG2Pipeline(DiffusionPipeline):
    """Melody-guided text-to-music generation (MG2).

    Components:
        clmp (`CLMPModel`): text, audio and melody towers in one embedding space.
        processor (`CLMPProcessor`): tokenizer + log-mel feature extractor + melody tokenizer for `clmp`.
        retriever (`MelodyRetriever`): HNSW index of CLMP melody embeddings and the melodies themselves.
        unet (`UNet2DConditionModel`): denoiser conditioned by FiLM on [text ‖ melody] (`class_labels`) and, with
            `text_attention`, by cross-attention to the prompt's token states from CLMP's text tower.
        scheduler: any diffusers scheduler (default `DPMSolverMultistepScheduler`).
        vae (`MelAutoencoderKL` or `AutoencoderKL`): 1-channel log-mel images ↔ latents.
        vocoder (`GriffinLimVocoder`, `VocosVocoder` or `SpeechT5HifiGan`): log-mel → waveform.
    Setting:
        condition: "text_melody" (MG2), or "text" for the text-only ablation, whose melody half is the text embedding again.
        aligned_melody: how the melody reaches the UNet in time (see `ALIGNED_MELODY`), None for the pooled condition only.
        text_attention: whether the UNet's attention blocks attend to the prompt's token states (else to the latent itself).
        distilled_guidance_scale: for a guidance-distilled UNet (`train_mg2.py --distill_guidance`), the text and
            melody scale whose guided prediction it gives in one pass; the scales then default to 1, and the steps of
            text to music with an x₀-predicting UNet to `DEFAULT_DISTILLED_NUM_INFERENCE_STEPS`. None otherwise.
    """

    model_cpu_offload_seq = "clmp->unet->vae->vocoder"
    _optional_components = ["retriever"]
    _exclude_from_cpu_offload = ["retriever"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "melody_embeds"]

    def __init__(
        self,
        clmp: PreTrainedModel,
        processor: ProcessorMixin,
        retriever: MelodyRetriever | None,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | MelAutoencoderKL,
        vocoder: GriffinLimVocoder | VocosVocoder | SpeechT5HifiGan,
        condition: str = "text_melody",
        aligned_melody: str | None = None,
        text_attention: bool = False,
        distilled_guidance_scale: float | None = None,
    ):
        super().__init__()
        if distilled_guidance_scale is not None and not 1 < distilled_guidance_scale <= MAX_GUIDANCE_SCALE:
            raise ValueError(
                f"distilled_guidance_scale must be None or in (1, {MAX_GUIDANCE_SCALE:g}], got {distilled_guidance_scale}."
            )
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}.")
        if aligned_melody not in ALIGNED_MELODY:
            raise ValueError(f"aligned_melody must be one of {ALIGNED_MELODY}, got {aligned_melody!r}.")
        if condition == "text" and aligned_melody is not None:
            raise ValueError("A text-only model (condition='text') takes no aligned melody: use aligned_melody=None.")
        if retriever is not None and clmp is not None:
            retriever.check_clmp(clmp)
        condition_dim = unet.config.projection_class_embeddings_input_dim if unet is not None else None
        if unet is not None and clmp is not None and condition_dim != 2 * clmp.config.projection_dim:
            raise ValueError(
                f"The UNet takes a {condition_dim}-d condition but [text ‖ melody] from this CLMP is "
                f"{2 * clmp.config.projection_dim}-d (2 × projection_dim)."
            )
        if unet is not None and clmp is not None and "cross_attention_dim" in unet.config:
            attends_to = unet.config.cross_attention_dim
            widths = (
                attends_to
                if isinstance(attends_to, (list, tuple))
                else [attends_to] * len(unet.config.block_out_channels)
            )
            if text_attention and attends_to != clmp.text_hidden_size:
                raise ValueError(
                    f"text_attention needs a UNet whose cross_attention_dim is the text tower's width "
                    f"({clmp.text_hidden_size}), got {attends_to}."
                )
            if not text_attention and list(widths) != list(unet.config.block_out_channels):
                raise ValueError(
                    f"This UNet's attention layers take {attends_to}-wide states, not its own widths "
                    f"{unet.config.block_out_channels}: it attends to text, so pass text_attention=True."
                )
        if unet is not None and vae is not None:
            self.check_channels(unet, vae, aligned_melody)
        self.register_modules(
            clmp=clmp,
            processor=processor,
            retriever=retriever,
            unet=unet,
            scheduler=scheduler,
            vae=vae,
            vocoder=vocoder,
        )
        self.register_to_config(
            condition=condition,
            aligned_melody=aligned_melody,
            text_attention=bool(text_attention),
            distilled_guidance_scale=distilled_guidance_scale,
        )
        # Components may be None (e.g. a pipeline holding only the text stack for `encode_prompt`).
        self.vae_scale_factor = vae_scale_factor(vae) if vae is not None else None
        self.mel = LogMelSpectrogram()

    @staticmethod
    def check_channels(unet: UNet2DConditionModel, vae: AutoencoderKL, aligned_melody: str | None) -> None:
        """The UNet's input channels are the VAE's latent plus what `aligned_melody` adds; its output, the latent."""
        latent = vae.config.latent_channels
        takes = latent + melody_channels(aligned_melody, latent)
        if unet.config.in_channels == takes and unet.config.out_channels == latent:
            return
        fits = [name for name in ALIGNED_MELODY if unet.config.in_channels == latent + melody_channels(name, latent)]
        remedy = (
            f"pass aligned_melody={fits[0]!r}, the setting this UNet was trained with"
            if fits and unet.config.out_channels == latent
            else "train the UNet on this VAE and setting (train_mg2.py --vae, --aligned_melody)"
        )
        raise ValueError(
            f"The UNet takes {unet.config.in_channels} input and {unet.config.out_channels} output channels; this VAE's "
            f"latent has {latent} and aligned_melody={aligned_melody!r} adds {takes - latent}: "
            f"{remedy}."
        )

    # ----- saving and loading -----

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """Save every component (`variant` and `safe_serialization` as in diffusers), the code that loads them without
        this package, and a model card. Pickled (`safe_serialization=False`) weights load only with
        `torch.load(weights_only=True)`, as diffusers and transformers read them; the retriever writes safetensors always.

        The folder loads with `MG2Pipeline.from_pretrained(dir)`, and with
        `DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)` where `mg2_pipeline` is not
        installed: `pipeline_mg2.py` and its imports sit at the root, each custom component's module in
        its folder, and `model_index.json` names them. `README.md` is the model card of the
        folder this pipeline was loaded from, or else one describing the components.

        With `push_to_hub=True` the folder is then uploaded to `repo_id` (default: the folder's name); `token`,
        `private`, `revision`, `commit_message` and `create_pr` are passed on (see `mg2_pipeline.hub.push_folder`).
        """
        hub_kwargs = {
            key: kwargs.pop(key)
            for key in ("repo_id", "token", "private", "revision", "commit_message", "create_pr")
            if key in kwargs
        }
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as handle:
            model_index = json.load(handle)
        _copy_module_with_imports("pipeline_mg2", save_directory)
        # The checkpoint is the model, whichever task class saved it: it loads as MG2Pipeline, and into every task class.
        model_index["_class_name"] = ["pipeline_mg2", "MG2Pipeline"]
        for name, value in model_index.items():
            if isinstance(value, list) and value[0] and value[0].startswith(f"{__package__}."):
                module = value[0].rsplit(".", 1)[1]
                _copy_module_with_imports(module, os.path.join(save_directory, name))
                model_index[name] = [module, value[1]]
        with open(index_path + ".tmp", "w") as handle:
            json.dump(model_index, handle, indent=2, sort_keys=True)
        os.replace(index_path + ".tmp", index_path)
        self._write_model_card(save_directory, hub_kwargs.get("repo_id"))
        if push_to_hub:
            push_folder(
                save_directory,
                hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory))),
                **hub_kwargs,
            )

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        revision: str | None = None,
        **kwargs,
    ):
        """Upload the pipeline (weights, remote code, model card, melody index) to the model repo `repo_id`;
        returns the `CommitInfo` (its `oid` is the new revision)."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, repo_id=repo_id, **kwargs)  # repo_id: the model card's usage snippet
            return push_folder(
                folder,
                repo_id,
                token=token,
                private=private,
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
            )

    def _write_model_card(self, save_directory: str | os.PathLike, repo_id: str | None) -> None:
        card_path = os.path.join(save_directory, "README.md")
        source_folder = getattr(self, "_source_folder", None)
        if os.path.isfile(card_path):
            return
        if source_folder is not None and os.path.isfile(os.path.join(source_folder, "README.md")):
            shutil.copy(os.path.join(source_folder, "README.md"), card_path)
        else:
            write_model_card(save_directory, model_description=describe_pipeline(self), repo_id=repo_id)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "MG2Pipeline":
        """Load a saved pipeline (folder or Hub repo id) with diffusers' `DiffusionPipeline.from_pretrained`, taking the
        same arguments with the same meaning: `dtype` (or `torch_dtype`; a dict per component with a `"default"`),
        `variant`, `device_map`, `low_cpu_mem_usage`, `use_safetensors`, components as keyword arguments, and the Hub
        arguments `revision`, `cache_dir`, `token`, `local_files_only`, `force_download`.

        No remote code runs: `load_config` resolves the code saved beside the weights (for
        `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`) to the installed package instead. A repo id is
        fetched with `huggingface_hub.snapshot_download` (every file: diffusers' `download` would refuse the saved code
        without `trust_remote_code`).
        """
        folder = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download

            hub_keys = ("revision", "cache_dir", "token", "local_files_only", "force_download")
            folder = snapshot_download(folder, **{key: kwargs.pop(key) for key in hub_keys if key in kwargs})
        pipeline = super().from_pretrained(folder, **kwargs)
        pipeline.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
        pipeline._source_folder = folder  # its model card travels with the pipeline when saved or pushed
        return pipeline

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, **kwargs):
        """`model_index.json` read for this package: the pipeline class and each component saved with its own code
        (`["modeling_clmp", "CLMPModel"]`) resolve to the installed `mg2_pipeline` modules, so diffusers' loader imports
        them rather than the files beside the weights."""
        result = super().load_config(pretrained_model_name_or_path, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = config["_class_name"][1]
        for name, value in config.items():
            if isinstance(value, list) and len(value) == 2 and value[0] and _is_own_module(value[0]):
                config[name] = [f"{__package__}.{value[0]}", value[1]]
        return result

    def load_lora_weights(
        self, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default", **kwargs
    ) -> None:
        """Apply a UNet LoRA adapter saved by `train_mg2.py --use_lora` (diffusers' PEFT format, safetensors)."""
        self.unet.load_lora_adapter(
            pretrained_model_name_or_path, prefix=None, adapter_name=adapter_name, use_safetensors=True, **kwargs
        )

    # ----- shapes -----

    @property
    def sampling_rate(self) -> int:
        return int(self.vocoder.config.sampling_rate)

    @property
    def hop_length(self) -> int:
        """Waveform samples per mel frame (a HiFi-GAN's upsampling product, or the vocoder's `hop_length`)."""
        config = self.vocoder.config
        return int(config.hop_length if hasattr(config, "hop_length") else np.prod(config.upsample_rates))

    @property
    def frames_multiple(self) -> int:
        """Mel frames must be a multiple of this for the VAE and every UNet downsampling to divide evenly."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def window_frames(self) -> int:
        """Latent frames of one denoising window: the UNet's `sample_size`, the length it was built for."""
        sample_size = self.unet.config.sample_size
        return sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size

    @property
    def window_overlap(self) -> int:
        """Latent frames consecutive windows share at least: `WINDOW_OVERLAP` of a window, in whole UNet blocks."""
        block = self.frames_multiple // self.vae_scale_factor
        return max(block, round(self.window_frames * WINDOW_OVERLAP / block) * block)

    @property
    def default_audio_length_in_s(self) -> float:
        """The training length: one window, the UNet's `sample_size` latent frames."""
        return self.window_frames * self.vae_scale_factor * self.hop_length / self.sampling_rate

    def mel_frames(self, audio_length_in_s: float) -> int:
        """Log-mel frames generated for `audio_length_in_s` seconds: rounded up to a multiple of `frames_multiple`."""
        frames = np.ceil(audio_length_in_s * self.sampling_rate / self.hop_length / self.frames_multiple)
        return int(frames) * self.frames_multiple

    def latent_shape(self, num_waveforms: int, mel_frames: int) -> tuple[int, int, int, int]:
        return (
            num_waveforms,
            self.vae.config.latent_channels,
            mel_frames // self.vae_scale_factor,
            int(self.vocoder.config.model_in_dim) // self.vae_scale_factor,
        )

    # ----- steps of __call__ -----

    def check_prompt(self, prompt, name: str = "prompt") -> list[str]:
        """`prompt` as a list of texts the text tower can read, or a `TypeError`/`ValueError` naming `name`.

        Refused: a non-string, an empty list, more than `MAX_WAVEFORMS` texts, a text longer than
        `MAX_PROMPT_CHARACTERS`, one with no letter or digit (it would embed like the empty prompt) and one the
        tokenizer reads as nothing but unknown word pieces. Unknown words in an otherwise readable prompt and text
        beyond the tokenizer's `max_text_length` are logged as warnings.
        """
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"{name} must be a string or a non-empty list of strings, got {type(prompt).__name__}.")
        if len(prompts) > MAX_WAVEFORMS:
            raise ValueError(f"{name} has {len(prompts)} texts; at most {MAX_WAVEFORMS} are generated at once.")
        tokenizer, max_tokens = self.processor.tokenizer, self.processor.max_text_length - 2  # [CLS] and [SEP]
        for text in prompts:
            if len(text) > MAX_PROMPT_CHARACTERS:
                raise ValueError(f"{name} has {len(text)} characters; at most {MAX_PROMPT_CHARACTERS} are allowed.")
            if not text.strip():
                raise ValueError(f"{name} is empty: describe the music to generate.")
            if not any(character.isalnum() for character in text):
                raise ValueError(f"{name} {text!r} has no letter or digit: describe the music to generate in words.")
            pieces = tokenizer.tokenize(text)
            unknown = [word for word in text.split() if tokenizer.unk_token in tokenizer.tokenize(word)]
            if pieces and pieces.count(tokenizer.unk_token) == len(pieces):
                raise ValueError(
                    f"{name} {text[:80]!r} is unreadable to the text tower: every word piece is unknown to its "
                    "vocabulary (the presets use MiniLM's English WordPiece vocabulary)."
                )
            if unknown:
                logger.warning(
                    f"{pieces.count(tokenizer.unk_token)} of {len(pieces)} word pieces of {name} {text[:80]!r} are "
                    f"unknown to the text tower's vocabulary and read as {tokenizer.unk_token}: {unknown[:5]}."
                )
            if len(pieces) > max_tokens:
                ignored = tokenizer.convert_tokens_to_string(pieces[max_tokens:])
                logger.warning(
                    f"{name} is {len(pieces)} word pieces long; the text tower reads the first {max_tokens} and "
                    f"ignores {ignored[:200]!r}."
                )
        return list(prompts)

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        melody,
        audio_length_in_s,
        num_inference_steps,
        guidance_scale,
        melody_guidance_scale,
        guidance_interval,
        num_waveforms_per_prompt,
        retrieval_top_k,
        match_prompt_facts,
        generator,
        latents,
        prompt_embeds,
        negative_prompt_embeds,
        melody_embeds,
        output_type,
        return_dict,
        cross_attention_kwargs,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ) -> int:
        """Validate every argument before any compute; returns the batch size. Wrong types raise `TypeError`, wrong
        values (non-finite, out of range, mismatched sizes) `ValueError`; each message names the argument."""
        batch_size = self.check_conditions(
            prompt, negative_prompt, melody, prompt_embeds, negative_prompt_embeds, melody_embeds
        )
        self.check_sampling(
            batch_size, audio_length_in_s, num_inference_steps, guidance_scale, melody_guidance_scale,
            guidance_interval, num_waveforms_per_prompt, retrieval_top_k, generator, latents, negative_prompt_embeds,
        )  # fmt: skip
        self.check_call_options(
            output_type, return_dict, match_prompt_facts, cross_attention_kwargs, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        return batch_size

    def check_conditions(
        self, prompt, negative_prompt, melody, prompt_embeds, negative_prompt_embeds, melody_embeds
    ) -> int:
        """The prompt, negative prompt and melody, as text or embeddings; returns the batch size."""
        projection_dim = self.unet.config.projection_class_embeddings_input_dim // 2  # [text ‖ melody]
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt is None: pass a text prompt (or prompt_embeds).")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either prompt or prompt_embeds, not both.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either negative_prompt or negative_prompt_embeds, not both.")
        if self.config.text_attention and (prompt_embeds is not None or negative_prompt_embeds is not None):
            raise ValueError(
                "This model attends to the prompt's words (text_attention), which pooled prompt_embeds and "
                "negative_prompt_embeds do not carry: pass prompt and negative_prompt as text."
            )
        without_clmp = self.clmp is None or self.processor is None
        if without_clmp and (prompt is not None or negative_prompt is not None or melody is not None):
            raise ValueError(
                "This pipeline has no clmp/processor (the text and melody towers) to read prompt, "
                "negative_prompt or melody: pass prompt_embeds, negative_prompt_embeds, melody_embeds."
            )
        if prompt is not None:
            batch_size = len(self.check_prompt(prompt))
        else:
            check_embeddings("prompt_embeds", prompt_embeds, (None, projection_dim))
            batch_size = prompt_embeds.shape[0]
            if not 1 <= batch_size <= MAX_WAVEFORMS:
                raise ValueError(f"prompt_embeds has {batch_size} rows; between 1 and {MAX_WAVEFORMS} are allowed.")
        if negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if not isinstance(negatives, (list, tuple)) or not all(isinstance(n, str) for n in negatives):
                raise TypeError(
                    f"negative_prompt must be a string or a list of strings, got {type(negative_prompt).__name__}."
                )
            if not isinstance(negative_prompt, str) and len(negatives) != batch_size:
                raise ValueError(
                    f"negative_prompt has {len(negatives)} entries but prompt has {batch_size}; they must match."
                )
            if any(n.strip() for n in negatives):  # an empty negative prompt is the default unconditional input
                self.check_prompt([n for n in negatives if n.strip()], name="negative_prompt")
        if negative_prompt_embeds is not None:
            check_embeddings("negative_prompt_embeds", negative_prompt_embeds, (batch_size, projection_dim))
        if melody is not None and melody_embeds is not None:
            raise ValueError("Pass either melody or melody_embeds, not both.")
        if (
            without_clmp
            and melody is None
            and melody_embeds is None
            and self.retriever is None
            and self.config.condition != "text"
        ):
            remedy = (
                "pass melody_embeds" if self.config.aligned_melody is None else "load it with its clmp and processor"
            )
            raise ValueError(
                "This pipeline has no retriever to find a melody and no clmp to embed the empty text that stands "
                f"for no melody: {remedy}."
            )
        if isinstance(melody, (list, tuple)) and len(melody) != batch_size:
            raise ValueError(
                f"melody has {len(melody)} entries but prompt has {batch_size}; pass one melody, or one per prompt."
            )
        if melody_embeds is not None:
            if self.config.aligned_melody is not None:
                raise ValueError(
                    "This model follows the melody's notes in time and melody_embeds carry no timing: pass melody=."
                )
            check_embeddings("melody_embeds", melody_embeds, (batch_size, projection_dim))
        if self.config.condition == "text" and (melody is not None or melody_embeds is not None):
            raise ValueError("This is a text-only model (condition='text'): it takes no melody or melody_embeds.")
        return batch_size

    def check_sampling(
        self,
        batch_size,
        audio_length_in_s,
        num_inference_steps,
        guidance_scale,
        melody_guidance_scale,
        guidance_interval,
        num_waveforms_per_prompt,
        retrieval_top_k,
        generator,
        latents,
        negative_prompt_embeds,
    ) -> None:
        """The length, steps, guidance, candidates, generators and starting latents."""
        without_clmp = self.clmp is None or self.processor is None
        min_length = round(self.frames_multiple * self.hop_length / self.sampling_rate, 2)
        if audio_length_in_s is not None:
            check_number("audio_length_in_s", audio_length_in_s, min_length, MAX_AUDIO_LENGTH_S)
        if not isinstance(guidance_interval, (tuple, list)) or len(guidance_interval) != 2:
            raise TypeError(
                f"guidance_interval must be a pair (low, high) of fractions of the noise schedule, got {guidance_interval!r}."
            )
        check_number("guidance_interval[0]", guidance_interval[0], 0, 1)
        check_number("guidance_interval[1]", guidance_interval[1], guidance_interval[0], 1)
        check_number(
            "num_inference_steps",
            num_inference_steps,
            1,
            min(MAX_INFERENCE_STEPS, self.scheduler.config.num_train_timesteps),
            integer=True,
        )
        check_number("guidance_scale", guidance_scale, 0, MAX_GUIDANCE_SCALE)
        check_number("melody_guidance_scale", melody_guidance_scale, 0, MAX_GUIDANCE_SCALE)
        if without_clmp and self.config.condition != "text" and melody_guidance_scale != max(guidance_scale, 1):
            raise ValueError(
                "melody_guidance_scale must equal guidance_scale (1 when guidance_scale ≤ 1) in a pipeline "
                "without clmp: a melody term of its own needs the empty text's CLMP embedding."
            )
        if without_clmp and guidance_scale > 1 and negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 in a pipeline without clmp needs negative_prompt_embeds.")
        check_number(
            "num_waveforms_per_prompt", num_waveforms_per_prompt, 1, MAX_WAVEFORMS // batch_size, integer=True
        )
        check_number(
            "retrieval_top_k",
            retrieval_top_k,
            1,
            len(self.retriever) if self.retriever is not None else 1,
            integer=True,
        )
        num_waveforms = batch_size * num_waveforms_per_prompt
        generators = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}.")
        if isinstance(generator, list) and len(generator) != num_waveforms:
            raise ValueError(
                f"generator is a list of {len(generator)} generators but {num_waveforms} "
                "waveforms are generated; pass one generator, or one per waveform."
            )
        if latents is not None:  # without audio_length_in_s, the latents' length is the length
            shape = self.latent_shape(num_waveforms, self.mel_frames(audio_length_in_s or min_length))
            check_tensor("latents", latents, shape[:2] + (None if audio_length_in_s is None else shape[2], shape[3]))
            block = self.frames_multiple // self.vae_scale_factor
            longest = self.mel_frames(MAX_AUDIO_LENGTH_S) // self.vae_scale_factor
            if latents.shape[2] % block or latents.shape[2] > longest:
                raise ValueError(
                    f"latents must have a multiple of {block} frames, at most {longest}; got {latents.shape[2]}."
                )
            largest, bound = latents.abs().max().item(), MAX_LATENT_NOISE * self.scheduler.init_noise_sigma
            if largest > bound:  # the sampler starts from N(0, sigma²) noise: this is no noise, and it diverges
                raise ValueError(f"latents must be starting noise, at most {bound:g} in magnitude; got {largest:.3g}.")

    def check_call_options(
        self,
        output_type,
        return_dict,
        match_prompt_facts,
        cross_attention_kwargs,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        """The output type, flags, attention kwargs and callback."""
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        for name, flag in (("return_dict", return_dict), ("match_prompt_facts", match_prompt_facts)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}.")
        if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
            raise TypeError(
                f"cross_attention_kwargs must be a dict (e.g. {{'scale': 0.5}}), got {type(cross_attention_kwargs).__name__}."
            )
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}.")
        names = callback_on_step_end_tensor_inputs
        if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
            raise TypeError(
                f"callback_on_step_end_tensor_inputs must be a list of names from {self._callback_tensor_inputs}."
            )
        unknown = [name for name in names if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not in {self._callback_tensor_inputs}."
            )

    def tokenize(self, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Texts → CLMP's `input_ids` and `attention_mask`, padded to `max_text_length`."""
        if self.clmp is None or self.processor is None:
            raise ValueError(
                "This pipeline has no clmp/processor (the text tower) to embed text: pass prompt_embeds and "
                "negative_prompt_embeds."
            )
        tokens = self.processor.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.processor.max_text_length,
            return_tensors="pt",
        )
        return {"input_ids": tokens["input_ids"].to(device), "attention_mask": tokens["attention_mask"].to(device)}

    @torch.no_grad()
    def encode_text(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """CLMP text embeddings `(len(texts), projection_dim)`; the empty string is allowed (the unconditional input)."""
        tokens = self.tokenize(texts, device)
        return self.clmp.get_text_features(**tokens)

    @torch.no_grad()
    def encode_text_states(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """What a `text_attention` UNet attends to: CLMP's text-tower token states `(len(texts), max_text_length, width)`
        and their attention mask `(len(texts), max_text_length)`. The empty string is the dropped text."""
        return self.encode_text_outputs(texts, device)[1:]

    @torch.no_grad()
    def encode_text_outputs(
        self, texts: list[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`encode_text` and `encode_text_states` from one pass of the text tower: embeddings, states, mask."""
        tokens = self.tokenize(texts, device)
        embeds, states = self.clmp.get_text_outputs(**tokens)
        return embeds, states, tokens["attention_mask"]

    @staticmethod
    def negative_texts(negative_prompt, batch_size: int) -> list[str]:
        """The negative prompt as one text per prompt: the empty (dropped) text when None."""
        if isinstance(negative_prompt, (list, tuple)):
            return list(negative_prompt)
        return [DROPPED_TEXT if negative_prompt is None else negative_prompt] * batch_size

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt,
        device: torch.device | None = None,
        num_waveforms_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLMP text embeddings of `prompt` and, with classifier-free guidance, of `negative_prompt` (the empty text when
        None), each row repeated `num_waveforms_per_prompt` times: `(batch × num_waveforms_per_prompt, projection_dim)`,
        on `device` (default: the pipeline's execution device).

        Precomputed `prompt_embeds` / `negative_prompt_embeds` `(batch, projection_dim)` are repeated, not recomputed.
        Without guidance the negative embeddings are None.
        """
        device = device or self._execution_device
        if prompt_embeds is None:
            prompt_embeds = self.encode_text([prompt] if isinstance(prompt, str) else list(prompt), device)
        batch_size = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt_embeds = self.encode_text(self.negative_texts(negative_prompt, batch_size), device)
        prompt_embeds = prompt_embeds.to(device).repeat_interleave(num_waveforms_per_prompt, dim=0)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device).repeat_interleave(
                num_waveforms_per_prompt, dim=0
            )
        return prompt_embeds, negative_prompt_embeds

    @torch.no_grad()
    def encode_melody(self, melodies: list[Melody], device: torch.device) -> torch.Tensor:
        """CLMP melody embeddings `(len(melodies), projection_dim)`."""
        encoded = self.processor(melody=melodies, return_tensors="pt")
        return self.clmp.get_melody_features(
            encoded["melody_input_ids"].to(device), encoded["melody_attention_mask"].to(device)
        )

    def read_melodies(self, melody, batch_size: int) -> list[Melody]:
        """One `Melody` per prompt from the `melody` argument (see `Melody.load`); a ValueError or TypeError naming it
        when unreadable."""
        sources = list(melody) if isinstance(melody, (list, tuple)) else [melody] * batch_size
        try:
            return [Melody.load(source, sample_rate=self.sampling_rate) for source in sources]
        except TypeError as error:
            raise TypeError(f"melody could not be read: {error}") from error
        except (ValueError, OSError) as error:
            raise ValueError(f"melody could not be read: {error}") from error

    def read_audio(self, audio) -> torch.Tensor:
        """`audio` as a mono float32 waveform `(samples,)` at `sampling_rate`: a path is read (and resampled) with
        soundfile; an array or tensor must be 1-D, finite and already at `sampling_rate`. A ValueError names it."""
        if isinstance(audio, (str, os.PathLike)):
            waveform = load_audio(audio, self.sampling_rate, max_seconds=MAX_AUDIO_LENGTH_S)
        else:
            if isinstance(audio, torch.Tensor):  # bfloat16 has no numpy dtype
                audio = (audio.detach().cpu().float() if audio.is_floating_point() else audio.detach().cpu()).numpy()
            waveform = audio
            if waveform.dtype.kind != "f":
                raise TypeError(f"audio must hold floating-point samples, got dtype {waveform.dtype}.")
            if waveform.ndim != 1:
                raise ValueError(f"audio must be a mono waveform of shape (samples,), got shape {waveform.shape}.")
            if waveform.size > MAX_AUDIO_LENGTH_S * self.sampling_rate:
                raise ValueError(
                    f"audio lasts {waveform.size / self.sampling_rate:.1f} s; at most {MAX_AUDIO_LENGTH_S:g} s "
                    "are allowed."
                )
            if not np.all(np.isfinite(waveform)):
                raise ValueError("audio has NaN or infinite samples.")
        shortest = self.frames_multiple * self.hop_length
        if waveform.size < shortest:
            raise ValueError(
                f"audio has {waveform.size} samples; at least {shortest} "
                f"({shortest / self.sampling_rate:g} s at {self.sampling_rate} Hz) are needed."
            )
        return torch.from_numpy(np.asarray(waveform, dtype=np.float32).copy())

    def check_recording(self, audio, strength, num_inference_steps) -> None:
        """The task pipelines' `audio` (a path or a mono waveform) and `strength` (in (0, 1], at least one step)."""
        if audio is None:
            raise ValueError("audio is None: pass the recording to work on (a path or a mono waveform).")
        if not isinstance(audio, (str, os.PathLike, np.ndarray, torch.Tensor)):
            raise TypeError(
                f"audio must be a path to an audio file or a mono waveform (numpy or torch), got {type(audio).__name__}."
            )
        check_number("strength", strength, 0, 1)
        if strength * num_inference_steps < 1:
            raise ValueError(
                f"strength × num_inference_steps must be at least 1 (one denoising step), got {strength} × "
                f"{num_inference_steps}."
            )

    def noise_to_strength(
        self, given_latents: torch.Tensor, latents: torch.Tensor, num_inference_steps: int, strength: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The timesteps from `strength` on (diffusers' img2img) and where denoising starts: `given_latents` noised to
        the first of them with the noise in `latents`; at strength 1 that noise itself."""
        if strength == 1:
            return self.scheduler.timesteps, latents
        timesteps = self.get_timesteps(num_inference_steps, strength)
        noise = latents / self.scheduler.init_noise_sigma
        return timesteps, self.scheduler.add_noise(given_latents, noise, timesteps[:1].repeat(len(latents)))

    def keep_mask(self, mode: str, latent_frames: int, given_frames: int, repaint_start_s, repaint_end_s, device):
        """`(1, 1, latent_frames, 1)`: 1 on the latent frames of the given audio that are kept, 0 where new audio is
        generated, and over `window_overlap` frames at each seam a linear ramp between the two, on frames the given
        audio covers (inside a repainted span; at the end of the audio for a continuation, whose new part has no audio
        to blend with)."""
        frame_s = self.vae_scale_factor * self.hop_length / self.sampling_rate
        position = torch.arange(latent_frames, dtype=torch.float32)
        if mode == "continuation":
            ramp = min(self.window_overlap, given_frames // 2)
            generate = ((position - given_frames + ramp + 1) / (ramp + 1)).clamp(0, 1)
        else:
            start, end = int(repaint_start_s / frame_s), min(latent_frames, math.ceil(repaint_end_s / frame_s))
            ramp = min(self.window_overlap, (end - start) // 2)
            inside = torch.minimum(position - start + 1, end - position) / (ramp + 1)
            generate = torch.where((position >= start) & (position < end), inside.clamp(max=1), torch.zeros(()))
        return (1 - generate).view(1, 1, -1, 1).to(device)

    def get_timesteps(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The last `strength` of the schedule (diffusers' img2img): where denoising of noised audio starts."""
        start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start * self.scheduler.order)
        return self.scheduler.timesteps[start * self.scheduler.order :]

    def prepare_latents(
        self, batch_size: int, num_mel_frames: int, dtype, device, generator, latents=None
    ) -> torch.Tensor:
        if latents is None:
            latents = randn_tensor(
                self.latent_shape(batch_size, num_mel_frames), generator=generator, device=device, dtype=dtype
            )
        return latents.to(device, dtype) * self.scheduler.init_noise_sigma

    def follow_prompt_tempo(self, hit: GuidingMelody, prompt: str | None) -> GuidingMelody:
        """A retrieved melody re-timed to the tempo its prompt names ("… 120 BPM") when its own tempo is known;
        the metadata then says both (`tempo_bpm`, `stretched_from_bpm`)."""
        bpm = prompt_bpm(prompt) if prompt else None
        melody_bpm = hit.metadata.get("tempo_bpm")
        if bpm is None or not melody_bpm or bpm == melody_bpm:
            return hit
        metadata = {**hit.metadata, "tempo_bpm": bpm, "stretched_from_bpm": melody_bpm}
        return GuidingMelody(hit.melody.stretch(melody_bpm / bpm), hit.id, hit.score, metadata)

    def transcribe(self, waveform: torch.Tensor) -> Melody:
        """The melody of the given audio (basic-pitch, one line, rests under half a second filled), or a ValueError
        asking for `melody=`."""
        try:
            return Melody.from_audio(waveform.numpy(), self.sampling_rate).legato(TRANSCRIPTION_MAX_GAP_S)
        except ValueError as error:
            raise ValueError(f"No melody could be transcribed from audio ({error}): pass melody=.") from error

    def place_melody(
        self, hit: GuidingMelody | None, start_s: float, seconds: float, play_once: bool, starts: list[int]
    ) -> tuple[Melody | None, GuidingMelody | None]:
        """The melody as it guides `seconds` of audio: from `start_s`, once through (`play_once`) or repeated whole to
        the end; and the hit with `metadata["audio_span_s"]` (where it plays), `["repeats"]` and `["windows"]` (per
        denoising window, its `audio_s` span and the `melody_s` span of the melody, repeats laid end to end)."""
        if hit is None:
            return None, None
        melody = hit.melody if play_once else hit.melody.fit_to(seconds - start_s)
        end_s = min(seconds, start_s + melody.duration)
        frame_s = self.vae_scale_factor * self.hop_length / self.sampling_rate
        windows = []
        for start in starts:
            audio_s = (start * frame_s, min(seconds, (start + self.window_frames) * frame_s))
            melody_s = tuple(min(max(0.0, time - start_s), end_s - start_s) for time in audio_s)
            windows.append(
                {
                    "audio_s": tuple(round(time, 3) for time in audio_s),
                    "melody_s": tuple(round(time, 3) for time in melody_s),
                }
            )
        repeats = 1 if play_once else math.ceil((seconds - start_s) / hit.melody.duration - 1e-9)
        metadata = {
            **hit.metadata,
            "audio_span_s": (round(start_s, 3), round(end_s, 3)),
            "repeats": repeats,
            "windows": windows,
        }
        return melody.delay(start_s) if start_s else melody, GuidingMelody(hit.melody, hit.id, hit.score, metadata)

    @torch.no_grad()
    def prepare_melody_frames(
        self, melodies: list[Melody], latent_frames: int, device, dtype, timbre_seeds: list[int] | None = None
    ) -> torch.Tensor:
        """The time-aligned melody condition `(len(melodies), channels, latent_frames, latent_bins)`, melody time 0 at
        latent frame 0 (notes past the end are cut): the "sketch" (harmonic tones → log-mel → VAE encoder mode, scaled
        as latents; plain tones, or with `timbre_seeds` each melody's own random sound, see `Melody.render_tones`) or
        the pitch-class "roll" (12 one-hot channels + pitch height, on every bin)."""
        latent_bins = int(self.vocoder.config.model_in_dim) // self.vae_scale_factor
        num_samples = latent_frames * self.vae_scale_factor * self.hop_length
        if self.config.aligned_melody == "sketch":
            seeds = timbre_seeds if timbre_seeds is not None else [None] * len(melodies)
            tones = torch.from_numpy(
                np.stack(
                    [
                        m.render_tones(num_samples, self.sampling_rate, timbre_seed=seed)
                        for m, seed in zip(melodies, seeds)
                    ]
                )
            )
            return self.encode_waveforms(tones, device).to(dtype)
        frames_per_second = latent_frames * self.sampling_rate / num_samples
        rolls = np.stack([m.to_pitch_class_roll(latent_frames, frames_per_second) for m in melodies])
        return torch.from_numpy(rolls)[..., None].expand(-1, -1, -1, latent_bins).to(device, dtype)

    def prepare_extra_step_kwargs(self, generator) -> dict:
        # Stochastic schedulers (DDPM, SDE-DPM-Solver, DDIM with eta) draw noise: give them the generator.
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        return {"generator": generator} if "generator" in accepted else {}

    def prepare_condition(
        self,
        prompt_embeds,
        negative_prompt_embeds,
        melody_embeds,
        null_embeds,
        ignore_melody: bool,
        do_melody_guidance: bool,
        do_classifier_free_guidance: bool,
    ) -> torch.Tensor:
        """The UNet's pooled conditions, stacked in the order the predictions are split (`conditioning`): [text ‖
        melody] (melody dropped when it is ignored), [text ‖ dropped] with melody guidance, both dropped with text
        guidance, where the negative prompt's embedding stands for the dropped text."""
        conditions = [pooled_condition(prompt_embeds, melody_embeds, null_embeds, drop_melody=ignore_melody)]
        if do_melody_guidance:
            conditions.append(pooled_condition(prompt_embeds, None, null_embeds, drop_melody=True))
        if do_classifier_free_guidance:
            conditions.append(
                pooled_condition(prompt_embeds, None, negative_prompt_embeds, drop_text=True, drop_melody=True)
            )
        return torch.cat(conditions).to(self.unet.dtype)

    def prepare_text_states(
        self, condition: Conditioning, do_melody_guidance: bool, do_classifier_free_guidance: bool
    ):
        """With `text_attention`, the token states the UNet attends to and their mask, stacked in the order of
        `prepare_condition`: the prompt's (again for the melody-free prediction), the negative prompt's (the empty
        text's when None) with text guidance; one row per waveform. `(None, None)` otherwise."""
        if not self.config.text_attention:
            return None, None
        if condition.text_states is None or condition.negative_text_states is None:
            raise ValueError("A text_attention model needs the token states of encode_condition's Conditioning.")
        parts = [condition.text_states] * (1 + do_melody_guidance)
        if do_classifier_free_guidance:
            parts.append(condition.negative_text_states)
        repeats = condition.num_waveforms_per_prompt
        states = torch.cat([states.repeat_interleave(repeats, dim=0) for states, _ in parts])
        masks = torch.cat([mask.repeat_interleave(repeats, dim=0) for _, mask in parts])
        return states.to(self.unet.dtype), masks

    def encode_condition(
        self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_waveforms_per_prompt: int, device
    ) -> Conditioning:
        """The prompt's and the negative prompt's CLMP embeddings, one row per waveform (`encode_prompt`). The negative
        ones are made even without text guidance when CLMP can: a callback may turn it on. With `text_attention`, also
        their token states, from one pass of the text tower over both."""
        prompts = None if prompt is None else ([prompt] if isinstance(prompt, str) else list(prompt))
        text_states = negative_text_states = None
        if self.config.text_attention:  # check_conditions allows only text prompts here
            texts = prompts + self.negative_texts(negative_prompt, len(prompts))
            embeds, states, mask = self.encode_text_outputs(texts, device)
            batch = len(prompts)
            prompt_embeds, negative_prompt_embeds = embeds[:batch], embeds[batch:]
            text_states, negative_text_states = (states[:batch], mask[:batch]), (states[batch:], mask[batch:])
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            None if self.config.text_attention else prompt,
            device,
            num_waveforms_per_prompt,
            self.do_classifier_free_guidance or self.clmp is not None,
            None if self.config.text_attention else negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
        )
        return Conditioning(
            prompts, negative_prompt, num_waveforms_per_prompt, prompt_embeds, negative_prompt_embeds,
            text_states=text_states, negative_text_states=negative_text_states,
        )  # fmt: skip

    def prepare_guidance_inputs(self, condition: Conditioning, device) -> GuidanceInputs:
        """The UNet's inputs for the predictions the current scales need (`guidance_terms`), stacked in their order:
        pooled conditions, text states, and the melody frames (zeros wherever the melody is dropped, as in training)."""
        terms = self.guidance_terms
        ignore_melody, melody_term, text_term = terms
        if text_term and condition.negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative_prompt_embeds in a pipeline without clmp.")
        if (ignore_melody or melody_term) and self.clmp is None:
            raise ValueError(
                "melody_guidance_scale must equal guidance_scale (1 when guidance_scale ≤ 1) in a pipeline "
                "without clmp: the melody-free condition is the empty text's CLMP embedding."
            )
        null_embeds = self.encode_text([DROPPED_TEXT], device) if ignore_melody or melody_term else None
        pooled = self.prepare_condition(
            condition.prompt_embeds,
            condition.negative_prompt_embeds,
            condition.melody_embeds,
            null_embeds,
            ignore_melody,
            melody_term,
            text_term,
        )
        text_states, text_mask = self.prepare_text_states(condition, melody_term, text_term)
        melody_frames = condition.melody_frames
        if melody_frames is not None:
            melody_frames = torch.cat(
                [melody_frames_condition(melody_frames, ignore_melody)]
                + [melody_frames_condition(melody_frames, True)] * (melody_term + text_term)
            )
        return GuidanceInputs(terms, pooled, text_states, text_mask, melody_frames)

    @torch.no_grad()
    def encode_waveforms(self, waveforms: torch.Tensor, device) -> torch.Tensor:
        """Waveforms `(batch, samples)` at `sampling_rate`, a whole number of latent frames long → latents: the VAE
        encoder's mode of their log-mel, scaled; window by window when longer than one."""
        samples_per_frame = self.vae_scale_factor * self.hop_length

        def encode(piece):
            log_mel = self.mel(piece).unsqueeze(1).to(device, self.vae.dtype)
            return self.vae.encode(log_mel).latent_dist.mode() * self.vae.config.scaling_factor

        return map_in_windows(
            encode,
            waveforms,
            1,
            self.window_frames * samples_per_frame,
            self.window_overlap * samples_per_frame,
            self.frames_multiple * self.hop_length,
            1 / samples_per_frame,
            out_dim=2,
        )

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → log-mel `(batch, frames, mels)`; window by window when longer than one."""

        def decode(piece):
            return self.vae.decode(piece / self.vae.config.scaling_factor).sample.squeeze(1)

        block = self.frames_multiple // self.vae_scale_factor
        return map_in_windows(
            decode, latents, 2, self.window_frames, self.window_overlap, block, self.vae_scale_factor, out_dim=1
        )

    @torch.no_grad()
    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel `(batch, frames, mels)` → waveforms `(batch, frames × hop_length)`; window by window when longer
        than one."""
        scale, hop_length = self.vae_scale_factor, self.hop_length

        def vocode_window(window: torch.Tensor) -> torch.Tensor:
            # A HiFi-GAN's transposed convolutions give a few samples more than frames × hop_length.
            return self.vocoder(window)[..., : window.shape[1] * hop_length]

        return map_in_windows(
            vocode_window,
            mel.to(self.vocoder.dtype),
            1,
            self.window_frames * scale,
            self.window_overlap * scale,
            self.frames_multiple,
            hop_length,
        )

    @torch.no_grad()
    def score_waveforms(self, waveforms: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """CLMP cosine similarity of each waveform `(batch, samples)` to its text embedding `(batch, dim)`."""
        features = self.processor.feature_extractor(list(waveforms.float().cpu().numpy()), return_tensors="pt")
        audio_embeds = self.clmp.get_audio_features(features["input_features"].to(text_embeds.device, self.clmp.dtype))
        return (audio_embeds * text_embeds).sum(-1).float()

    def check_finite(self, values: torch.Tensor) -> None:
        """Never return NaN or infinite samples as music: a `ValueError` naming what usually causes them."""
        if not torch.isfinite(values).all():
            self.maybe_free_model_hooks()
            low_precision = (
                "" if self.unet.dtype == torch.float32 else f", or run in float32 rather than {self.unet.dtype}"
            )
            raise ValueError(
                f"The generation diverged to NaN or infinite values with guidance_scale={self.guidance_scale} and "
                f"melody_guidance_scale={self.melody_guidance_scale}: lower them{low_precision}."
            )

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def melody_guidance_scale(self) -> float:
        return self._melody_guidance_scale

    @property
    def do_melody_guidance(self) -> bool:
        """Whether the melody-free prediction ε(t, ∅) runs. Equal scales need none: the guidance formula is then plain
        classifier-free guidance of text and melody together, `s · ε(t, m) − (s − 1) · ε(∅, ∅)`."""
        text_scale = self._guidance_scale if self.do_classifier_free_guidance else 1.0
        return self.config.condition != "text" and self._melody_guidance_scale not in (0.0, text_scale)

    @property
    def guidance_terms(self) -> tuple[bool, bool, bool]:
        """Which predictions the current scales need: `(ignore_melody, do_melody_guidance, do_classifier_free_guidance)`;
        the melody is dropped from the main prediction at `melody_guidance_scale` 0."""
        ignore_melody = self.config.condition != "text" and self._melody_guidance_scale == 0
        return bool(ignore_melody), bool(self.do_melody_guidance), bool(self.do_classifier_free_guidance)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    # ----- the steps every task shares -----

    def prepare_melodies(
        self,
        prompts: list[str] | None,
        prompt_embeds: torch.Tensor,
        melodies: list[Melody] | None,
        melody_embeds: torch.Tensor | None,
        num_waveforms_per_prompt: int,
        retrieval_top_k: int,
        match_prompt_facts: bool,
        device,
        source: str = "user",
    ) -> tuple[list[GuidingMelody | None], torch.Tensor]:
        """One guiding melody and its CLMP embedding per waveform: `melodies` (one per prompt, marked `source`), the
        given `melody_embeds`, or retrieved (of the tune type, origin, meter and key the prompt names when the index has
        such melodies, re-timed to the tempo it names). Without any, the melody-dropped condition: the text alone."""
        num_waveforms = prompt_embeds.shape[0]
        if self.config.condition == "text":
            return [None] * num_waveforms, prompt_embeds
        if melody_embeds is not None:
            return [None] * num_waveforms, melody_embeds.to(device).repeat_interleave(num_waveforms_per_prompt, dim=0)
        if melodies is not None:
            guiding = [
                GuidingMelody(m, id=None, score=None, metadata={"source": source})
                for m in melodies
                for _ in range(num_waveforms_per_prompt)
            ]
            embeds = self.encode_melody(melodies, device).repeat_interleave(num_waveforms_per_prompt, dim=0)
            return guiding, embeds
        if self.retriever is None:  # nothing to follow: the melody-dropped condition training teaches, text alone
            logger.warning("No melody given and no retriever to find one: generating from the text alone.")
            return [None] * num_waveforms, self.encode_text([DROPPED_TEXT], device).expand_as(prompt_embeds)
        query = prompt_embeds[::num_waveforms_per_prompt]
        if match_prompt_facts and prompts:
            hits = self.retriever.search_matching(query, prompts, k=retrieval_top_k)
        else:
            hits = self.retriever.search(query, k=retrieval_top_k)
        choice = [
            (row, candidate % retrieval_top_k)
            for row in range(len(query))
            for candidate in range(num_waveforms_per_prompt)
        ]
        guiding = [
            self.follow_prompt_tempo(hits.melodies[row][rank], prompts[row] if prompts else None)
            for row, rank in choice
        ]
        return guiding, torch.from_numpy(np.stack([hits.embeddings[row, rank] for row, rank in choice])).to(device)

    def place_melodies(
        self,
        guiding: list[GuidingMelody | None],
        audio_length_in_s: float | None,
        play_once: bool,
        melody_start_s: float = 0.0,
    ) -> tuple[float, list[int], list[Melody | None], list[GuidingMelody | None]]:
        """The length (by default the longest time-aligned melody's, else one window), the denoising windows' first
        latent frames, and each melody as it plays: from `melody_start_s`, once through (`play_once`) or repeated whole
        to the end. Returns `(audio_length_in_s, window starts, melodies, guides)`."""
        if audio_length_in_s is None:
            aligned = self.config.aligned_melody is not None and guiding[0] is not None
            longest = max(hit.melody.duration for hit in guiding) if aligned else self.default_audio_length_in_s
            audio_length_in_s = min(MAX_AUDIO_LENGTH_S, longest)
        num_mel_frames = self.mel_frames(audio_length_in_s)
        starts = window_starts(
            num_mel_frames // self.vae_scale_factor,
            self.window_frames,
            self.window_overlap,
            self.frames_multiple // self.vae_scale_factor,
        )
        seconds = num_mel_frames * self.hop_length / self.sampling_rate
        placed = [self.place_melody(hit, melody_start_s, seconds, play_once, starts) for hit in guiding]
        return audio_length_in_s, starts, [melody for melody, _ in placed], [hit for _, hit in placed]

    def prepare_aligned_melody(
        self, melodies: list[Melody | None], latents: torch.Tensor, device
    ) -> torch.Tensor | None:
        """The time-aligned melody frames for `latents` (None for a model without them); the dropped melody where there
        is no melody to follow."""
        if self.config.aligned_melody is None:
            return None
        if melodies[0] is None:
            channels = self.unet.config.in_channels - latents.shape[1]
            frames = torch.empty(len(melodies), channels, *latents.shape[2:], device=device, dtype=self.unet.dtype)
            return melody_frames_condition(frames, True)
        return self.prepare_melody_frames(melodies, latents.shape[2], device, self.unet.dtype)

    def encode_audio_latents(self, audio: torch.Tensor, latents: torch.Tensor, device) -> torch.Tensor:
        """The given waveform's latents, cut or padded with silence to the frames of `latents`, one row per waveform."""
        waveform = torch.zeros(latents.shape[2] * self.vae_scale_factor * self.hop_length)
        num_given = min(len(audio), len(waveform))
        waveform[:num_given] = audio[:num_given]
        return self.encode_waveforms(waveform[None], device).to(self.unet.dtype).expand_as(latents)

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        window_starts: list[int],
        condition: Conditioning,
        guidance_interval: tuple[float, float],
        generator,
        cross_attention_kwargs: dict | None,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs: list[str],
        keep: torch.Tensor | None = None,
        given_latents: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sampling loop. Every window predicts the noise of its frames with text and melody guidance; overlapping
        predictions are cross-faded (MultiDiffusion), then the scheduler steps the whole latent once. Where `keep` is 1
        the latents are reset after each step to `given_latents` noised to the next step. A callback may replace the
        latents and embeddings (updated in `condition`) and change the guidance scales for the following steps."""
        device = latents.device
        self._num_timesteps = len(timesteps)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator)
        # Up to three predictions per step: text and melody; text without melody (a melody term of its own); neither
        # (text guidance). The melody-free condition is the empty text's embedding and zero frames, as in training.
        guidance = self.prepare_guidance_inputs(condition, device)
        window = min(self.window_frames, latents.shape[2])
        ramp = (
            fade_ramp(window, self.window_overlap, device, latents.dtype)
            if len(window_starts) > 1
            else torch.ones(window, device=device, dtype=latents.dtype)
        )
        # Only windows with frames to generate run; kept frames outside them are reset after each step.
        active = [start for start in window_starts if keep is None or keep[0, 0, start : start + window].min() < 1]
        weights = torch.zeros(latents.shape[2], device=device, dtype=latents.dtype)
        for start in active:
            weights[start : start + window] += ramp
        weights = weights.clamp(min=1e-6)[:, None]
        with self.progress_bar(total=len(timesteps) * len(active)) as progress_bar:
            for i, t in enumerate(timesteps):
                # Outside guidance_interval both scales are 1: the prediction with text and melody, unguided.
                guided = guidance_interval[0] <= t / self.scheduler.config.num_train_timesteps <= guidance_interval[1]
                text_scale, melody_scale = (
                    (max(self._guidance_scale, 1.0), self._melody_guidance_scale) if guided else (1, 1)
                )
                noise_pred = torch.zeros_like(latents)
                for start in active:
                    frames = slice(start, start + window)
                    window_pred = self.predict_noise(
                        latents[:, :, frames], t, guidance, frames, text_scale, melody_scale, cross_attention_kwargs
                    )
                    noise_pred[:, :, frames] += window_pred * ramp[:, None]
                    progress_bar.update()
                latents = self.scheduler.step(noise_pred / weights, t, latents, **extra_step_kwargs).prev_sample
                if keep is not None:
                    last = i == len(timesteps) - 1
                    known = (
                        given_latents
                        if last
                        else self.scheduler.add_noise(
                            given_latents, noise, timesteps[i + 1 : i + 2].repeat(len(latents))
                        )
                    )
                    latents = keep * known + (1 - keep) * latents
                if callback_on_step_end is not None:
                    latents, changed = self.run_callback(
                        callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, latents, condition
                    )
                    # New embeddings, or scales that need other predictions (a melody dropped or brought back, a
                    # guidance term started or stopped), apply from the next step on.
                    if changed or self.guidance_terms != guidance.terms:
                        guidance = self.prepare_guidance_inputs(condition, device)
        return latents

    def predict_noise(
        self,
        latents: torch.Tensor,
        t,
        guidance: GuidanceInputs,
        frames: slice,
        text_scale: float,
        melody_scale: float,
        cross_attention_kwargs: dict | None,
    ) -> torch.Tensor:
        """The guided prediction for one window of latents: with text and melody ε(t, m), without the melody
        ε(t, ∅) and without either ε(∅, ∅), as `guidance.terms` asks:
        ε(t, ∅) + melody_scale · (ε(t, m) − ε(t, ∅)) + (text_scale − 1) · (ε(t, ∅) − ε(∅, ∅))."""
        _, do_melody_guidance, do_classifier_free_guidance = guidance.terms
        num_conditions = 1 + do_melody_guidance + do_classifier_free_guidance
        latent_model_input = self.scheduler.scale_model_input(torch.cat([latents] * num_conditions), t)
        if guidance.melody_frames is not None:
            latent_model_input = torch.cat([latent_model_input, guidance.melody_frames[:, :, frames]], dim=1)
        predictions = self.unet(
            latent_model_input,
            t,
            encoder_hidden_states=guidance.text_states,
            encoder_attention_mask=guidance.text_mask,
            class_labels=guidance.condition,
            cross_attention_kwargs=cross_attention_kwargs,
        ).sample
        predictions = list(predictions.chunk(num_conditions))
        prediction = with_melody = predictions.pop(0)
        without_melody = with_melody
        if do_melody_guidance:
            without_melody = predictions.pop(0)
            prediction = without_melody + melody_scale * (with_melody - without_melody)
        if do_classifier_free_guidance:
            prediction = prediction + (text_scale - 1) * (without_melody - predictions.pop(0))
        return prediction

    def run_callback(
        self, callback, tensor_inputs: list[str], step: int, t, latents: torch.Tensor, condition: Conditioning
    ) -> tuple[torch.Tensor, bool]:
        """`callback_on_step_end` after a step: returns the latents it gives back and whether it changed an embedding
        (written into `condition`); what it returns and the scales it sets are checked."""
        tensors = {
            "latents": latents,
            "prompt_embeds": condition.prompt_embeds,
            "negative_prompt_embeds": condition.negative_prompt_embeds,
            "melody_embeds": condition.melody_embeds,
        }
        outputs = callback(self, step, t, {name: tensors[name] for name in tensor_inputs})
        if not isinstance(outputs, dict):
            raise TypeError(
                f"callback_on_step_end must return a dict of tensors (e.g. {{}} or {{'latents': latents}}), got "
                f"{type(outputs).__name__}."
            )
        for name, value in outputs.items():
            if name not in tensors or tensors[name] is None:
                raise ValueError(
                    f"callback_on_step_end returned {name!r}, which this call does not use "
                    f"(it uses {[n for n, v in tensors.items() if v is not None]})."
                )
            if value is not tensors[name]:
                check_tensor(f"the {name} callback_on_step_end returned", value, tuple(tensors[name].shape))
        changed = [name for name in outputs if name != "latents" and outputs[name] is not tensors[name]]
        if self.config.text_attention and any(name.endswith("prompt_embeds") for name in changed):
            raise ValueError(
                "callback_on_step_end changed prompt_embeds or negative_prompt_embeds, which this model "
                "(text_attention) reads as words it cannot change mid-call."
            )
        check_number("the guidance_scale callback_on_step_end set", self._guidance_scale, 0, MAX_GUIDANCE_SCALE)
        check_number(
            "the melody_guidance_scale callback_on_step_end set", self._melody_guidance_scale, 0, MAX_GUIDANCE_SCALE
        )
        for name in changed:
            setattr(condition, name, outputs[name])
        return outputs.get("latents", latents), bool(changed)

    def postprocess(
        self,
        latents: torch.Tensor,
        num_samples: int,
        guiding: list[GuidingMelody | None],
        condition: Conditioning,
        output_type: str,
        return_dict: bool,
    ) -> MG2PipelineOutput | tuple:
        """Latents → log-mel → waveforms of `num_samples` (window by window for long audio), within ±1; each prompt's
        candidates re-ranked by CLMP text–audio similarity, best first."""
        self.check_finite(latents)
        if output_type == "latent":
            self.maybe_free_model_hooks()
            output = (latents, guiding)
            return MG2PipelineOutput(*output, sampling_rate=self.sampling_rate) if return_dict else output
        audio = self.vocode(self.decode_latents(latents)).float()[:, :num_samples]
        self.check_finite(audio)
        audio = peak_safe(audio)  # a waveform peaking above 1 is scaled down to peak at 1, so that no file clips
        per_prompt = condition.num_waveforms_per_prompt
        if per_prompt > 1:
            prompt_embeds = condition.prompt_embeds
            scores = self.score_waveforms(audio, prompt_embeds).view(-1, per_prompt)
            offsets = per_prompt * torch.arange(scores.shape[0], device=scores.device)[:, None]
            order = (torch.argsort(scores, dim=1, descending=True) + offsets).reshape(-1).cpu()
            audio = audio[order.to(audio.device)]
            guiding = [guiding[i] for i in order.tolist()]
        self.maybe_free_model_hooks()
        audio = audio.cpu()
        if output_type == "np":
            audio = audio.numpy()
        if not return_dict:
            return audio, guiding
        return MG2PipelineOutput(audios=audio, melodies=guiding, sampling_rate=self.sampling_rate)

    # ----- text to music -----

    @property
    def default_guidance_scales(self) -> tuple[float, float]:
        """The text and melody guidance scales by default: `DEFAULT_GUIDANCE_SCALE` and `DEFAULT_MELODY_GUIDANCE_SCALE`,
        or 1 and 1 (one UNet pass per step) for a UNet distilled to give the guided prediction itself."""
        if self.config.get("distilled_guidance_scale") is not None:
            return 1.0, 1.0
        return DEFAULT_GUIDANCE_SCALE, DEFAULT_MELODY_GUIDANCE_SCALE

    def guidance_scales(
        self, guidance_scale: float | None, melody_guidance_scale: float | None
    ) -> tuple[float, float]:
        """The scales a call asked for, each defaulting to `default_guidance_scales`."""
        default_text, default_melody = self.default_guidance_scales
        return (
            default_text if guidance_scale is None else guidance_scale,
            default_melody if melody_guidance_scale is None else melody_guidance_scale,
        )

    @property
    def default_num_inference_steps(self) -> int:
        """This task's default steps for this model: few for a UNet that predicts x₀, which holds its quality there,
        fewer for one also distilled to give the guided prediction."""
        if self.scheduler.config.get("prediction_type") != "sample":
            return DEFAULT_NUM_INFERENCE_STEPS
        if self.config.get("distilled_guidance_scale") is not None:
            return DEFAULT_DISTILLED_NUM_INFERENCE_STEPS
        return DEFAULT_X0_NUM_INFERENCE_STEPS

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        melody: Any = None,
        audio_length_in_s: float | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        melody_guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        num_waveforms_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        retrieval_top_k: int = 1,
        match_prompt_facts: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        melody_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> MG2PipelineOutput | tuple:
        """Generate music for `prompt`, guided by the nearest melody in the index or by `melody`.

        Args:
            prompt: text or list of texts (at most 64, each at most 2000 characters, readable by the text tower:
                see `check_prompt`).
            negative_prompt: replaces the empty text as the unconditional input of classifier-free guidance.
            melody: guide with this melody instead of retrieving one: a `Melody`, a MIDI/MusicXML/ABC/audio path,
                a token or note string ("G4:0.5 A4:0.5"), or a 16 kHz waveform to transcribe; one for every prompt
                or a list with one per prompt.
            audio_length_in_s: seconds of audio, up to 600: longer than the UNet's window (10.24 s for `small`), it is
                denoised in windows that overlap by at least 1/32 and are fused at every step (MultiDiffusion).
                Default: the melody's length (once through, not looped), else one window. Given explicitly, a shorter
                melody is repeated whole to fill it. Rounded up to whole latent frames.
            num_inference_steps: denoising steps, 1 to 1000 (default `default_num_inference_steps`: 4 for an
                x₀-predicting model, 3 if it is also guidance-distilled, else 25).
            guidance_scale: text guidance scale (classifier-free); <= 1 disables it. Default: `default_guidance_scales`
                (3, or 1 for a guidance-distilled model).
            melody_guidance_scale: melody guidance scale, independent of the text's: 0 ignores the melody, 1 takes it
                without guidance, larger follows it more tightly (the melody term of InstructPix2Pix-style guidance).
                Equal to `guidance_scale` it is plain classifier-free guidance of both, one UNet pass fewer per step.
                Default: as `guidance_scale`'s.
            guidance_interval: where in the noise schedule both guidance scales apply, as fractions of the training
                timesteps (`t / num_train_timesteps` from `low` to `high`); elsewhere both are 1 (Kynkäänniemi et al.,
                2024).
            num_waveforms_per_prompt: candidates per prompt (prompts × candidates at most 64), re-ranked best first by
                CLMP text–audio similarity; with `retrieval_top_k` > 1 they cycle through the top-k retrieved melodies.
            generator, latents: seeding as in diffusers; the same generator gives identical output. `latents` must be
                finite and floating point; they are cast to the UNet's dtype.
            retrieval_top_k: retrieved melodies per prompt.
            match_prompt_facts: retrieve among the melodies whose tune type, origin, meter and key match what the
                prompt names (`MelodyRetriever.search_matching`, falling back fact by fact to plain nearest-neighbour
                search); each guide's `metadata["matched_facts"]` says which. False: nearest neighbours only.
            prompt_embeds, negative_prompt_embeds, melody_embeds: precomputed CLMP embeddings `(batch, projection_dim)`,
                unit rows (see `encode_prompt`), instead of `prompt`, `negative_prompt`, the retrieved melody.
            output_type: "np" or "pt" waveforms, or "latent".
            cross_attention_kwargs: passed to the UNet's attention processors (e.g. `{"scale": 0.5}` for a LoRA).
            callback_on_step_end: `fn(pipe, step, timestep, tensors) -> dict` after each step, or a diffusers
                `PipelineCallback`/`MultiPipelineCallbacks` (which name their own tensor inputs); returned tensors (any of
                `_callback_tensor_inputs`) replace ours, and it may change `pipe._guidance_scale` and
                `pipe._melody_guidance_scale` for the following steps (the predictions each step makes follow the new
                scales: a melody dropped at 0 or brought back, a guidance term started or stopped).

        Every argument is checked before any compute (`check_inputs`): a wrong type raises `TypeError`, a wrong value
        (NaN, infinity, out of range, mismatched sizes) `ValueError`, each naming the argument and what it accepts.
        To continue, re-render or repaint a recording, use `MG2InpaintPipeline` or `MG2AudioToAudioPipeline`
        (`from_pipe(pipe)`).
        """
        # 1. Check inputs
        if num_inference_steps is None:
            num_inference_steps = self.default_num_inference_steps
        guidance_scale, melody_guidance_scale = self.guidance_scales(guidance_scale, melody_guidance_scale)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        batch_size = self.check_inputs(
            prompt, negative_prompt, melody, audio_length_in_s, num_inference_steps, guidance_scale,
            melody_guidance_scale, guidance_interval, num_waveforms_per_prompt, retrieval_top_k, match_prompt_facts,
            generator, latents, prompt_embeds, negative_prompt_embeds, melody_embeds, output_type, return_dict,
            cross_attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        melodies = self.read_melodies(melody, batch_size) if melody is not None else None
        play_once = audio_length_in_s is None  # no length asked for: melodies play once through, not repeated
        if latents is not None and audio_length_in_s is None:
            audio_length_in_s = latents.shape[2] * self.vae_scale_factor * self.hop_length / self.sampling_rate
        self._guidance_scale, self._melody_guidance_scale = guidance_scale, melody_guidance_scale
        device = self._execution_device

        # 2. Encode the prompt (and the negative prompt) with CLMP's text tower, one row per waveform
        condition = self.encode_condition(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_waveforms_per_prompt, device
        )

        # 3. Take the user's melody, or retrieve one per waveform
        guiding, condition.melody_embeds = self.prepare_melodies(
            condition.prompts, condition.prompt_embeds, melodies, melody_embeds, num_waveforms_per_prompt,
            retrieval_top_k, match_prompt_facts, device,
        )  # fmt: skip

        # 4. Fix the length and place each melody in it
        audio_length_in_s, starts, placed, guiding = self.place_melodies(guiding, audio_length_in_s, play_once)

        # 5. Prepare timesteps, the starting noise and the time-aligned melody frames
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(
            len(guiding), self.mel_frames(audio_length_in_s), self.unet.dtype, device, generator, latents
        )
        condition.melody_frames = self.prepare_aligned_melody(placed, latents, device)

        # 6. Denoise
        latents = self.denoise(
            latents, self.scheduler.timesteps, starts, condition, guidance_interval, generator, cross_attention_kwargs,
            callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip

        # 7. Decode, vocode and re-rank the candidates
        num_samples = int(round(audio_length_in_s * self.sampling_rate))
        return self.postprocess(latents, num_samples, guiding, condition, output_type, return_dict)
