"""What diffusers' common pipeline tests (`PipelineTesterMixin`) check, for `MG2Pipeline` on the tiny preset (2 attention
heads): saving and loading with and without variants, dtypes and pickled weights, dict/tuple outputs, batches, components,
`to(dtype)`, attention slicing, callbacks, guidance, `num_waveforms_per_prompt`, `encode_prompt` in isolation, optional
components, the paper preset on the meta device."""

import logging
import os

import numpy as np
import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig

from mg2_pipeline import GriffinLimVocoder, LogMelSpectrogram, Melody, MG2Pipeline
from mg2_pipeline.presets import build_pipeline, build_vae, vae_config

PROMPT = "a lively Irish jig on fiddle"
# diffusers' tests/pipelines/pipeline_params.py
TEXT_TO_AUDIO_PARAMS = {
    "prompt",
    "audio_length_in_s",
    "guidance_scale",
    "negative_prompt",
    "prompt_embeds",
    "negative_prompt_embeds",
    "cross_attention_kwargs",
}


@pytest.fixture(scope="module")
def pipe():
    pipeline = build_pipeline("tiny", seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def inputs(seed=0, **kwargs):
    return {
        "prompt": PROMPT,
        "num_inference_steps": 2,
        "audio_length_in_s": 0.64,
        "output_type": "np",
        "generator": torch.Generator().manual_seed(seed),
        **kwargs,
    }


def nn_components(pipeline):
    return {name: c for name, c in pipeline.components.items() if isinstance(c, torch.nn.Module)}


def test_call_signature_has_diffusers_text_to_audio_parameters():
    import inspect

    parameters = inspect.signature(MG2Pipeline.__call__).parameters
    assert TEXT_TO_AUDIO_PARAMS <= set(parameters)
    for name in (
        "num_inference_steps",
        "num_waveforms_per_prompt",
        "generator",
        "latents",
        "output_type",
        "return_dict",
        "callback_on_step_end",
        "callback_on_step_end_tensor_inputs",
    ):
        assert parameters[name].default is not inspect.Parameter.empty


def test_components_optional_retriever_and_dict_tuple_outputs(pipe, tmp_path, caplog):
    assert set(pipe.components) == {"clmp", "processor", "retriever", "unet", "scheduler", "vae", "vocoder"}
    assert MG2Pipeline._optional_components == ["retriever"]
    as_dict = pipe(**inputs()).audios
    as_tuple = pipe(**inputs(), return_dict=False)[0]
    np.testing.assert_array_equal(as_dict, as_tuple)
    # Without a retriever the pipeline takes a given melody, and saves and loads it as absent; with no melody either it
    # generates from the text alone: the melody-dropped condition, as at melody_guidance_scale 0.
    bare = MG2Pipeline.from_pipe(pipe, retriever=None)
    bare.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING, logger="mg2_pipeline.pipeline_mg2"):
        text_alone = bare(**inputs())
    assert "generating from the text alone" in caplog.text
    assert text_alone.melodies == [None]
    np.testing.assert_allclose(text_alone.audios, pipe(**inputs(melody_guidance_scale=0.0)).audios, atol=1e-5)
    expected = bare(**inputs(melody="G4:0.25 A4:0.25 B4:0.5")).audios
    bare.save_pretrained(tmp_path / "bare")
    loaded = MG2Pipeline.from_pretrained(tmp_path / "bare")
    assert loaded.retriever is None
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(loaded(**inputs(melody="G4:0.25 A4:0.25 B4:0.5")).audios, expected, atol=1e-5)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_load_round_trip_logs_each_component(pipe, tmp_path, safe_serialization):
    expected = pipe(**inputs()).audios
    pipe.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights = "diffusion_pytorch_model.safetensors" if safe_serialization else "diffusion_pytorch_model.bin"
    assert os.path.isfile(tmp_path / "unet" / weights)
    logger = diffusers_logging.get_logger("diffusers.pipelines.pipeline_utils")
    logger.setLevel(logging.INFO)
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    try:
        loaded = MG2Pipeline.from_pretrained(tmp_path)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.WARNING)
    for name in pipe.components:
        assert any(message.startswith(f"Loaded {name} as ") for message in records), name
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(loaded(**inputs()).audios, expected, atol=1e-5)


