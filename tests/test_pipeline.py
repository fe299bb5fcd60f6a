import os
import subprocess
import sys
import textwrap

import librosa
import numpy as np
import pytest
import soundfile
import torch
from conftest import BLOCK_MG2_PIPELINE, ROOT
from diffusers import (
    AutoencoderKL,
    ConfigMixin,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    ModelMixin,
    UNet2DConditionModel,
)
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

from mg2_pipeline import (
    GriffinLimVocoder,
    LogMelSpectrogram,
    MelAutoencoderKL,
    Melody,
    MG2AudioToAudioPipeline,
    MG2InpaintPipeline,
    MG2Pipeline,
)
from mg2_pipeline.audio import F_MAX, F_MIN, N_MELS
from mg2_pipeline.defaults import (
    DEFAULT_DISTILLED_NUM_INFERENCE_STEPS,
    DEFAULT_NUM_INFERENCE_STEPS,
    DEFAULT_X0_NUM_INFERENCE_STEPS,
)
from mg2_pipeline.presets import build_pipeline, load_pipeline, unet_config, vae_config

PROMPT = "a lively Irish jig on fiddle"


@pytest.fixture(scope="module")
def pipe():
    pipeline = build_pipeline("tiny", seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 3, "audio_length_in_s": 1.0, **kwargs}
    return pipe(kwargs.pop("prompt", PROMPT), generator=torch.Generator().manual_seed(seed), **kwargs)


def test_generates_finite_audio_of_the_requested_length_deterministically(pipe):
    out = generate(pipe, audio_length_in_s=1.3)
    assert out.sampling_rate == 16000
    assert out.audios.shape == (1, 20800) and out.audios.dtype == np.float32
    assert np.all(np.isfinite(out.audios)) and np.abs(out.audios).max() > 0
    np.testing.assert_array_equal(out.audios, generate(pipe, audio_length_in_s=1.3).audios)
    assert not np.allclose(out.audios, generate(pipe, seed=1, audio_length_in_s=1.3).audios)
    # a batch of prompts, torch output, and latents
    batch = generate(pipe, prompt=[PROMPT, "a slow air on flute"], output_type="pt")
    assert isinstance(batch.audios, torch.Tensor) and batch.audios.shape == (2, 16000)
    latents = generate(pipe, output_type="latent").audios
    assert latents.shape == (
        1,
        4,
        50,
        32,
    )  # 1.0 s → 100 mel frames (a multiple of 4 = VAE ×2 · UNet ×2), ÷2 by the VAE


def test_retrieval_guides_by_default_and_a_user_melody_replaces_it(pipe, tmp_path):
    retrieved = generate(pipe)
    guide = retrieved.melodies[0]
    assert guide.id is not None and guide.metadata["source"] == "preset" and -1 <= guide.score <= 1
    expected_id = pipe.retriever.search_matching(pipe.encode_text([PROMPT], pipe.device), [PROMPT], k=1).ids[0, 0]
    assert guide.id == expected_id and guide.metadata["matched_facts"] == {"tune_type": "jig"}  # PROMPT names a jig

    user = Melody.from_string("G4:0.5 A4:0.5 B4:1")
    from_melody = generate(pipe, melody=user)
    assert from_melody.melodies[0].id is None and from_melody.melodies[0].melody == user
    assert from_melody.melodies[0].metadata["source"] == "user" and from_melody.melodies[0].metadata["repeats"] == 1
    assert not np.allclose(from_melody.audios, retrieved.audios)
    # the same melody as a note string gives the same music; as tokens, the same notes up to the tokens' time bins
    np.testing.assert_array_equal(generate(pipe, melody="G4:0.5 A4:0.5 B4:1").audios, from_melody.audios)
    from_tokens = generate(pipe, melody=user.to_tokens()).melodies[0].melody
    assert from_tokens.pitches.tolist() == user.pitches.tolist()
    np.testing.assert_allclose(from_tokens.notes[:, 1:], user.notes[:, 1:], atol=0.02)
    user.to_midi(tmp_path / "tune.mid")
    from_midi = generate(pipe, melody=str(tmp_path / "tune.mid"))
    assert from_midi.melodies[0].melody.pitches.tolist() == [67, 69, 71]
    # the aligned path needs the notes; a pooled-only model takes precomputed melody embeddings instead of retrieval
    embeds = pipe.encode_melody([user], pipe.device)
    with pytest.raises(ValueError, match="melody_embeds carry no timing"):
        generate(pipe, melody_embeds=embeds)
    pooled = build_pipeline("tiny", seed=0, aligned_melody=None)
    pooled.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(
        generate(pooled, melody_embeds=embeds).audios, generate(pooled, melody=user).audios, atol=1e-6
    )


