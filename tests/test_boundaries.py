"""Every input boundary holds: arbitrary values reach either a valid output or a ValueError/TypeError naming the
argument. Hypothesis drives each boundary; `pytest --hypothesis-show-statistics` prints how many cases each test
generated and how they ended (the `event`s below)."""

import io
import math
import os
import tempfile
from unittest import mock

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from mg2_pipeline import CLMPFeatureExtractor, Melody, MG2AudioToAudioPipeline, MG2InpaintPipeline, cli, load_audio
from mg2_pipeline.melody import MAX_MELODY_SECONDS, MAX_NOTE_SECONDS, MAX_NOTES
from mg2_pipeline.presets import build_pipeline

PROMPT = "a lively Irish jig on fiddle"
REFUSED = (ValueError, TypeError)

# Arbitrary values of every kind a caller may pass by mistake.
floats = st.floats(allow_nan=True, allow_infinity=True)
numbers = st.one_of(
    floats,
    st.integers(-(2**70), 2**70),
    st.integers(-3, 1100),
    st.just(10**400),
    st.just(-(10**400)),
    st.sampled_from([np.int64(3), np.float32(2.5), np.float64("nan"), np.int32(-1), True, False]),
)
junk = st.one_of(
    numbers,
    st.none(),
    st.text(max_size=12),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.just({}),
    st.just(object()),
)


@st.composite
def tensors(draw, shape=None):
    """Tensors of `shape` (or a random one) and a random dtype, sometimes holding NaN or infinity."""
    shape = shape or tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]))
    values = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 100))))
    special = draw(st.sampled_from([None, float("nan"), float("inf"), 1e30]))
    if special is not None:
        values.view(-1)[0] = special
    return values.to(dtype)