def test_device_map_places_every_component(pipe, tmp_path):
    expected = pipe(**inputs()).audios
    pipe.save_pretrained(tmp_path)
    loaded = MG2Pipeline.from_pretrained(tmp_path, device_map="cpu")  # diffusers: "balanced" needs accelerators
    loaded.set_progress_bar_config(disable=True)
    assert loaded.hf_device_map is not None
    assert {p.device.type for c in nn_components(loaded).values() for p in c.parameters()} == {"cpu"}
    np.testing.assert_allclose(loaded(**inputs()).audios, expected, atol=1e-5)
    with pytest.raises(NotImplementedError, match="sequential not supported"):
        MG2Pipeline.from_pretrained(tmp_path, device_map="sequential")


def test_variants_are_saved_for_every_model_and_loaded(pipe, tmp_path):
    expected = pipe(**inputs()).audios
    pipe.save_pretrained(tmp_path, variant="fp16", safe_serialization=False)
    for name in nn_components(pipe):
        files = os.listdir(tmp_path / name)
        assert any(f.split(".")[1].startswith("fp16") for f in files if f.count(".") >= 2), (name, files)
    loaded = MG2Pipeline.from_pretrained(tmp_path, variant="fp16")
    loaded.set_progress_bar_config(disable=True)
    for name, component in nn_components(loaded).items():
        for (key, a), b in zip(component.state_dict().items(), nn_components(pipe)[name].state_dict().values()):
            assert torch.equal(a, b), (name, key)
    np.testing.assert_allclose(loaded(**inputs()).audios, expected, atol=1e-5)
    with pytest.raises(ValueError, match="variant=bf16"):
        MG2Pipeline.from_pretrained(tmp_path, variant="bf16")


