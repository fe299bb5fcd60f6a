"""Beyond one window: MultiDiffusion windows, a melody played once through, continuation, audio-to-audio and repaint
(tiny preset: one window is 0.64 s)."""

import numpy as np
import pytest
import soundfile
import torch

from mg2_pipeline import Melody, MG2AudioToAudioPipeline, MG2InpaintPipeline, MG2Pipeline, cli
from mg2_pipeline.pipeline_mg2 import fade_ramp, map_in_windows, window_starts
from mg2_pipeline.presets import build_pipeline

PROMPT = "a lively Irish jig on fiddle"
TUNE = "G4:0.25 B4:0.25 D5:0.5 B4:0.25 G4:0.25 A4:0.5 F#4:0.5"  # 2.5 s


@pytest.fixture(scope="module")
def pipe():
    pipeline = build_pipeline("tiny", seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def inpaint(pipe):
    return MG2InpaintPipeline.from_pipe(pipe)


@pytest.fixture(scope="module")
def audio_to_audio(pipe):
    return MG2AudioToAudioPipeline.from_pipe(pipe)


@pytest.fixture(scope="module")
def recording():
    """2 s of the tune as plain tones, to continue, re-render and repaint."""
    return Melody.load(TUNE).render_tones(32000)


def generate(pipe, seed=0, **kwargs):
    return pipe(
        PROMPT,
        num_inference_steps=kwargs.pop("num_inference_steps", 3),
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


def padded_latents(pipe, waveform, seconds):
    """The pipeline's own encoding of `waveform` zero-padded to `seconds` (what kept frames must equal)."""
    samples = pipe.mel_frames(seconds) * pipe.hop_length
    padded = np.zeros(samples, np.float32)
    padded[: len(waveform)] = waveform[:samples]
    return pipe.encode_waveforms(torch.from_numpy(padded)[None], "cpu")


@pytest.mark.parametrize(
    "total, window, overlap, multiple",
    [(10, 32, 2, 2), (32, 32, 2, 2), (250, 32, 2, 2), (3752, 128, 8, 4), (133, 128, 8, 4)],
)
def test_windows_cover_the_length_with_at_least_the_overlap(total, window, overlap, multiple):
    starts = window_starts(total, window, overlap, multiple)
    assert starts[0] == 0 and starts == sorted(starts)
    if total <= window:
        assert starts == [0]
        return
    assert starts[-1] == total - window
    assert all(start % multiple == 0 for start in starts[:-1])
    assert all(0 < b - a <= window - overlap for a, b in zip(starts, starts[1:]))
    # the fewest windows: one fewer could not cover the length with that overlap
    assert (len(starts) - 2) * (window - overlap) + window < total


def test_map_in_windows_matches_a_pointwise_function_and_fades_without_gaps():
    inputs = torch.randn(2, 3, 300, 5)
    output = map_in_windows(lambda piece: piece * 2 + 1, inputs, dim=2, window=64, overlap=8, multiple=4, scale=1)
    torch.testing.assert_close(output, inputs * 2 + 1)
    stretched = map_in_windows(
        lambda piece: piece.repeat_interleave(4, dim=1), inputs[:, 0], dim=1, window=64, overlap=8, multiple=4, scale=4
    )
    torch.testing.assert_close(stretched, inputs[:, 0].repeat_interleave(4, dim=1))
    ramp = fade_ramp(64, 8)
    assert ramp.min() > 0 and ramp.max() == 1 and torch.equal(ramp, ramp.flip(0))


def test_long_audio_is_denoised_in_windows_deterministically(pipe):
    first = generate(pipe, audio_length_in_s=3.0)
    again = generate(pipe, audio_length_in_s=3.0)
    assert first.audios.shape == (1, 48000) and np.all(np.isfinite(first.audios))
    np.testing.assert_array_equal(first.audios, again.audios)
    windows = first.melodies[0].metadata["windows"]
    assert (
        len(windows)
        == len(
            window_starts(pipe.mel_frames(3.0) // pipe.vae_scale_factor, pipe.window_frames, pipe.window_overlap, 2)
        )
        > 1
    )
    assert windows[0]["audio_s"][0] == 0 and windows[-1]["audio_s"][1] == pytest.approx(3.0, abs=0.02)
    assert all(a["audio_s"][1] > b["audio_s"][0] for a, b in zip(windows, windows[1:]))  # they overlap


def test_a_melody_plays_once_through_by_default_and_repeats_when_a_length_is_asked(pipe):
    once = generate(pipe, melody=TUNE, num_inference_steps=2)
    assert once.audios.shape == (1, 40000)  # the tune's 2.5 s
    assert once.melodies[0].metadata["repeats"] == 1 and once.melodies[0].metadata["audio_span_s"] == (0.0, 2.5)
    looped = generate(pipe, melody=TUNE, num_inference_steps=2, audio_length_in_s=6.0)
    assert looped.audios.shape == (1, 96000) and looped.melodies[0].metadata["repeats"] == 3
    assert looped.melodies[0].melody == once.melodies[0].melody  # the output names the melody itself, not its repeats
    # ... and as_played() is what guided the audio (what the piano rolls of samples and the Space draw).
    assert once.melodies[0].as_played() == once.melodies[0].melody
    played, tune = looped.melodies[0].as_played(), once.melodies[0].melody
    assert (
        len(played) > 2 * len(tune) and played.offsets.max() <= 6.0 and played.slice(0.0, 2.5) == tune
    )  # ends in the audio


def test_continuation_keeps_the_given_audio_and_follows_a_melody_from_where_it_ends(pipe, inpaint, recording):
    output = generate(inpaint, audio=recording, repaint_end_s=3.0, output_type="latent")
    expected = padded_latents(pipe, recording, 3.0)
    kept = len(recording) // (pipe.vae_scale_factor * pipe.hop_length)
    seam = kept - pipe.window_overlap  # the last frames of the audio cross-fade into the continuation
    torch.testing.assert_close(output.audios[:, :, :seam], expected[:, :, :seam], rtol=0, atol=0)
    assert (output.audios[:, :, seam:kept] - expected[:, :, seam:kept]).abs().amax(dim=(0, 1, 3)).min() > 0
    assert (output.audios[:, :, kept:] - expected[:, :, kept:]).abs().mean() > 0.1
    guide = output.melodies[0]
    assert guide.id is not None and guide.metadata["audio_span_s"][0] == pytest.approx(2.0)
    played = guide.as_played()
    assert played.onsets[0] >= 2.0 and played.offsets.max() <= 3.0  # from where the recording ends to the end
    waveform = generate(inpaint, audio=recording, repaint_end_s=3.0).audios
    assert waveform.shape == (1, 48000)
    np.testing.assert_array_equal(waveform, generate(inpaint, audio=recording, repaint_end_s=3.0).audios)


def test_repaint_regenerates_only_the_span(pipe, inpaint, recording):
    output = generate(
        inpaint, audio=recording, repaint_start_s=0.6, repaint_end_s=1.2, melody=TUNE, output_type="latent"
    )
    expected = padded_latents(pipe, recording, 2.0)
    frame_s = pipe.vae_scale_factor * pipe.hop_length / pipe.sampling_rate
    start, end = int(0.6 / frame_s), int(np.ceil(1.2 / frame_s))
    difference = (output.audios - expected).abs().amax(dim=(0, 1, 3))
    assert difference[:start].max() == 0 and difference[end:].max() == 0
    assert difference[start + 2 : end - 2].min() > 0
    assert output.melodies[0].metadata["source"] == "user"


def test_audio_to_audio_strength(pipe, audio_to_audio, recording):
    # strength 1 is text-to-music with the same melody and generator
    np.testing.assert_array_equal(
        generate(audio_to_audio, audio=recording, strength=1.0, melody=TUNE).audios,
        generate(pipe, audio_length_in_s=2.0, melody=TUNE).audios,
    )
    expected = padded_latents(pipe, recording, 2.0)
    distance = [
        (
            generate(
                audio_to_audio, audio=recording, strength=s, melody=TUNE, num_inference_steps=10, output_type="latent"
            ).audios
            - expected
        )
        .abs()
        .mean()
        .item()
        for s in (0.2, 0.6, 1.0)
    ]
    assert distance[0] < distance[1] < distance[2]
    # without a melody, the melody transcribed from the audio guides it
    transcribed = generate(audio_to_audio, audio=recording, strength=0.5)
    assert transcribed.melodies[0].metadata["source"] == "audio" and transcribed.audios.shape == (1, 32000)
    assert transcribed.melodies[0].metadata["repeats"] == 1  # the audio's own melody is not looped to fill it


def test_one_checkpoint_loads_into_every_task_and_from_pipe_shares_the_components(pipe, recording, tmp_path):
    import json

    MG2InpaintPipeline.from_pipe(pipe).save_pretrained(tmp_path / "mg2")  # saved by a task: still the model
    assert json.loads((tmp_path / "mg2" / "model_index.json").read_text())["_class_name"] == [
        "pipeline_mg2",
        "MG2Pipeline",
    ]
    for task in (MG2Pipeline, MG2AudioToAudioPipeline, MG2InpaintPipeline):
        loaded = task.from_pretrained(tmp_path / "mg2")
        assert type(loaded) is task and loaded.config.aligned_melody == pipe.config.aligned_melody
    shared = MG2AudioToAudioPipeline.from_pipe(pipe)
    assert all(getattr(shared, name) is component for name, component in pipe.components.items())


@pytest.mark.parametrize(
    "task, kwargs, error, match",
    [
        ("text", {"strength": 0.5}, TypeError, "unexpected keyword argument 'strength'"),
        ("text", {"audio": "RECORDING"}, TypeError, "unexpected keyword argument 'audio'"),
        ("a2a", {}, ValueError, "audio is None: pass the recording"),
        ("a2a", {"audio": "RECORDING", "strength": 0.0}, ValueError, r"strength × num_inference_steps must be at least 1"),
        ("a2a", {"audio": "RECORDING", "strength": 1.5}, ValueError, "strength must be a number between 0 and 1"),
        ("a2a", {"audio": "RECORDING", "strength": float("nan")}, ValueError, "strength must be"),
        ("a2a", {"audio": "RECORDING", "audio_length_in_s": 3.0}, TypeError, "unexpected keyword argument"),
        ("inpaint", {"audio": "RECORDING"}, ValueError, "repaint_end_s is None"),
        ("inpaint", {"audio": "RECORDING", "repaint_start_s": 0.5}, ValueError, "repaint_end_s is None"),
        ("inpaint", {"audio": "RECORDING", "repaint_start_s": 1.0, "repaint_end_s": 0.5}, ValueError,
         "repaint_end_s must be at least"),
        ("inpaint", {"audio": "RECORDING", "repaint_start_s": 1.0, "repaint_end_s": 2.5}, ValueError,
         r"repaint_end_s must be a number between 0 and 2, got 2.5"),
        ("inpaint", {"audio": "RECORDING", "repaint_start_s": 2.5, "repaint_end_s": 3.0}, ValueError,
         r"repaint_start_s must be a number between 0 and 2, got 2.5"),
        # a continuation (no start) must end past the recording: never silently a re-rendering
        ("inpaint", {"audio": "RECORDING", "repaint_end_s": 2.0}, ValueError,
         r"repaint_end_s must be past the recording's end \(2.00 s\) to continue it, got 2"),
        ("inpaint", {"audio": "RECORDING", "repaint_end_s": 1.0}, ValueError, "repaint_end_s must be past"),
        ("inpaint", {"audio": "RECORDING", "repaint_end_s": 3.0, "strength": 0.5}, ValueError,
         "strength must be 1 for a continuation"),
        ("inpaint", {"audio": "RECORDING", "repaint_end_s": 601.0}, ValueError, "repaint_end_s must be a number"),
        ("a2a", {"audio": np.zeros((2, 16000), np.float32)}, ValueError, r"audio must be a mono waveform"),
        ("a2a", {"audio": np.zeros(16000, np.int16)}, TypeError, "floating-point samples"),
        ("a2a", {"audio": np.full(16000, np.nan, np.float32)}, ValueError, "NaN"),
        ("a2a", {"audio": np.zeros(100, np.float32)}, ValueError, "audio has 100 samples; at least"),
        ("inpaint", {"audio": np.zeros(16000 * 601, np.float32), "repaint_end_s": 700.0}, ValueError, "at most 600 s"),
        ("a2a", {"audio": [0.0] * 16000}, TypeError, "audio must be a path"),
        ("a2a", {"audio": "missing.wav"}, ValueError, "No audio file"),
        ("text", {"audio_length_in_s": 601}, ValueError, "audio_length_in_s must be a number between"),
    ],
)  # fmt: skip
def test_each_task_checks_its_arguments_before_compute(pipe, inpaint, audio_to_audio, recording, task, kwargs, error,
                                                       match):  # fmt: skip
    kwargs = {
        name: recording if isinstance(value, str) and value == "RECORDING" else value for name, value in kwargs.items()
    }
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *args: calls.append(1))  # the tasks share the UNet (from_pipe)
    try:
        with pytest.raises(error, match=match):
            {"text": pipe, "a2a": audio_to_audio, "inpaint": inpaint}[task](PROMPT, num_inference_steps=2, **kwargs)
    finally:
        hook.remove()
    assert not calls


def test_cli_continues_re_renders_and_repaints_a_recording(pipe, recording, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("mg2_pipeline.presets.load_pipeline", lambda model: pipe)
    given = tmp_path / "in.wav"
    soundfile.write(given, recording, 16000)
    base = ["generate", PROMPT, "--model", "preset:tiny", "--steps", "2", "--audio", str(given)]
    for extra, seconds in ((["--duration", "3"], 3.0), (["--strength", "0.6"], 2.0), (["--repaint", "0.5:1.0"], 2.0)):
        output = tmp_path / f"{extra[0].strip('-')}.wav"
        cli.main([*base, "--output", str(output), *extra])
        audio, _ = soundfile.read(output)
        assert audio.shape == (int(seconds * 16000),) and np.all(np.isfinite(audio))
    printed = capsys.readouterr().out
    assert (
        "transcribed from --audio" in printed and "It plays from 2.00 s" in printed
    )  # the continuation's retrieved melody
    for bad, message in (
        (["--repaint", "4"], "--repaint must be START:END"),
        (["--repaint", "0.5:9"], "--repaint end must be a number between 0 and 2, got 9"),
        (["--duration", "3", "--strength", "0.5"], "--duration continues the recording, --strength re-renders it"),
        (["--strength", "2"], "--strength must be a number between 0 and 1"),
        # a duration not longer than the recording continues nothing: refused, not re-rendered
        (["--duration", "2"], r"--duration must be longer than --audio \(2.00 s\) to continue it"),
        (["--duration", "1.5"], r"--duration must be longer than --audio \(2.00 s\) to continue it"),
    ):
        with pytest.raises(SystemExit, match=message):
            cli.main([*base, "--output", str(tmp_path / "bad.wav"), *bad])
    # longer than a 1.99 s recording, but the same mel frames once rounded: it would continue nothing
    shorter = tmp_path / "shorter.wav"
    soundfile.write(shorter, recording[: int(1.99 * 16000)], 16000)
    assert pipe.mel_frames(2.0) == pipe.mel_frames(1.99)
    with pytest.raises(SystemExit, match=r"--duration must be longer than --audio \(1.99 s\) to continue it"):
        cli.main([*base[:-1], str(shorter), "--output", str(tmp_path / "bad.wav"), "--duration", "2"])
    assert not (tmp_path / "bad.wav").exists()