def test_a_waveform_melody_is_transcribed(pipe):
    t = np.arange(16000 * 2) / 16000
    notes = [(69, 0.0, 0.5), (72, 0.5, 1.0), (76, 1.0, 1.5)]
    waveform = sum(
        np.where((t >= on) & (t < off), 0.4 * np.sin(2 * np.pi * 440 * 2 ** ((p - 69) / 12) * t), 0.0)
        for p, on, off in notes
    ).astype(np.float32)
    out = generate(pipe, melody=waveform)
    assert out.melodies[0].melody.pitches.tolist() == [69, 72, 76]


def test_text_and_melody_guidance_each_add_a_prediction_and_change_the_output(pipe):
    batches = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    try:
        outputs = [
            generate(
                pipe,
                guidance_scale=text,
                melody_guidance_scale=melody,
                num_inference_steps=1,
                negative_prompt=negative,
                audio_length_in_s=0.64,
            )  # one window: one UNet call per step
            for text, melody, negative in [
                (3.0, 1.0, None),
                (1.0, 1.0, None),
                (3.0, 1.0, "noise"),
                (1.0, 0.0, None),
                (3.0, 2.0, None),
                (1.0, 2.0, None),
                (3.0, 3.0, None),
            ]
        ]
        # Equal scales are classifier-free guidance of text and melody together: the melody-free prediction cancels.
        nearly_equal = generate(
            pipe, guidance_scale=3.0, melody_guidance_scale=3.0 + 1e-6, num_inference_steps=1, audio_length_in_s=0.64
        )
    finally:
        hook.remove()
    assert batches == [
        3,
        1,
        3,
        1,
        3,
        2,
        2,
        3,
    ]  # melody guidance 0, or equal to the text's, needs no melody-free prediction
    audios = [out.audios for out in outputs]
    assert all(not np.allclose(audios[i], audios[j]) for i in range(len(audios)) for j in range(i))
    np.testing.assert_allclose(nearly_equal.audios, audios[-1], atol=1e-4 * np.abs(audios[-1]).max())


@pytest.mark.parametrize(
    "guidance_scale, melody_guidance_scale, rows",
    [(3.0, 2.0, ["prompt", "prompt", "negative"]), (3.0, 3.0, ["prompt", "negative"]), (1.0, 1.0, ["prompt"])],
)
def test_text_attention_feeds_each_prediction_its_own_words(guidance_scale, melody_guidance_scale, rows):
    pipeline = build_pipeline("tiny", seed=0, text_attention=True)
    pipeline.set_progress_bar_config(disable=True)
    seen = []
    forward = pipeline.unet.forward

    def recording_forward(sample, timestep, encoder_hidden_states=None, encoder_attention_mask=None, **kwargs):
        seen.append((encoder_hidden_states, encoder_attention_mask))
        return forward(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            **kwargs,
        )

    pipeline.unet.forward = recording_forward
    texts = {"prompt": PROMPT, "negative": "a noisy recording"}
    generate(
        pipeline,
        negative_prompt=texts["negative"],
        guidance_scale=guidance_scale,
        melody_guidance_scale=melody_guidance_scale,
        melody="G4:0.5 A4:0.5",
        num_inference_steps=2,
    )
    expected_states, expected_mask = pipeline.encode_text_states([texts[row] for row in rows], "cpu")
    assert len(seen) >= 2  # every window of every step
    for states, mask in seen:
        torch.testing.assert_close(states, expected_states)
        assert torch.equal(mask, expected_mask)
    with pytest.raises(ValueError, match="prompt_embeds"):
        pipeline(prompt_embeds=pipeline.encode_text([PROMPT], "cpu"), melody="G4:0.5", num_inference_steps=2)
    with pytest.raises(ValueError, match="text_attention=True"):  # a UNet that attends to text, loaded without it
        MG2Pipeline(**pipeline.components, aligned_melody="sketch")