def test_dtype_arguments_and_to_dtype(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    for kwargs, expected in (
        ({"dtype": torch.float16}, {}),
        ({"torch_dtype": torch.bfloat16}, {}),
        ({"dtype": {"unet": torch.bfloat16, "default": torch.float16}}, {"unet": torch.bfloat16}),
    ):
        loaded = MG2Pipeline.from_pretrained(tmp_path, **kwargs)
        default = next(iter(kwargs.values()))
        default = default.get("default") if isinstance(default, dict) else default
        for name, component in nn_components(loaded).items():
            assert component.dtype == expected.get(name, default), (kwargs, name, component.dtype)
    with pytest.raises(ValueError, match="dtype"):
        MG2Pipeline.from_pretrained(tmp_path, dtype=torch.float16, torch_dtype=torch.float16)
    half = MG2Pipeline.from_pretrained(tmp_path).to(torch.float16)
    assert {c.dtype for c in nn_components(half).values()} == {torch.float16}


@pytest.fixture(scope="module")
def assembled(pipe):
    """The tiny pipeline as a diffusers contributor assembles it from its components: the VAE built as the preset
    builds it, with its layers' own initialisation (not `build_pipeline`'s music-loud decoder bias)."""
    torch.manual_seed(0)
    pipeline = MG2Pipeline(**{**pipe.components, "vae": build_vae(vae_config("tiny"))}, aligned_melody="sketch")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("output_type", ["latent", "np"])
@pytest.mark.parametrize("pipeline", ["pipe", "assembled"])
def test_batch_consistent_and_batch_single_identical(pipeline, output_type, request):
    pipe = request.getfixturevalue(pipeline)
    # diffusers' prompts: the prompt, its first half, and one far longer than the text tower reads.
    prompts = [PROMPT, PROMPT[: len(PROMPT) // 2], 100 * "very long"]
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    batched = pipe(**{**inputs(output_type=output_type), "prompt": prompts, "generator": generators}).audios
    single = np.concatenate(
        [np.asarray(pipe(**inputs(seed=i, prompt=p, output_type=output_type)).audios) for i, p in enumerate(prompts)]
    )
    batched = np.asarray(batched)
    assert batched.shape == single.shape and batched.shape[0] == 3
    if output_type == "latent":
        # The random UNet's latents grow to hundreds; its batch-size-dependent rounding is 1e-6 of them.
        assert np.abs(batched - single).max() <= 1e-4 * np.abs(single).max()
    else:
        # Music-loud (the preset) or scaled to full scale (the assembled VAE's log-mels give Griffin-Lim a peak far
        # above 1). Griffin-Lim's phase-locked start sums each peak's frequency over the frames, so the UNet's 1e-6
        # rounding reaches the waveform as up to ~1e-4 of full scale on these 0.64 s clips: within -60 dB.
        assert 1e-2 < np.abs(single).max() <= 1
        assert np.abs(batched - single).max() < 1e-3


def test_griffin_lim_keeps_a_tiny_input_change_tiny():
    tones = Melody.from_string("G4:0.25 A4:0.25 B4:0.5 D5:0.25 B4:0.25 G4:0.5 E4:0.5 D4:0.5").render_tones(32000)
    log_mel = LogMelSpectrogram()(torch.from_numpy(tones).float())
    nudge = 2e-6 * torch.from_numpy(np.random.default_rng(0).standard_normal(tuple(log_mel.shape))).float()

    def change(vocoder):
        waveform = vocoder(log_mel)
        return ((vocoder(log_mel + nudge) - waveform).abs().max() / waveform.abs().max()).item()

    # Within 2 % (-34 dB; here 1.4 % for the non-negative inversion, 1.0 % for the pseudo-inverse): each partial's
    # starting phase follows its peak's interpolated frequency, which spreads the partials' phases and halves the
    # onset clicks, and a tiny change of the magnitudes moves it a little.
    assert change(GriffinLimVocoder()) < 2e-2 and change(GriffinLimVocoder(nnls_iter=0)) < 2e-2
    assert change(GriffinLimVocoder(phase_floor=0.0)) > 1e-1  # the floor is what keeps the change small (40 %)
    # A float32 log-mel is inverted in float32 from phases summed in float64: summed in float32, their rounding alone
    # would move this waveform by a fifth of its peak.
    vocoder, computed_in = GriffinLimVocoder(), []
    invert = vocoder.invert
    vocoder.invert = lambda item: computed_in.append(item.dtype) or invert(item)
    single, double, half = vocoder(log_mel), vocoder(log_mel.double()), vocoder(log_mel.half())
    assert computed_in == [torch.float32, torch.float64, torch.float32]
    assert (single.dtype, double.dtype, half.dtype) == (torch.float32, torch.float64, torch.float16)
    assert (single - double).abs().max() < 1e-2 * double.abs().max() and torch.isfinite(half).all()
    with pytest.raises(ValueError, match="phase_floor"):
        GriffinLimVocoder(phase_floor=0.6)
    with pytest.raises(ValueError, match="phase_init must be one of"):
        GriffinLimVocoder(phase_init="zeros")


def test_guidance_interval_limits_guidance_to_its_part_of_the_schedule(pipe):
    unguided = pipe(**inputs(guidance_scale=1.0, melody_guidance_scale=1.0, output_type="latent")).audios
    guided = pipe(**inputs(guidance_scale=5.0, melody_guidance_scale=2.0, output_type="latent")).audios
    # No timestep of the schedule is 1000: the guided call without its guidance is the unguided one (with fewer UNet
    # passes per step, so within batch rounding).
    torch.testing.assert_close(
        pipe(
            **inputs(guidance_scale=5.0, melody_guidance_scale=2.0, guidance_interval=(1.0, 1.0), output_type="latent")
        ).audios,
        unguided,
        rtol=1e-5,
        atol=1e-4,
    )
    torch.testing.assert_close(
        pipe(
            **inputs(guidance_scale=5.0, melody_guidance_scale=2.0, guidance_interval=(0, 1), output_type="latent")
        ).audios,
        guided,
        rtol=0,
        atol=0,
    )
    late = pipe(
        **inputs(guidance_scale=5.0, melody_guidance_scale=2.0, guidance_interval=(0.6, 1), output_type="latent")
    ).audios
    # Guided at t = 999 only: nearly the guided latents, yet apart from them by more than rounding (1e-6 of them).
    assert (late - unguided).abs().max() > 0.5 * (guided - unguided).abs().max()
    assert (late - guided).abs().max() > 1e-5 * guided.abs().max()
    for interval, error in (
        ((0.6, 0.2), ValueError),
        ((0.1, float("nan")), ValueError),
        ((0.2,), TypeError),
        (0.2, TypeError),
    ):
        with pytest.raises(error, match="guidance_interval"):
            pipe(**inputs(guidance_interval=interval))


def test_num_waveforms_per_prompt_shapes(pipe):
    for batch in (1, 2):
        for per_prompt in (1, 2):
            out = pipe(**{**inputs(), "prompt": [PROMPT] * batch, "num_waveforms_per_prompt": per_prompt})
            assert out.audios.shape == (batch * per_prompt, 10240) and len(out.melodies) == batch * per_prompt


def test_attention_slicing_keeps_the_output(pipe):
    expected = pipe(**inputs()).audios
    pipe.enable_attention_slicing(slice_size=1)
    try:
        sliced = pipe(**inputs()).audios
    finally:
        pipe.disable_attention_slicing()
    assert np.abs(sliced - expected).max() < 1e-3


def test_guidance_and_callbacks_that_change_it(pipe):
    plain = pipe(**inputs(guidance_scale=1.0, output_type="latent")).audios
    guided = pipe(**inputs(guidance_scale=3.0, output_type="latent")).audios
    assert plain.shape == guided.shape and (plain - guided).abs().max() > 1e-2 * guided.abs().max()

    def raise_guidance(pipeline, step, timestep, tensors):
        pipeline._guidance_scale += 1.0
        return tensors

    guided = pipe(**inputs(guidance_scale=3.0, melody_guidance_scale=2.0, output_type="latent")).audios
    raised = pipe(
        **inputs(guidance_scale=3.0, melody_guidance_scale=2.0, output_type="latent"),
        callback_on_step_end=raise_guidance,
    )
    assert pipe.guidance_scale == 3.0 + pipe.num_timesteps
    # Raised after the first of two steps, where the random UNet's guidance moves little; unchanged, the call is
    # bit-identical (same batch sizes).
    assert torch.equal(
        pipe(**inputs(guidance_scale=3.0, melody_guidance_scale=2.0, output_type="latent")).audios, guided
    )
    assert (raised.audios - guided).abs().max() > 1e-6 * guided.abs().max()


def test_callbacks_receive_and_may_return_every_callback_tensor(pipe):
    seen = []

    def check_and_replace(pipeline, step, timestep, tensors):
        seen.append(sorted(tensors))
        for name in pipeline._callback_tensor_inputs:
            assert isinstance(tensors[name], torch.Tensor)
        if step == pipeline.num_timesteps - 1:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
            tensors["prompt_embeds"] = tensors["negative_prompt_embeds"]
        return tensors

    out = pipe(
        **inputs(),
        callback_on_step_end=check_and_replace,
        callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs,
    )
    assert seen == [sorted(pipe._callback_tensor_inputs)] * 2

    class RecordMelodyEmbeds(PipelineCallback):  # a diffusers callback object names its own tensor inputs
        tensor_inputs = ["melody_embeds"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            seen.append(sorted(callback_kwargs))
            return callback_kwargs

    seen.clear()
    pipe(**inputs(), callback_on_step_end=MultiPipelineCallbacks([RecordMelodyEmbeds()]))
    assert seen == [["melody_embeds"]] * 2
    with pytest.raises(ValueError, match="'noise', which this call does not use"):
        pipe(**inputs(), callback_on_step_end=lambda pipeline, step, t, tensors: {"noise": torch.zeros(1, 32)})
    # Without text guidance the negative embeddings are still made (a callback may turn guidance on) and replaceable.
    unguided = pipe(**inputs(guidance_scale=1.0, melody_guidance_scale=1.0)).audios
    replaced = pipe(
        **inputs(guidance_scale=1.0, melody_guidance_scale=1.0),
        callback_on_step_end=lambda pipeline, step, t, tensors: {"negative_prompt_embeds": torch.zeros(1, 32)},
    ).audios
    np.testing.assert_array_equal(replaced, unguided)  # unused until a text term runs
    zeros = pipe.vocoder(pipe.decode_latents(torch.zeros(pipe.latent_shape(1, pipe.mel_frames(0.64))))).numpy()
    np.testing.assert_allclose(out.audios, zeros[:, :10240], atol=1e-5)
    # Embeddings a callback returns after step 0 condition step 1.
    plain = pipe(**inputs()).audios
    for name in ("prompt_embeds", "melody_embeds"):
        swapped = pipe(
            **inputs(),
            callback_on_step_end=lambda pipeline, step, t, tensors, name=name: (
                {name: -tensors[name]} if step == 0 else {}
            ),
            callback_on_step_end_tensor_inputs=[name],
        ).audios
        assert np.abs(swapped - plain).max() > 1e-6 * np.abs(plain).max(), name  # ignored, they are bit-identical


def test_encode_prompt_works_in_isolation(pipe):
    text_stack = MG2Pipeline(
        clmp=pipe.clmp, processor=pipe.processor, retriever=None, unet=None, scheduler=None, vae=None, vocoder=None
    )
    prompt_embeds, negative_prompt_embeds = text_stack.encode_prompt(PROMPT, torch.device("cpu"), 1, True)
    assert prompt_embeds.shape == negative_prompt_embeds.shape == (1, pipe.clmp.config.projection_dim)
    defaults = text_stack.encode_prompt(PROMPT)  # as diffusers' mixin calls it: the execution device, guidance on
    assert all(torch.equal(a, b) for a, b in zip(defaults, (prompt_embeds, negative_prompt_embeds)))
    # Without the prompt's text there are no facts to match: compare with plain nearest-melody retrieval.
    with_embeds = pipe(
        **{
            **inputs(),
            "prompt": None,
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "match_prompt_facts": False,
        }
    ).audios
    np.testing.assert_allclose(with_embeds, pipe(**inputs(match_prompt_facts=False)).audios, atol=1e-5)
    with pytest.raises(ValueError, match="negative_prompt or negative_prompt_embeds"):
        pipe(**inputs(negative_prompt="noise", negative_prompt_embeds=negative_prompt_embeds))
    # A pipeline without the text stack runs from the embeddings (melody guidance needs the empty text's embedding).
    no_text = MG2Pipeline(
        **{**pipe.components, "clmp": None, "processor": None}, aligned_melody=pipe.config.aligned_melody
    )
    no_text.set_progress_bar_config(disable=True)
    embeds_only = {
        "prompt": None,
        "prompt_embeds": prompt_embeds,
        "negative_prompt_embeds": negative_prompt_embeds,
        "match_prompt_facts": False,
        "melody_guidance_scale": 3.0,
    }
    expected = pipe(**{**inputs(), **embeds_only}).audios
    np.testing.assert_allclose(no_text(**{**inputs(), **embeds_only}).audios, expected, atol=1e-5)
    with pytest.raises(ValueError, match="no clmp/processor"):
        no_text(**inputs())
    for guidance in [{"melody_guidance_scale": 1.0}, {"melody_guidance_scale": 0.0}, {"guidance_scale": 1.0}]:
        with pytest.raises(ValueError, match="melody_guidance_scale must equal guidance_scale"):
            no_text(**{**inputs(), **embeds_only, **guidance})
    with pytest.raises(ValueError, match="no clmp/processor"):
        no_text.encode_prompt(PROMPT)
    # Nothing to find a melody with and no text tower for the melody-dropped condition: refused before any compute.
    nothing = MG2Pipeline.from_pipe(no_text, retriever=None)
    with pytest.raises(ValueError, match="no retriever to find a melody and no clmp"):
        nothing(**{**inputs(), **embeds_only, "callback_on_step_end": lambda *a: pytest.fail("computed")})


def test_components_rebuild_the_pipeline_and_a_missing_setting_is_named(pipe):
    # diffusers' `Pipeline(**pipe.components)`: the UNet's channels tell which aligned melody it takes; the error says so.
    with pytest.raises(ValueError, match="pass aligned_melody='sketch', the setting this UNet was trained with"):
        MG2Pipeline(**pipe.components)
    rebuilt = MG2Pipeline(**pipe.components, aligned_melody="sketch")
    rebuilt.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(rebuilt(**inputs()).audios, pipe(**inputs()).audios)


def test_cross_attention_kwargs_reach_the_attention_processors(pipe):
    expected = pipe(**inputs(output_type="latent")).audios
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    )
    try:
        off = pipe(**inputs(output_type="latent"), cross_attention_kwargs={"scale": 0.0}).audios
        on = pipe(**inputs(output_type="latent"), cross_attention_kwargs={"scale": 1.0}).audios
    finally:
        pipe.unet.delete_adapters("default")
    torch.testing.assert_close(off, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    assert (on - expected).abs().max() > 1e-3 * expected.abs().max()
    with pytest.raises(TypeError, match="cross_attention_kwargs must be a dict"):
        pipe(**inputs(), cross_attention_kwargs=0.5)


def test_griffin_lim_batched_equals_single(pipe):
    mel = torch.randn(3, 64, 64) - 4
    batched = pipe.vocoder(mel)
    single = torch.stack([pipe.vocoder(m) for m in mel])
    assert (batched - single).abs().max() <= 1e-4


def test_paper_preset_builds_on_the_meta_device():
    with torch.device("meta"):
        paper = build_pipeline("paper")
    assert paper.unet.device.type == "meta" and paper.clmp.device.type == "meta"
    assert paper.scheduler.alphas_cumprod.device.type == "cpu" and len(paper.retriever) == 0
    assert 400e6 < sum(p.numel() for p in paper.unet.parameters()) < 430e6