def unit_rows(values: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(values, dim=-1) if values.is_floating_point() else values


def refused_naming(error: Exception, *names: str) -> None:
    assert any(name.lower() in str(error).lower() for name in names), (
        f"{type(error).__name__} does not name {names}: {error}"
    )


# ----- Melody constructors -----


def melody_or_refusal(construct) -> None:
    """`construct()` gives a melody within every bound, or raises ValueError/TypeError with a message."""
    try:
        melody = construct()
    except REFUSED as error:
        event(f"refused: {type(error).__name__}")
        assert str(error)
        return
    event("valid melody")
    assert np.all(np.isfinite(melody.notes)) and 1 <= len(melody) <= MAX_NOTES
    assert melody.offsets.max() <= MAX_MELODY_SECONDS and np.all(melody.offsets - melody.onsets <= MAX_NOTE_SECONDS)
    assert melody.to_piano_roll().shape[1] <= math.ceil(MAX_MELODY_SECONDS * 100)


plausible_notes = st.lists(
    st.tuples(st.integers(0, 127), st.floats(0, 700), st.floats(0.001, 70)).map(
        lambda note: (note[0], note[1], note[1] + note[2])
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=300)
@given(
    notes=st.one_of(
        plausible_notes, st.lists(st.tuples(numbers, numbers, numbers), max_size=6), st.lists(junk, max_size=4), junk
    )
)
def test_melody_from_notes_is_valid_or_refused(notes):
    melody_or_refusal(lambda: Melody.from_notes(notes) if isinstance(notes, list) else Melody(notes))


@settings(max_examples=200)
@given(
    notes=st.lists(
        st.tuples(st.integers(0, 127), st.floats(0, 500), st.floats(0.001, MAX_NOTE_SECONDS)),
        min_size=1,
        max_size=6,
    )
)
def test_valid_notes_always_give_their_melody(notes):
    melody = Melody.from_notes([(pitch, onset, onset + duration) for pitch, onset, duration in notes])
    assert sorted(melody.pitches.tolist()) == sorted(pitch for pitch, _, _ in notes)
    assert melody.duration == pytest.approx(max(onset + duration for _, onset, duration in notes))


note_names = st.sampled_from(["G4", "C#5", "Bb3", "R", "A4", "H9", "c-1", "G", "", "G10"])
durations = st.one_of(
    floats.map(repr),
    st.floats(0.001, 2).map(repr),
    st.sampled_from(["1e300", "100000", "-0.5", "nan", "inf", "0", "abc", "0.25", ""]),
)
note_strings = st.lists(st.tuples(note_names, durations).map(lambda nd: f"{nd[0]}:{nd[1]}"), max_size=6).map(" ".join)
plausible_note_strings = st.lists(
    st.tuples(st.sampled_from(["G4", "A4", "R", "C#5", "Bb3"]), st.floats(0.001, 70)).map(
        lambda nd: f"{nd[0]}:{nd[1]!r}"
    ),
    min_size=1,
    max_size=6,
).map(" ".join)
token_strings = st.lists(
    st.tuples(st.sampled_from(["<G4>", "<Q4>", "<c4>", "G4"]), st.integers(-5, 600), st.integers(-5, 600)).map(
        lambda t: f"{t[0]},<{t[1]}>,<{t[2]}>"
    ),
    max_size=5,
).map("|".join)


@settings(max_examples=200)
@given(
    notes=st.lists(st.tuples(st.sampled_from(["G4", "A4", "C#5", "Bb3", "R"]), st.floats(0.01, 50)), max_size=6).map(
        lambda notes: [("D4", 0.5), *notes]
    )
)
def test_valid_note_strings_always_give_their_melody(notes):
    melody = Melody.from_text(" ".join(f"{name}:{seconds!r}" for name, seconds in notes))
    ends = np.cumsum([seconds for _, seconds in notes])
    assert len(melody) == sum(name != "R" for name, _ in notes)
    assert melody.duration == pytest.approx(max(end for end, (name, _) in zip(ends, notes) if name != "R"), rel=1e-6)


@settings(max_examples=300)
@given(
    text=st.one_of(
        plausible_note_strings,
        note_strings,
        token_strings,
        st.text(max_size=40),
        st.just("/etc/hostname"),
        st.just("/tmp"),
    )
)
def test_melody_from_text_never_reads_a_file_and_is_valid_or_refused(text):
    def no_files(*args, **kwargs):
        raise AssertionError("Melody.from_text touched the file system")

    with mock.patch("builtins.open", no_files), mock.patch("os.stat", no_files):
        melody_or_refusal(lambda: Melody.from_text(text))


@settings(max_examples=200)
@given(
    source=st.one_of(
        junk,
        note_strings,
        st.sampled_from(["/tmp", "missing.wav", "missing.mid", "missing.abc", "x.txt", "/nonexistent/tune", ""]),
        st.builds(lambda n, s: np.full(n, s, dtype=np.float32), st.integers(0, 64), floats),
    )
)
def test_melody_load_is_valid_or_refused(source):
    melody_or_refusal(lambda: Melody.load(source))


@settings(max_examples=300)
@given(
    method=st.sampled_from(
        ["fit_to", "stretch", "transpose", "to_piano_roll", "slice", "render_tones", "to_pitch_class_roll"]
    ),
    value=st.one_of(junk, st.floats(-5, 700), st.integers(-130, 130)),
    other=st.one_of(junk, st.floats(-5, 700)),
)
@example(method="fit_to", value=5e-324, other=0.0)  # found by this test: seconds / duration rounded to 0 repeats
def test_melody_methods_refuse_bad_arguments_by_name(method, value, other):
    melody = Melody.from_string("G4:0.5 A4:0.25 R:0.25 B4:1")
    names = {
        "fit_to": ("seconds", "Looping"),
        "stretch": ("factor", "melody"),
        "transpose": ("semitones", "Transposing"),
        "to_piano_roll": ("frames_per_second",),
        "slice": ("slice", "Empty melody"),
        "render_tones": ("num_samples", "sample_rate"),
        "to_pitch_class_roll": ("num_frames", "frames_per_second"),
    }[method]
    two_arguments = method in ("slice", "render_tones", "to_pitch_class_roll")
    try:
        result = getattr(melody, method)(value, other) if two_arguments else getattr(melody, method)(value)
    except REFUSED as error:
        event(f"{method}: refused")
        refused_naming(error, *names)
        return
    event(f"{method}: valid")
    if isinstance(result, Melody):
        assert np.all(np.isfinite(result.notes)) and result.offsets.max() <= MAX_MELODY_SECONDS
    else:
        assert np.all(np.isfinite(result))


# ----- audio inputs -----


@settings(max_examples=60)
@given(
    samples=st.lists(floats.map(np.float32), min_size=1, max_size=40).map(
        lambda v: np.resize(np.array(v, np.float32), 4000)
    ),
    sample_rate=st.one_of(st.integers(-10, 400_000), st.sampled_from([16000, 22050, 8000]), floats, st.just(True)),
)
def test_audio_waveforms_with_nan_or_bad_rates_are_refused(samples, sample_rate):
    try:
        melody = Melody.from_audio(samples, sample_rate)
    except REFUSED as error:
        event(f"refused: {str(error)[:30]}")
        refused_naming(error, "sample_rate", "NaN or infinite", "silent", "no notes", "melody may last")
        if not np.all(np.isfinite(samples)):
            assert "NaN or infinite" in str(error) or "sample_rate" in str(error)
        return
    event("transcribed")
    assert np.all(np.isfinite(samples)) and np.all(np.isfinite(melody.notes))


@settings(max_examples=150)
@given(payload=st.one_of(st.binary(max_size=64), st.lists(floats, min_size=1, max_size=64)))
def test_audio_files_are_read_finite_or_refused(payload):
    if isinstance(payload, list):  # a float WAV, possibly holding NaN or infinity
        buffer = io.BytesIO()
        soundfile.write(buffer, np.array(payload, np.float32), 16000, format="WAV", subtype="FLOAT")
        payload = buffer.getvalue()
    try:
        waveform = load_audio(payload)
    except ValueError as error:
        event("refused")
        refused_naming(error, "audio")
        return
    event("read")
    assert np.all(np.isfinite(waveform))
    try:
        CLMPFeatureExtractor(max_length_s=1.0)(waveform, sampling_rate=16000)
    except ValueError as error:
        refused_naming(error, "audio[0]")


# ----- MG2Pipeline.__call__ -----


@pytest.fixture(scope="module")
def pipe():
    pipeline = build_pipeline("tiny", seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def tasks(pipe):
    """The recording tasks, sharing the text-to-music pipeline's components."""
    inpaint = MG2InpaintPipeline.from_pipe(pipe)
    return {"audio-to-audio": MG2AudioToAudioPipeline.from_pipe(pipe), "continuation": inpaint, "repaint": inpaint}


BASE = {"prompt": PROMPT, "num_inference_steps": 2, "audio_length_in_s": 0.64}
LATENT_SHAPE = (1, 4, 32, 32)  # the tiny preset at 0.64 s
SINE = (0.3 * np.sin(2 * np.pi * 440 * np.arange(10240) / 16000)).astype(np.float32)  # 0.64 s of A4


def call_arguments():
    """(argument, value) pairs: arbitrary values for every argument, plus near-valid ones of its own kind."""
    own = {
        "prompt": st.one_of(
            st.text(max_size=30),
            st.lists(st.text(max_size=8), max_size=3),
            st.just("🎻🎻"),
            st.just("\x00\x01"),
            st.just("x" * 3000),
        ),
        "negative_prompt": st.one_of(st.text(max_size=20), st.lists(st.text(max_size=5), max_size=2)),
        "melody": st.one_of(
            note_strings,
            token_strings,
            st.just("/tmp"),
            st.just("missing.wav"),
            st.builds(lambda s: np.full(1600, s, np.float32), floats),
        ),
        "audio": st.one_of(
            st.builds(lambda value, size: np.full(size, value, np.float32), floats, st.integers(0, 20000)),
            st.just(SINE),
            st.just(SINE.astype(np.int16)),
            st.just(np.stack([SINE, SINE])),
            st.just("/etc/passwd"),
            st.just("missing.wav"),
            st.just(torch.from_numpy(SINE)),
        ),
        "strength": st.one_of(numbers, st.floats(-1, 2)),
        "repaint_start_s": st.one_of(numbers, st.floats(-1, 1)),
        "repaint_end_s": st.one_of(numbers, st.floats(-1, 1)),
        "audio_length_in_s": st.one_of(numbers, st.floats(0, 3)),
        "num_inference_steps": st.one_of(numbers, st.integers(0, 6)),
        "guidance_scale": st.one_of(numbers, st.floats(-1, 12)),
        "melody_guidance_scale": st.one_of(numbers, st.floats(-1, 12)),
        "guidance_interval": st.one_of(
            st.tuples(numbers, numbers),
            st.tuples(st.floats(-1, 2), st.floats(-1, 2)),
            st.lists(st.floats(0, 1), max_size=3),
        ),
        "num_waveforms_per_prompt": st.one_of(numbers, st.integers(0, 5)),
        "retrieval_top_k": st.one_of(numbers, st.integers(0, 8)),
        "generator": st.one_of(
            st.just(torch.Generator().manual_seed(0)), st.lists(st.just(torch.Generator()), max_size=3)
        ),
        "latents": st.one_of(tensors(LATENT_SHAPE), tensors(), st.builds(lambda: np.zeros(LATENT_SHAPE))),
        "prompt_embeds": st.one_of(tensors((1, 32)), tensors((1, 32)).map(unit_rows), tensors()),
        "melody_embeds": st.one_of(tensors((1, 32)), tensors((1, 32)).map(unit_rows), tensors()),
        "output_type": st.one_of(st.sampled_from(["np", "pt", "latent", "wav"]), junk),
        "return_dict": junk,
        "callback_on_step_end": st.sampled_from([lambda *a: None, lambda *a: {}, lambda *a: {"latents": 3}, 5]),
        "callback_on_step_end_tensor_inputs": st.one_of(
            st.just("latents"), st.lists(st.sampled_from(["latents", "prompt_embeds", "noise", 3]), max_size=2)
        ),
    }
    return st.sampled_from(sorted(own)).flatmap(lambda name: st.tuples(st.just(name), st.one_of(own[name], junk)))


@settings(max_examples=400)
@given(argument=call_arguments())
def test_every_call_argument_gives_valid_output_or_an_error_naming_it(pipe, tasks, argument):
    name, value = argument
    kwargs = {**BASE, name: value}
    if name == "prompt_embeds":
        kwargs["prompt"] = None
    task = pipe
    if name in ("audio", "strength"):  # the recording's arguments go to the task that takes them
        task, kwargs = tasks["audio-to-audio"], {"audio": SINE, **kwargs}
    elif name in ("repaint_start_s", "repaint_end_s"):
        task, kwargs = tasks["repaint"], {"audio": SINE, "repaint_start_s": 0.1, "repaint_end_s": 0.5, **kwargs}
    if task is not pipe:
        del kwargs["audio_length_in_s"]
    names = {
        "callback_on_step_end": ("callback_on_step_end",),
        "latents": ("latents",),
        "prompt_embeds": ("prompt_embeds", "prompt"),
        "melody_embeds": ("melody_embeds", "melody"),
        "generator": ("generator",),
        "repaint_start_s": ("repaint_start_s", "repaint_end_s"),  # no start: a continuation, which needs a later end
    }.get(name, (name,))
    try:
        output = task(**kwargs)
    except REFUSED as error:
        event(f"{name}: refused ({type(error).__name__})")
        refused_naming(error, *names)
        return
    event(f"{name}: valid output")
    audio = output[0] if isinstance(output, tuple) else output.audios
    assert np.all(np.isfinite(np.asarray(audio, dtype=np.float32)))


def scale_change(text_scale: float, melody_scale: float):
    """A callback that sets both guidance scales after the first step."""

    def change(pipeline, step, timestep, tensors):
        if step == 0:
            pipeline._guidance_scale, pipeline._melody_guidance_scale = text_scale, melody_scale
        return {}

    return change


@st.composite
def valid_calls(draw):
    """Valid arguments across every task: text to music, continuation, audio-to-audio and repaint, with or without a
    melody, with guidance scales a callback may change mid-call."""
    scales = st.sampled_from([0.0, 1.0, 1.5, 3.0])
    kwargs = {
        **BASE,
        "num_inference_steps": draw(st.integers(1, 3)),
        "guidance_scale": draw(scales),
        "melody_guidance_scale": draw(scales),
        "num_waveforms_per_prompt": draw(st.integers(1, 2)),
        "output_type": draw(st.sampled_from(["np", "pt"])),
    }
    if draw(st.booleans()):
        kwargs["melody"] = draw(st.sampled_from(["G4:0.25 A4:0.25 B4:0.5", "C5:0.1 R:0.2 E5:0.3"]))
    if draw(st.booleans()):
        kwargs["callback_on_step_end"] = scale_change(draw(scales), draw(scales))
    task = draw(st.sampled_from(["text to music", "continuation", "audio-to-audio", "repaint"]))
    if task != "text to music":
        del kwargs["audio_length_in_s"]
        kwargs["audio"] = SINE
    if task == "continuation":
        kwargs["repaint_end_s"] = draw(st.sampled_from([0.8, 1.28]))
    elif task == "audio-to-audio":
        kwargs["strength"] = draw(st.floats(1 / kwargs["num_inference_steps"], 1))
    elif task == "repaint":
        start = draw(st.floats(0, 0.4))
        kwargs.update(repaint_start_s=start, repaint_end_s=draw(st.floats(start + 0.1, 0.64)))
    return task, kwargs


@settings(max_examples=40)
@given(call=valid_calls())
def test_every_valid_call_gives_finite_audio_of_its_length(pipe, tasks, call):
    task, kwargs = call
    event(task)
    output = tasks.get(task, pipe)(**kwargs)
    audio = np.asarray(output.audios, dtype=np.float32)
    seconds = kwargs.get("audio_length_in_s") or (kwargs["repaint_end_s"] if task == "continuation" else 0.64)
    assert audio.shape == (kwargs["num_waveforms_per_prompt"], round(seconds * 16000))
    assert np.all(np.isfinite(audio)) and np.abs(audio).max() <= 1


def test_after_refused_calls_the_pipeline_gives_bit_identical_output(pipe):
    def good():
        return pipe(**BASE, generator=torch.Generator().manual_seed(7)).audios

    before = good()
    bad = [
        {"guidance_scale": float("nan")},
        {"num_inference_steps": 10**9},
        {"melody": "G4:100000"},
        {"latents": torch.full(LATENT_SHAPE, float("nan"))},
        {"callback_on_step_end": lambda *a: None},
        {"prompt": "🎻"},
        {"generator": 3},
        {"melody": np.full(1600, np.nan, np.float32)},
    ]
    for kwargs in bad:
        with pytest.raises(REFUSED):
            pipe(**{**BASE, **kwargs})
    np.testing.assert_array_equal(good(), before)


def test_an_unreadable_prompt_is_refused_and_a_partly_unknown_one_warned(pipe, caplog):
    for prompt in ("🎻🎻", "\x01\x02", "!!! ???", "a" * 300):
        with pytest.raises(ValueError, match="prompt"):
            pipe.check_prompt(prompt)
    assert pipe.check_prompt("a jig 🎻") == ["a jig 🎻"]
    assert "1 of 4 word pieces" in caplog.text and "🎻" in caplog.text
    pipe.check_prompt("jig " * 40)
    assert "ignores" in caplog.text


# ----- the CLI -----


@settings(
    max_examples=120,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(
    flag=st.sampled_from(
        [
            "--duration",
            "--steps",
            "--guidance",
            "--melody-guidance",
            "--seed",
            "--melody",
            "--output",
            "--audio",
            "--strength",
            "--repaint",
        ]
    ),
    value=st.one_of(
        st.text(max_size=10),
        st.sampled_from(
            [
                "nan",
                "inf",
                "-1",
                "1e30",
                "1e300",
                "0",
                "2",
                "99999999999999999999",
                "G4:100000",
                "/tmp",
                "missing.wav",
                "afile/x.wav",
                "sub/x.wav",
                "x.FLAC",
                "x.mp3",
                ".wav",
                "x\x00.wav",
                "afile",
            ]
        ),
    ),
)
def test_cli_arguments_give_a_finite_wav_or_an_error_and_no_file(pipe, monkeypatch, flag, value):
    monkeypatch.setattr("mg2_pipeline.presets.load_pipeline", lambda model: pipe)
    with tempfile.TemporaryDirectory() as folder:
        open(os.path.join(folder, "afile"), "w").close()
        output = os.path.join(folder, value.lstrip("/") if flag == "--output" else "out.wav")
        arguments = ["--output", output, "--steps", "2", "--duration", "0.64"] + (
            [flag, value] if flag != "--output" else []
        )
        try:
            cli.main(["generate", PROMPT, "--model", "preset:tiny", *arguments])
        except SystemExit as exit:
            event(f"{flag}: refused")
            assert exit.code not in (0, None)
            assert not os.path.isfile(output) or output.endswith("afile")
            return
        event(f"{flag}: wrote a WAV")
        audio, _ = soundfile.read(output)
        seconds = float(value) if flag == "--duration" else 0.64
        assert np.all(np.isfinite(audio)) and audio.shape == (int(round(seconds * 16000)),)


def test_cli_checks_the_output_path_before_generating_and_stays_identical_after_refusals(
    pipe, monkeypatch, tmp_path, capsys
):
    monkeypatch.setattr("mg2_pipeline.presets.load_pipeline", lambda model: pipe)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    (tmp_path / "afile").write_text("")
    try:
        for output, message in (
            (tmp_path / "afile" / "x.wav", "is a file, not a folder"),
            (tmp_path, "must end in .wav"),
            (tmp_path / "x.mp3", "must end in .wav"),
        ):
            with pytest.raises(SystemExit, match=message):
                cli.main(["generate", PROMPT, "--model", "preset:tiny", "--output", str(output)])
    finally:
        hook.remove()
    assert not calls

    def good(name):
        cli.main(
            [
                "generate",
                PROMPT,
                "--model",
                "preset:tiny",
                "--output",
                str(tmp_path / name),
                "--steps",
                "2",
                "--duration",
                "0.64",
                "--seed",
                "3",
            ]
        )
        return (tmp_path / name).read_bytes()

    first = good("first.wav")
    for bad in (
        ["--guidance", "nan"],
        ["--duration", "1e300"],
        ["--melody", "G4:1e300"],
        ["--steps", "1000000000"],
        ["--melody", str(tmp_path)],
        ["--seed", str(2**70)],
    ):
        with pytest.raises(SystemExit, match="error: "):
            cli.main(["generate", PROMPT, "--model", "preset:tiny", "--output", str(tmp_path / "bad.wav"), *bad])
        assert not (tmp_path / "bad.wav").exists()
    assert good("second.wav") == first