class MelodyOracleUNet(ModelMixin, ConfigMixin):
    """A denoiser that knows the answer: clean latents equal to the melody frames when it is given them, zeros otherwise.
    With it, the final latents show exactly how much of the melody each guidance setting lets through."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 8,
        out_channels: int = 4,
        sample_size=(32, 32),
        block_out_channels=(16, 32),
        projection_class_embeddings_input_dim: int = 64,
    ):
        super().__init__()
        self.register_buffer(
            "alphas_cumprod", torch.cumprod(1 - torch.linspace(0.0015**0.5, 0.0195**0.5, 1000) ** 2, 0)
        )

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        class_labels=None,
        cross_attention_kwargs=None,
    ):
        latents, frames = sample[:, : self.config.out_channels], sample[:, self.config.out_channels :]
        alpha = self.alphas_cumprod[int(timestep)]
        return UNet2DConditionOutput(sample=(latents - alpha.sqrt() * frames) / (1 - alpha).sqrt())


def test_melody_guidance_zero_ignores_the_melody_and_larger_follows_it(pipe):
    oracle = MG2Pipeline(
        **{
            **pipe.components,
            "unet": MelodyOracleUNet(),
            "scheduler": DDIMScheduler.from_config(pipe.scheduler.config),
        },
        aligned_melody="sketch",
    )
    oracle.set_progress_bar_config(disable=True)
    melody = Melody.from_string("C5:0.25 E5:0.25 G5:0.25 R:0.25")
    frames = oracle.prepare_melody_frames([melody.fit_to(1.0)], 50, "cpu", torch.float32)

    def adherence(scale):
        """How much the final latents point along the melody frames (cosine) and how far (the gain: the guided clean
        latents are `scale` × the frames, as the oracle's are the frames themselves)."""
        latents = generate(
            oracle,
            melody=melody,
            melody_guidance_scale=scale,
            guidance_scale=1.0,
            num_inference_steps=20,
            output_type="latent",
        ).audios.flatten()
        cosine = torch.nn.functional.cosine_similarity(latents, frames.flatten(), dim=0).item()
        return cosine, (latents @ frames.flatten() / frames.flatten().square().sum()).item()

    (ignored, ignored_gain), (followed, gain), (tighter, tighter_gain) = adherence(0.0), adherence(1.0), adherence(2.0)
    assert abs(ignored) < 0.2 < 0.9 < min(followed, tighter)
    assert abs(ignored_gain) < 0.1 and abs(gain - 1) < 0.1 and abs(tighter_gain - 2) < 0.2


def test_candidates_are_reranked_by_clmp_text_audio_similarity(pipe):
    out = generate(pipe, prompt=[PROMPT, "a chorale"], num_waveforms_per_prompt=3, retrieval_top_k=3)
    assert out.audios.shape == (6, 16000) and len(out.melodies) == 6
    text = pipe.encode_text([PROMPT] * 3 + ["a chorale"] * 3, pipe.device)
    scores = pipe.score_waveforms(torch.from_numpy(out.audios), text).view(2, 3)
    assert torch.all(scores[:, :-1] >= scores[:, 1:] - 1e-6)
    top3 = pipe.retriever.search_matching(pipe.encode_text([PROMPT], pipe.device), [PROMPT], k=3).ids[0]
    assert sorted(m.id for m in out.melodies[:3]) == sorted(top3.tolist())  # one candidate per retrieved melody


def test_callback_on_step_end_sees_and_replaces_latents(pipe):
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape), tuple(tensors["melody_embeds"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = generate(
        pipe,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "melody_embeds"],
        output_type="latent",
    )
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == (1, 32)
    assert torch.count_nonzero(out.audios) == 0


@pytest.mark.parametrize(
    "start, changed",
    [
        ((3.0, 3.0), (3.0, 0.0)),
        ((3.0, 0.0), (3.0, 3.0)),
        ((1.0, 1.0), (1.0, 0.0)),
        ((1.0, 0.0), (1.0, 1.0)),
        ((3.0, 3.0), (3.0, 1.5)),
        ((3.0, 2.0), (1.0, 2.0)),
    ],
)
def test_a_callback_that_changes_the_scales_continues_as_a_run_at_the_new_scales(pipe, start, changed):
    # DDIM keeps no history, so after the first step the run depends only on the latents and the scales: the changed
    # run must equal a run at the new scales resumed from the same latents, and differ from a run that kept the old.
    ddim = MG2Pipeline.from_pipe(pipe, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    ddim.set_progress_bar_config(disable=True)
    after_first_step = {}

    def change_scales(pipeline, step, timestep, tensors):
        if step == 0:
            after_first_step["latents"] = tensors["latents"].clone()
            pipeline._guidance_scale, pipeline._melody_guidance_scale = changed
        return {}

    def resume_from_changed_run(pipeline, step, timestep, tensors):
        return {"latents": after_first_step["latents"].clone()} if step == 0 else {}

    def run(scales, callback=None):
        return generate(
            ddim,
            guidance_scale=scales[0],
            melody_guidance_scale=scales[1],
            output_type="latent",
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["latents"],
        ).audios

    with_change = run(start, change_scales)
    assert (ddim.guidance_scale, ddim.melody_guidance_scale) == changed
    torch.testing.assert_close(with_change, run(changed, resume_from_changed_run), rtol=0, atol=1e-6)
    assert (with_change - run(start)).abs().max() > 1e-4 * with_change.abs().max()


def test_loud_output_is_scaled_to_full_scale_and_no_written_file_clips(tmp_path):
    from mg2_pipeline import save_audio

    loud = build_pipeline("tiny", seed=0)
    loud.set_progress_bar_config(disable=True)
    quiet = generate(loud).audios
    vocode = loud.vocode
    loud.vocode = lambda mel: vocode(mel) * 4 / np.abs(quiet).max()  # peaks at 4
    out = generate(loud).audios
    np.testing.assert_allclose(out, quiet / np.abs(quiet).max(), atol=1e-6)
    loud.vocode = lambda mel: vocode(mel) * 0.5 / np.abs(quiet).max()  # peaks at 0.5: left as it is
    np.testing.assert_allclose(generate(loud).audios, 0.5 * quiet / np.abs(quiet).max(), atol=1e-6)
    save_audio(tmp_path / "loud.wav", out[0])
    written, _ = soundfile.read(tmp_path / "loud.wav")
    assert np.sum(np.abs(written) >= 32767 / 32768) <= 1
    with pytest.raises(ValueError, match="peaks at 4.000, beyond ±1"):
        save_audio(tmp_path / "clipped.wav", 4 * out[0])


def test_a_callback_cannot_set_a_scale_out_of_range(pipe):
    def negative_scale(pipeline, step, timestep, tensors):
        pipeline._melody_guidance_scale = -1.0
        return {}

    with pytest.raises(
        ValueError, match="melody_guidance_scale callback_on_step_end set must be a number between 0 and"
    ):
        generate(pipe, callback_on_step_end=negative_scale)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": None}, "prompt is None"),
        ({"prompt": "  "}, "prompt is empty"),
        ({"prompt": ["a", ""]}, "prompt is empty"),
        ({"prompt": 3}, "prompt must be a string"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x"]}, "negative_prompt has 1 entries but prompt has 2"),
        ({"audio_length_in_s": 0}, "audio_length_in_s must be a number between"),
        ({"audio_length_in_s": 601.0}, "audio_length_in_s must be a number between"),
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer between 1 and 1000"),
        ({"guidance_scale": -1}, "^guidance_scale must be a number between 0 and 100"),
        ({"guidance_scale": float("nan")}, "^guidance_scale must be a number between 0 and 100"),
        ({"melody_guidance_scale": -0.5}, "melody_guidance_scale must be a number between 0 and 100"),
        ({"melody_guidance_scale": float("inf")}, "melody_guidance_scale must be a number between 0 and 100"),
        ({"melody_guidance_scale": "2"}, "melody_guidance_scale must be a number between 0 and 100"),
        ({"num_waveforms_per_prompt": 0}, "num_waveforms_per_prompt must be an integer between 1 and 64"),
        ({"retrieval_top_k": 99}, "retrieval_top_k must be an integer between 1 and 6"),
        ({"melody": "H9:1"}, "melody could not be read"),
        ({"melody": "missing.mid"}, "melody could not be read: Unreadable MIDI file"),
        ({"melody": np.zeros(16000, np.float32)}, "melody could not be read: .*silent"),
        ({"melody": ["G4:1"] * 2}, "melody has 2 entries but prompt has 1"),
        ({"output_type": "wav"}, "output_type must be one of"),
        ({"generator": [torch.Generator()] * 3}, "generator is a list of 3 generators but 1 waveforms"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "callback_on_step_end_tensor_inputs"),
        # the classes of malformed input the boundary issue found, each now refused before compute
        ({"guidance_scale": 1e30}, "^guidance_scale must be a number between 0 and 100"),
        ({"num_inference_steps": 10**9}, "num_inference_steps must be an integer between 1 and 1000"),
        ({"num_inference_steps": 2.0}, "num_inference_steps must be an integer"),
        ({"latents": torch.full((1, 4, 32, 32), float("nan"))}, "latents has NaN or infinite values"),
        ({"latents": np.zeros((1, 4, 50, 32))}, "latents must be a floating-point torch.Tensor, got ndarray"),
        ({"latents": [0.0]}, "latents must be a floating-point torch.Tensor, got list"),
        ({"latents": torch.full((1, 4, 32, 32), 1e30)}, "latents must be starting noise, at most 1000 in magnitude"),
        (
            {"prompt": None, "prompt_embeds": torch.full((1, 32), float("nan"))},
            "prompt_embeds has NaN or infinite values",
        ),
        (
            {"prompt": None, "prompt_embeds": torch.full((1, 32), 1e30)},
            "prompt_embeds must be CLMP embeddings, every row of unit length",
        ),
        ({"melody_embeds": torch.zeros(1, 32)}, "melody_embeds carry no timing"),
        ({"prompt": "🎻🎻"}, "has no letter or digit"),
        ({"prompt": "\x01\x02"}, "has no letter or digit"),
        ({"prompt": "a" * 300}, "every word piece is unknown"),
        ({"generator": 3}, "generator must be a torch.Generator"),
        ({"melody": "missing.wav"}, "melody could not be read: No audio file 'missing.wav'"),
        ({"melody": "/tmp"}, "melody could not be read: '/tmp' is a directory"),
        (
            {"melody": np.full(16000, np.nan, np.float32)},
            "melody could not be read: The audio has NaN or infinite samples",
        ),
        (
            {"melody": np.r_[np.sin(np.arange(16000) / 5), np.inf].astype(np.float32)},
            "The audio has NaN or infinite samples",
        ),
        ({"melody": "G4:100000"}, r"Duration in 'G4:100000' must be a number of seconds in \(0, 60\]"),
        ({"melody": "G4:1e300"}, r"Duration in 'G4:1e300' must be a number of seconds in \(0, 60\]"),
        ({"return_dict": "yes"}, "return_dict must be True or False"),
        ({"callback_on_step_end": "print"}, "callback_on_step_end must be callable"),
    ],
)
def test_bad_arguments_raise_before_any_compute(pipe, kwargs, message):
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises((ValueError, TypeError), match=message):
            pipe(**{"prompt": PROMPT, "num_inference_steps": 2, **kwargs})
    finally:
        hook.remove()
    assert not calls


def test_numpy_numbers_and_float64_latents_are_accepted_and_a_callback_must_return_a_dict(pipe):
    reference = generate(pipe, seed=1).audios
    shape = (1, 4, 50, 32)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    as_numpy = generate(
        pipe,
        num_inference_steps=np.int64(3),
        audio_length_in_s=np.float32(1.0),
        guidance_scale=np.float64(3.0),
        seed=1,
    ).audios
    np.testing.assert_array_equal(as_numpy, reference)
    np.testing.assert_array_equal(
        generate(pipe, latents=latents.double()).audios, generate(pipe, latents=latents).audios
    )
    with pytest.raises(TypeError, match="callback_on_step_end must return a dict"):
        generate(pipe, callback_on_step_end=lambda *args: None)


def test_a_generation_that_diverges_is_an_error_not_nan_audio(pipe):
    def explode(pipeline, step, timestep, tensors):
        return {"latents": tensors["latents"] * 1e30} if step == 0 else {}

    for output_type in ("np", "latent"):
        with pytest.raises(ValueError, match="diverged to NaN or infinite values with guidance_scale=3.0"):
            generate(pipe, callback_on_step_end=explode, output_type=output_type)


def test_save_and_reload_is_bit_identical_and_safetensors_only(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "mg2")
    files = [os.path.join(root, name) for root, _, names in os.walk(tmp_path / "mg2") for name in names]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")) and not f.endswith("index.bin")]
    for path in (
        "pipeline_mg2.py",
        "clmp/modeling_clmp.py",
        "retriever/retrieval.py",
        "vocoder/vocoder.py",
        "processor/processing_clmp.py",
        "unet/diffusion_pytorch_model.safetensors",
    ):
        assert os.path.isfile(tmp_path / "mg2" / path), path
    loaded = MG2Pipeline.from_pretrained(tmp_path / "mg2")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(generate(loaded).audios, generate(pipe).audios)
    # refuses to run the folder's code without trust_remote_code
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path / "mg2")
    # Pickled weights as diffusers writes them (read back with torch.load(weights_only=True)); the index stays safetensors.
    pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert os.path.isfile(tmp_path / "pickled" / "unet" / "diffusion_pytorch_model.bin")
    assert os.path.isfile(tmp_path / "pickled" / "retriever" / "embeddings.safetensors")
    np.testing.assert_array_equal(
        generate(MG2Pipeline.from_pretrained(tmp_path / "pickled")).audios, generate(pipe).audios
    )


