"""MG2's inpainting task: regenerate a span of a recording and keep the rest; a span past its end continues it."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from .defaults import DEFAULT_NUM_INFERENCE_STEPS
from .pipeline_mg2 import MAX_AUDIO_LENGTH_S, MG2Pipeline, MG2PipelineOutput, check_number


class MG2InpaintPipeline(MG2Pipeline):
    """Regenerate a span of a recording for a prompt and keep the rest, or continue the recording past its end. Kept
    latent frames are the recording's own and blend into the new ones over a short ramp. The same components as
    `MG2Pipeline`: load any MG2 checkpoint with `from_pretrained`, or share a loaded pipeline's with
    `MG2InpaintPipeline.from_pipe(pipe)`."""

    def check_span(self, given_audio: torch.Tensor, repaint_start_s, repaint_end_s, strength) -> bool:
        """Whether the span continues the recording (`repaint_start_s` None) rather than repaints inside it; a
        ValueError names the argument that does not fit."""
        given_s = len(given_audio) / self.sampling_rate
        if repaint_end_s is None:
            raise ValueError(
                f"repaint_end_s is None: pass where the regenerated span ends (inside the recording, or past its "
                f"end, {given_s:.2f} s, to continue it)."
            )
        check_number("repaint_end_s", repaint_end_s, 0, MAX_AUDIO_LENGTH_S)
        if repaint_start_s is None:
            if self.mel_frames(repaint_end_s) <= self.mel_frames(given_s):
                raise ValueError(
                    f"repaint_end_s must be past the recording's end ({given_s:.2f} s) to continue it, got "
                    f"{repaint_end_s:g}."
                )
            if strength != 1:
                raise ValueError(f"strength must be 1 for a continuation (it starts from noise), got {strength}.")
            return True
        check_number("repaint_start_s", repaint_start_s, 0, given_s)
        check_number("repaint_end_s", repaint_end_s, 0, given_s)
        min_length = round(self.frames_multiple * self.hop_length / self.sampling_rate, 2)
        if repaint_end_s - repaint_start_s < min_length:
            raise ValueError(
                f"repaint_end_s must be at least {min_length} s after repaint_start_s, got {repaint_start_s} to "
                f"{repaint_end_s}."
            )
        return False

    @property
    def default_num_inference_steps(self) -> int:
        """A recording's task keeps the full schedule: `strength` takes its share of it."""
        return DEFAULT_NUM_INFERENCE_STEPS

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        audio: Any = None,
        repaint_start_s: float | None = None,
        repaint_end_s: float | None = None,
        strength: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        melody: Any = None,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        guidance_scale: float | None = None,
        melody_guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        num_waveforms_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        retrieval_top_k: int = 1,
        match_prompt_facts: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> MG2PipelineOutput | tuple:
        """Regenerate `repaint_start_s`–`repaint_end_s` of `audio` for `prompt`, or continue it to `repaint_end_s`.

        Args:
            audio: the recording, one for every prompt: a path (read and resampled), or a mono waveform at
                `sampling_rate`.
            repaint_start_s: where the regenerated span starts, inside the recording; None continues the recording
                from its end.
            repaint_end_s: where the span ends: inside the recording for a repaint (the output is as long as the
                recording), past its end for a continuation (the output lasts until then, up to 600 s).
            strength: how much noise is added to the span's latents before denoising, in (0, 1]; 1 (the default)
                regenerates it from noise, as a continuation always does.
            melody: guide with this melody (as in `MG2Pipeline`, from the start of the audio). Without it a repaint
                follows the melody transcribed from the recording, and a continuation a retrieved melody from where the
                recording ends.

        The other arguments are `MG2Pipeline.__call__`'s.
        """
        # 1. Check inputs
        guidance_scale, melody_guidance_scale = self.guidance_scales(guidance_scale, melody_guidance_scale)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        batch_size = self.check_inputs(
            prompt, negative_prompt, melody, None, num_inference_steps, guidance_scale, melody_guidance_scale,
            guidance_interval, num_waveforms_per_prompt, retrieval_top_k, match_prompt_facts, generator, None,
            prompt_embeds, negative_prompt_embeds, None, output_type, return_dict, cross_attention_kwargs,
            callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        self.check_recording(audio, strength, num_inference_steps)
        given_audio = self.read_audio(audio)
        continuation = self.check_span(given_audio, repaint_start_s, repaint_end_s, strength)
        given_s = len(given_audio) / self.sampling_rate
        melodies = self.read_melodies(melody, batch_size) if melody is not None else None
        self._guidance_scale, self._melody_guidance_scale = guidance_scale, melody_guidance_scale
        device = self._execution_device

        # 2. Encode the prompt (and the negative prompt) with CLMP's text tower, one row per waveform
        condition = self.encode_condition(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_waveforms_per_prompt, device
        )

        # 3. The user's melody; else the recording's own for a repaint, or a retrieved one for a continuation
        source = "user" if melodies is not None else "audio"
        if melodies is None and not continuation and self.config.condition != "text":
            melodies = [self.transcribe(given_audio)] * batch_size
        guiding, condition.melody_embeds = self.prepare_melodies(
            condition.prompts, condition.prompt_embeds, melodies, None, num_waveforms_per_prompt, retrieval_top_k,
            match_prompt_facts, device, source,
        )  # fmt: skip

        # 4. The length, and each melody placed in it: a retrieved one continues from where the recording ends,
        # repeated whole to the end; the user's or the recording's plays from the start
        audio_length_in_s = repaint_end_s if continuation else given_s
        melody_start_s = given_s if continuation and melody is None else 0.0
        audio_length_in_s, starts, placed, guiding = self.place_melodies(
            guiding, audio_length_in_s, play_once=not continuation, melody_start_s=melody_start_s
        )

        # 5. Prepare timesteps and latents: the kept frames are the recording's, noised to the first timestep
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(
            len(guiding), self.mel_frames(audio_length_in_s), self.unet.dtype, device, generator
        )
        noise = latents / self.scheduler.init_noise_sigma
        given_latents = self.encode_audio_latents(given_audio, latents, device)
        timesteps, latents = self.noise_to_strength(given_latents, latents, num_inference_steps, strength)
        given_frames = len(given_audio) // (self.vae_scale_factor * self.hop_length)
        mode = "continuation" if continuation else "repaint"
        keep = self.keep_mask(mode, latents.shape[2], given_frames, repaint_start_s, repaint_end_s, device)
        keep = keep.to(latents.dtype)
        first = timesteps[:1].repeat(len(latents))
        latents = keep * self.scheduler.add_noise(given_latents, noise, first) + (1 - keep) * latents
        condition.melody_frames = self.prepare_aligned_melody(placed, latents, device)

        # 6. Denoise the span; the kept frames are reset to the recording after every step
        latents = self.denoise(
            latents, timesteps, starts, condition, guidance_interval, generator, cross_attention_kwargs,
            callback_on_step_end, callback_on_step_end_tensor_inputs, keep=keep, given_latents=given_latents,
            noise=noise,
        )  # fmt: skip

        # 7. Decode, vocode and re-rank the candidates
        num_samples = int(round(audio_length_in_s * self.sampling_rate))
        return self.postprocess(latents, num_samples, guiding, condition, output_type, return_dict)
