"""MG2's audio-to-audio task: re-render a recording for a prompt (diffusers' img2img for audio)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from .defaults import (
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_STRENGTH,
)
from .pipeline_mg2 import MG2Pipeline, MG2PipelineOutput


class MG2AudioToAudioPipeline(MG2Pipeline):
    """Re-render a recording for a prompt: its latents are noised to `strength` and denoised with the text and a
    melody, by default the one transcribed from the recording. The same components as `MG2Pipeline`: load any MG2
    checkpoint with `from_pretrained`, or share a loaded pipeline's with `MG2AudioToAudioPipeline.from_pipe(pipe)`."""

    @property
    def default_num_inference_steps(self) -> int:
        """A recording's task keeps the full schedule: `strength` takes its share of it."""
        return DEFAULT_NUM_INFERENCE_STEPS

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        audio: Any = None,
        strength: float = DEFAULT_STRENGTH,
        negative_prompt: str | list[str] | None = None,
        melody: Any = None,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        guidance_scale: float | None = None,
        melody_guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        num_waveforms_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> MG2PipelineOutput | tuple:
        """Re-render `audio` for `prompt`; the output is as long as the recording.

        Args:
            audio: the recording, one for every prompt: a path (read and resampled), or a mono waveform at
                `sampling_rate`.
            strength: how much noise is added to the recording's latents before denoising, in (0, 1]: lower keeps more
                of the recording; at 1 the result is text-to-music with the same melody and generator.
            melody: guide with this melody (as in `MG2Pipeline`) instead of the one transcribed from `audio`.

        The other arguments are `MG2Pipeline.__call__`'s.
        """
        # 1. Check inputs
        guidance_scale, melody_guidance_scale = self.guidance_scales(guidance_scale, melody_guidance_scale)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        batch_size = self.check_inputs(
            prompt, negative_prompt, melody, None, num_inference_steps, guidance_scale, melody_guidance_scale,
            guidance_interval, num_waveforms_per_prompt, 1, True, generator, None, prompt_embeds,
            negative_prompt_embeds, None, output_type, return_dict, cross_attention_kwargs, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        self.check_recording(audio, strength, num_inference_steps)
        given_audio = self.read_audio(audio)
        melodies = self.read_melodies(melody, batch_size) if melody is not None else None
        self._guidance_scale, self._melody_guidance_scale = guidance_scale, melody_guidance_scale
        device = self._execution_device

        # 2. Encode the prompt (and the negative prompt) with CLMP's text tower, one row per waveform
        condition = self.encode_condition(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_waveforms_per_prompt, device
        )

        # 3. The user's melody, or the one transcribed from the recording
        source = "user" if melodies is not None else "audio"
        if melodies is None and self.config.condition != "text":
            melodies = [self.transcribe(given_audio)] * batch_size
        guiding, condition.melody_embeds = self.prepare_melodies(
            condition.prompts, condition.prompt_embeds, melodies, None, num_waveforms_per_prompt, 1, True, device,
            source,
        )  # fmt: skip

        # 4. The recording's length, the melody once through from its start
        audio_length_in_s = len(given_audio) / self.sampling_rate
        audio_length_in_s, starts, placed, guiding = self.place_melodies(guiding, audio_length_in_s, play_once=True)

        # 5. Prepare timesteps, the recording's latents noised to `strength` and the melody frames
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(
            len(guiding), self.mel_frames(audio_length_in_s), self.unet.dtype, device, generator
        )
        given_latents = self.encode_audio_latents(given_audio, latents, device)
        timesteps, latents = self.noise_to_strength(given_latents, latents, num_inference_steps, strength)
        condition.melody_frames = self.prepare_aligned_melody(placed, latents, device)

        # 6. Denoise
        latents = self.denoise(
            latents, timesteps, starts, condition, guidance_interval, generator, cross_attention_kwargs,
            callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip

        # 7. Decode, vocode and re-rank the candidates
        num_samples = len(given_audio)
        return self.postprocess(latents, num_samples, guiding, condition, output_type, return_dict)