def test_remote_code_loads_without_the_package(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "mg2")
    np.save(tmp_path / "expected.npy", generate(pipe).audios)
    script = BLOCK_MG2_PIPELINE + textwrap.dedent(f"""
        import numpy as np, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "mg2")!r}, trust_remote_code=True)
        out = pipe({PROMPT!r}, num_inference_steps=3, audio_length_in_s=1.0, generator=torch.Generator().manual_seed(0))
        assert "mg2_pipeline" not in sys.modules
        assert np.array_equal(out.audios, np.load({str(tmp_path / "expected.npy")!r}))
        print("remote-code", type(pipe).__module__, type(pipe.retriever).__module__, out.melodies[0].metadata["title"])
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-code diffusers_modules.local.pipeline_mg2 diffusers_modules.local.retrieval" in result.stdout


def test_audioldm_format_vae_vocoder_and_other_schedulers_plug_in(pipe, tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=8,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
    )  # AudioLDM's VAE shape: 1 channel in, 8 latent, ×4
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=64,
            sampling_rate=16000,
            upsample_initial_channel=64,
            upsample_rates=[5, 4, 2, 2, 2],
            upsample_kernel_sizes=[10, 8, 4, 4, 4],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]],
            normalize_before=False,
        )
    ).eval()  # AudioLDM's vocoder shape: 64 mels in, ×160 up, 16 kHz
    unet = UNet2DConditionModel(**{**unet_config("tiny", 32), "in_channels": 8, "out_channels": 8})
    audioldm = MG2Pipeline(
        clmp=pipe.clmp,
        processor=pipe.processor,
        retriever=pipe.retriever,
        unet=unet,
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
        vae=vae,
        vocoder=vocoder,
    )
    audioldm.set_progress_bar_config(disable=True)
    out = generate(audioldm, audio_length_in_s=1.0)
    assert out.audios.shape == (1, 16000) and np.all(np.isfinite(out.audios))
    audioldm.save_pretrained(tmp_path / "audioldm")
    reloaded = MG2Pipeline.from_pretrained(tmp_path / "audioldm")
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.vocoder, SpeechT5HifiGan) and isinstance(reloaded.scheduler, DDIMScheduler)
    np.testing.assert_array_equal(generate(reloaded).audios, out.audios)


def test_a_fingerprint_mismatch_between_clmp_and_index_is_refused(pipe):
    other = build_pipeline("tiny", seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        MG2Pipeline(
            clmp=other.clmp,
            processor=pipe.processor,
            retriever=pipe.retriever,
            unet=pipe.unet,
            scheduler=pipe.scheduler,
            vae=pipe.vae,
            vocoder=pipe.vocoder,
        )


def test_a_vae_whose_latent_the_unet_does_not_take_is_refused(pipe):
    other_vae = MelAutoencoderKL(**{**vae_config("tiny"), "latent_channels": 8})
    with pytest.raises(ValueError, match="UNet takes 8 input and 4 output channels; this VAE's latent has 8"):
        MG2Pipeline(**{**pipe.components, "vae": other_vae})


def test_griffin_lim_vocoder_keeps_the_pitch():
    t = np.arange(16000) / 16000
    tone = torch.from_numpy((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    log_mel = LogMelSpectrogram()(tone)[:100]
    waveform = GriffinLimVocoder()(log_mel)
    assert waveform.shape == (16000,)
    # the tone's energy lands in the same mel band, within that band's width (~60 Hz at 440 Hz)
    rebuilt = LogMelSpectrogram()(waveform)
    assert rebuilt.mean(0).argmax() == log_mel.mean(0).argmax()
    spectrum = np.abs(np.fft.rfft(waveform.numpy()))
    assert abs(np.argmax(spectrum) - 440) < 40  # 1 Hz per bin for one second


def test_griffin_lim_mel_inversion_keeps_a_partial_where_the_mel_filters_place_it():
    t = np.arange(16000) / 16000
    centres = librosa.mel_frequencies(N_MELS + 2, fmin=F_MIN, fmax=F_MAX)[1:-1]
    # Tones half-way between two filters' centres, in the band of the melodies' fundamentals.
    frequencies = [(low + high) / 2 for low, high in zip(centres, centres[1:]) if 261 < low and high < 1000]

    def inversion(vocoder):
        cents, residuals = [], []
        for frequency in frequencies:
            tone = torch.from_numpy(0.5 * np.sin(2 * np.pi * frequency * t)).float()
            spectrum = torch.stft(tone, 1024, 160, 1024, window=torch.hann_window(1024), return_complex=True).abs()
            mel = vocoder.mel_basis @ spectrum
            magnitude = vocoder.mel_to_magnitude(mel)
            assert magnitude.shape == spectrum.shape and (magnitude >= 0).all()
            residuals.append(((vocoder.mel_basis @ magnitude - mel).norm() / mel.norm()).item())
            profile = magnitude[:, 20:80].mean(1).clamp(min=1e-12)
            peak = int(profile.argmax())
            below, at, above = profile[peak - 1 : peak + 2].log().tolist()
            vertex = peak + 0.5 * (below - above) / (below - 2 * at + above)
            cents.append(abs(1200 * np.log2(vertex * 16000 / 1024 / frequency)))
        return np.mean(cents), max(residuals)

    # The clipped pseudo-inverse pulls each partial towards a filter's centre (35 cents off on average here) and no
    # longer reproduces the mel it came from (12-14 % off); the non-negative solution does both far better (17 cents,
    # under 3 %).
    pseudo_inverse_cents, pseudo_inverse_residual = inversion(GriffinLimVocoder(nnls_iter=0))
    cents, residual = inversion(GriffinLimVocoder())
    assert cents < 0.6 * pseudo_inverse_cents and residual < 0.3 * pseudo_inverse_residual
    with pytest.raises(ValueError, match="nnls_iter must be >= 0"):
        GriffinLimVocoder(nnls_iter=-1)


def test_griffin_lim_start_does_not_move_with_rounding_where_the_spectrum_is_level():
    # A frame with a level top (three equal bins), a gentle ramp and a plain peak, repeated over 40 frames; rounding
    # must not make, unmake or move a peak there, or every later frame's phase moves with it.
    column = torch.full((513,), 1e-3, dtype=torch.float64)
    column[40:43] = 0.5
    column[100:140] = torch.linspace(0.2, 0.2 * 1.0004**39, 40, dtype=torch.float64)
    column[200:203] = torch.tensor([0.3, 1.0, 0.3], dtype=torch.float64)
    magnitude = column[:, None].repeat(1, 40)
    noisy = magnitude * (1 + 1e-6 * torch.randn(magnitude.shape, generator=torch.Generator().manual_seed(0)))
    vocoder = GriffinLimVocoder()
    start, moved = vocoder.initial_phase(magnitude), vocoder.initial_phase(noisy)
    difference = torch.angle(torch.polar(torch.ones_like(start), start - moved)).abs()
    assert difference[magnitude > 0.1].max() < 1e-3
    # The plain peak's bins are π apart: its offset is the same for all of them.
    assert torch.allclose(
        torch.angle(torch.polar(torch.ones(2, dtype=torch.float64), start[201:203, 0] - start[200:202, 0])).abs(),
        torch.full((2,), torch.pi, dtype=torch.float64),
        atol=1e-6,
    )


@pytest.mark.parametrize("phase_init", ["peaks", "bins"])
def test_griffin_lim_starts_a_tone_between_bins_at_its_own_phase_advance(phase_init):
    t = np.arange(16000) / 16000
    tone = torch.from_numpy(0.5 * np.sin(2 * np.pi * 445.3 * t))  # 28.5 bins of 15.625 Hz
    window = torch.hann_window(1024, dtype=torch.float64)
    spectrum = torch.stft(tone, 1024, 160, 1024, window=window, return_complex=True)[:, 10:90]
    start = GriffinLimVocoder(phase_init=phase_init).initial_phase(spectrum.abs())
    peak = int(spectrum.abs()[:, 0].argmax())

    def wrapped(phase):
        return torch.angle(torch.polar(torch.ones_like(phase), phase))

    # Frame to frame at the peak and its neighbours, and from the peak to its neighbour, as in the tone's own STFT.
    advance_error = [
        wrapped(start[b, 1:] - start[b, :-1] - spectrum[b, 1:].angle() + spectrum[b, :-1].angle()).abs().max()
        for b in (peak - 1, peak, peak + 1)
    ]
    neighbour_error = (
        wrapped(start[peak + 1] - start[peak] - spectrum[peak + 1].angle() + spectrum[peak].angle()).abs().max()
    )
    if phase_init == "peaks":
        assert max(advance_error) < 1e-3 and neighbour_error < 1e-3
    else:  # each bin at its own centre frequency, half a bin from the tone's
        assert min(advance_error) > 0.4 and neighbour_error > 3


def test_paper_preset_unet_has_416m_parameters():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("paper", 512))
    parameters = sum(p.numel() for p in unet.parameters())
    assert abs(parameters - 416e6) / 416e6 < 0.01
    assert (
        unet.config.class_embed_type == "simple_projection"
        and unet.config.projection_class_embeddings_input_dim == 1024
    )


def test_cli_writes_a_playable_wav(tmp_path):
    output = tmp_path / "jig.wav"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mg2_pipeline",
            "generate",
            PROMPT,
            "--output",
            str(output),
            "--model",
            "preset:tiny",
            "--steps",
            "2",
            "--duration",
            "1.5",
            "--melody",
            "G4:0.5 A4:0.5",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Melody: yours" in result.stdout and "Wrote" in result.stdout
    audio, sample_rate = soundfile.read(output)
    assert sample_rate == 16000 and audio.shape == (24000,) and np.abs(audio).max() > 0
    bad = subprocess.run(
        [sys.executable, "-m", "mg2_pipeline", "generate", " ", "--output", str(output), "--model", "preset:tiny"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode != 0 and "prompt is empty" in bad.stderr


def test_a_retrieved_melody_follows_the_tempo_the_prompt_names():
    fresh = build_pipeline("tiny", seed=0)
    fresh.set_progress_bar_config(disable=True)
    melody = Melody.from_string("G4:0.5 A4:0.5 B4:1")
    prompt = "a fast reel at 120 BPM"
    fresh.retriever.add(
        fresh.encode_text([prompt], fresh.device), [melody], [{"title": "Slow Reel", "tempo_bpm": 60.0}]
    )
    guide = generate(fresh, prompt=prompt).melodies[0]
    assert {key: guide.metadata[key] for key in ("title", "tempo_bpm", "stretched_from_bpm", "matched_facts")} == {
        "title": "Slow Reel",
        "tempo_bpm": 120.0,
        "stretched_from_bpm": 60.0,
        "matched_facts": {},
    }
    np.testing.assert_allclose(guide.melody.notes[:, 1:], melody.notes[:, 1:] / 2)
    assert guide.melody.pitches.tolist() == melody.pitches.tolist()
    # no tempo in the prompt, or none known for the melody: the melody keeps its timing
    unchanged = fresh.follow_prompt_tempo(guide, "a fast reel")
    assert unchanged is guide
    no_tempo = type(guide)(melody, id=1, score=0.5, metadata={"title": "?"})
    assert fresh.follow_prompt_tempo(no_tempo, "a reel at 90 bpm") is no_tempo


def test_retrieval_matches_the_tune_type_and_meter_the_prompt_names_unless_turned_off(pipe):
    for prompt, title, matched in (
        ("a lively jig in 6/8 time", "The Irish Washerwoman (jig)", {"tune_type": "jig", "meter": "6/8"}),
        ("a sea shanty", "Drunken Sailor (shanty)", {"tune_type": "shanty"}),
        ("a slow hymn on organ", "Bach chorale (hymn)", {"tune_type": "hymn"}),
    ):
        guide = generate(pipe, prompt=prompt, num_inference_steps=1).melodies[0]
        assert guide.metadata["title"] == title and guide.metadata["matched_facts"] == matched
    plain = generate(pipe, prompt="a sea shanty", num_inference_steps=1, match_prompt_facts=False).melodies[0]
    nearest = pipe.retriever.search(pipe.encode_text(["a sea shanty"], pipe.device), k=1).melodies[0][0]
    assert plain.id == nearest.id and "matched_facts" not in plain.metadata


def test_load_pipeline_moves_to_the_gpu_when_there_is_one(monkeypatch):
    moved_to = []
    monkeypatch.setattr(MG2Pipeline, "to", lambda pipe, device: moved_to.append(device) or pipe)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert isinstance(load_pipeline("preset:tiny"), MG2Pipeline)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    load_pipeline("preset:tiny")
    load_pipeline("preset:tiny", device="cuda:1")
    assert moved_to == ["cuda", "cpu", "cuda:1"]


def test_only_text_to_music_with_an_x0_model_takes_few_steps_by_default():
    pipe = build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    recording = np.sin(2 * np.pi * 440 * np.arange(int(1.28 * pipe.sampling_rate)) / pipe.sampling_rate)
    steps = []

    def count_steps(pipeline, step, timestep, tensors):
        steps.append(step)
        return tensors

    def default_steps_taken(pipeline, **task) -> int:
        steps.clear()
        pipeline("a jig", melody="G4:0.5 A4:0.5", callback_on_step_end=count_steps, **task)
        assert len(steps) == pipeline.default_num_inference_steps
        return len(steps)

    def steps_by_task() -> list[int]:
        return [
            default_steps_taken(pipe, audio_length_in_s=0.64),
            default_steps_taken(MG2AudioToAudioPipeline.from_pipe(pipe), audio=recording, strength=1.0),
            default_steps_taken(
                MG2InpaintPipeline.from_pipe(pipe), audio=recording, repaint_start_s=0.64, repaint_end_s=1.28
            ),
        ]

    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert steps_by_task() == [DEFAULT_NUM_INFERENCE_STEPS] * 3
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    assert steps_by_task() == [
        DEFAULT_X0_NUM_INFERENCE_STEPS,
        DEFAULT_NUM_INFERENCE_STEPS,
        DEFAULT_NUM_INFERENCE_STEPS,
    ]
    pipe.register_to_config(distilled_guidance_scale=3.0)
    assert steps_by_task() == [
        DEFAULT_DISTILLED_NUM_INFERENCE_STEPS,
        DEFAULT_NUM_INFERENCE_STEPS,
        DEFAULT_NUM_INFERENCE_STEPS,
    ]
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    assert steps_by_task() == [DEFAULT_NUM_INFERENCE_STEPS] * 3  # few steps only where x₀ is predicted
