"""The Gradio Space (space/app.py), served as a user would run it and driven through gradio_client and Chromium."""

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
from conftest import ROOT
from diffusers import DPMSolverMultistepScheduler
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from mg2_pipeline import Melody
from mg2_pipeline.defaults import DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_X0_NUM_INFERENCE_STEPS
from mg2_pipeline.presets import PRESET_MELODIES, build_pipeline

CHROMIUM = "/usr/bin/chromium"
NOTES = "D4:0.3 G4:0.3 G4:0.3 A4:0.3 B4:0.6 A4:0.3 G4:0.3 E4:0.6"


@contextlib.contextmanager
def browser_page(**page_options):
    """A Chromium page whose launch and waits have no time limit (0), not Playwright's 30 s default: a slow machine is
    not a failure. `expect` takes `timeout=0` per call: its global option reads 0 as unset and falls back to 5 s."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"], timeout=0)
        page = browser.new_page(**page_options)
        page.set_default_timeout(0)
        try:
            yield page
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def space_url(tmp_path_factory):
    """`python space/app.py` with a random tiny pipeline on a free loopback port; two generations at once. The pipeline
    is saved with an x₀-predicting scheduler, as trained `small` models are, so text to music has its few default
    steps."""
    model = tmp_path_factory.mktemp("model")
    pipe = build_pipeline("tiny")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    pipe.save_pretrained(model)
    port = free_port()
    env = {
        **os.environ,
        "MG2_MODEL": str(model),
        "MG2_CONCURRENCY": "2",
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
        "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio")),
    }
    server = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "space", "app.py")],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    started = []
    for line in server.stdout:  # Gradio prints the URL once it serves; the loop ends early only if the app exits
        started.append(line)
        if "Running on local URL" in line:
            break
    else:
        pytest.fail("The Space exited before serving:\n" + "".join(started)[-4000:])
    log = open(tmp_path_factory.mktemp("space") / "app.log", "w")
    threading.Thread(target=log.writelines, args=(server.stdout,), daemon=True).start()  # keep the pipe drained
    url = f"http://127.0.0.1:{port}/"
    yield url
    server.terminate()
    server.wait()
    log.close()


def space_client(url: str) -> Client:
    """A Gradio client with no time limit on its HTTP calls (httpx's default is 5 s): a slow machine is not a failure."""
    return Client(url, verbose=False, httpx_kwargs={"timeout": None})


@pytest.fixture(scope="module")
def client(space_url):
    return space_client(space_url)


def generate(
    client,
    prompt="A lively Irish jig on fiddle",
    melody_file=None,
    melody_audio=None,
    notes="",
    duration=1.0,
    steps=2,
    seed=0,
    candidates=1,
    top_k=3,
    melody_guidance=2.0,
    mode="Text to music",
    recording=None,
    strength=0.8,
    repaint_start=0.0,
    repaint_end=0.0,
    whole_melody=False,
):
    return client.predict(
        prompt,
        "",
        melody_file,
        melody_audio,
        notes,
        duration,
        steps,
        3.0,
        melody_guidance,
        seed,
        candidates,
        top_k,
        mode,
        recording,
        strength,
        repaint_start,
        repaint_end,
        whole_melody,
        api_name="/generate",
    )


def read_wav(path: str) -> np.ndarray:
    waveform, sampling_rate = sf.read(path)
    assert sampling_rate == 16000
    return waveform


def test_endpoints_are_named_after_their_functions(client):
    assert set(client.view_api(return_format="dict", print_info=False)["named_endpoints"]) == {
        "/generate",
        "/retrieve",
    }


def test_generate_returns_audio_pictures_and_the_retrieved_melody(client):
    audio, spectrogram, info, piano_roll, midi, retrieved = generate(client, duration=1.2, top_k=4)
    assert len(read_wav(audio)) == round(1.2 * 16000)
    for picture in (spectrogram, piano_roll):
        with Image.open(picture) as image:
            assert image.format == "PNG" and image.width > 300
    assert retrieved["headers"][:7] == ["rank", "id", "title", "type", "meter", "source", "similarity"]
    rows = retrieved["data"]
    assert [row[0] for row in rows] == [1, 2, 3, 4]
    # the prompt names a jig: the preset index's one jig first, then the others by similarity
    assert rows[0][3] == "jig" and rows[0][7] == "jig" and all(row[7] == "" for row in rows[1:])
    assert [row[6] for row in rows[1:]] == sorted((row[6] for row in rows[1:]), reverse=True)
    title = rows[0][2]  # one candidate: guided by the top retrieved melody
    assert (
        title in PRESET_MELODIES
        and title in info
        and "retrieved melody" in info
        and "matches the prompt's jig" in info
    )
    assert Melody.load(midi).pitches.tolist() == Melody.from_string(PRESET_MELODIES[title]).pitches.tolist()
    first_notes = rows[0][8].removesuffix(" …").split()
    assert first_notes == Melody.from_string(PRESET_MELODIES[title]).to_note_string().split()[: len(first_notes)]


def test_generate_is_deterministic_under_a_seed(client):
    first, second, other = (read_wav(generate(client, seed=seed)[0]) for seed in (7, 7, 8))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_generate_follows_a_typed_or_uploaded_melody(client, tmp_path):
    _, _, info, _, midi, _ = generate(client, notes=NOTES, candidates=2)
    assert info.startswith("**Your melody**")
    assert Melody.load(midi).pitches.tolist() == Melody.from_string(NOTES).pitches.tolist()
    upload = str(tmp_path / "tune.mid")
    Melody.from_string("C5:0.5 E5:0.5 G5:1").to_midi(upload)
    audio, _, info, _, midi, _ = generate(client, melody_file=handle_file(upload), duration=0.5)
    assert info.startswith("**Your melody**") and len(read_wav(audio)) == 8000
    assert Melody.load(midi).pitches.tolist() == [72, 76, 79]


def test_a_recording_is_continued_re_rendered_and_repainted(client, tmp_path):
    upload = tmp_path / "recording.wav"
    sf.write(upload, Melody.from_string(NOTES).render_tones(16000), 16000)  # 1 s of the typed tune as tones
    recording = handle_file(str(upload))
    continued, _, info, *_ = generate(client, mode="Continue a recording", recording=recording, duration=2.0)
    assert len(read_wav(continued)) == 32000 and "plays 1.0–2.0 s" in info
    for duration in (1.0, 0.5):  # not longer than the recording: refused, not re-rendered
        with pytest.raises(AppError, match=r"needs a Duration longer than the recording \(1.00 s\)"):
            generate(client, mode="Continue a recording", recording=recording, duration=duration)
    rendered, _, info, *_ = generate(client, mode="Re-render a recording", recording=recording, strength=0.5)
    assert len(read_wav(rendered)) == 16000 and "Melody transcribed from your recording" in info
    repainted, *_ = generate(
        client, mode="Repaint part of a recording", recording=recording, repaint_start=0.2, repaint_end=0.6
    )
    assert len(read_wav(repainted)) == 16000
    with pytest.raises(AppError, match="repaint_end_s must be a number between 0 and 1, got 5"):
        generate(client, mode="Repaint part of a recording", recording=recording, repaint_start=0.2, repaint_end=5.0)
    whole, *_ = generate(client, notes=NOTES, whole_melody=True)
    tune_seconds = Melody.from_string(NOTES).duration
    assert len(read_wav(whole)) == round(tune_seconds * 16000)


def test_retrieve_lists_the_top_k_melodies(client):
    rows = client.predict("A slow chorale on church organ", 5, api_name="/retrieve")["data"]
    assert len(rows) == 5 and {row[2] for row in rows} <= set(PRESET_MELODIES)
    assert [row[6] for row in rows] == sorted((row[6] for row in rows), reverse=True)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"notes": "G4:0.5 Q9:1"}, "Could not read your melody (notes)"),
        ({"notes": NOTES, "melody_file": "tune.mid"}, "Give one melody, not several"),
        (
            {"duration": 400.0},
            "Duration (seconds; a continuation's total length) must be a number between 0.04 and 300, got 400.0",
        ),
        ({"mode": "Continue a recording"}, "Mode 'Continue a recording' needs a recording"),
        ({"mode": "Sing it"}, "Sing it"),
        (
            {"strength": 0.0},
            "Strength (re-render: 0 keeps the recording, 1 generates anew) must be a number between 0.05 and 1",
        ),
        ({"repaint_end": 61}, "Repaint to (s) must be a number between 0 and 60"),
        ({"seed": -1}, "Seed must be a number between 0 and 4294967295, got -1"),
        ({"seed": 1e30}, "Seed must be a number between 0 and 4294967295"),
        ({"seed": "abc"}, "Seed must be a number between 0 and 4294967295, got 'abc'"),
        (
            {"melody_guidance": -1.0},
            "Melody strength (0 ignores the melody; higher follows it more tightly) must be a number between 0 and 10",
        ),
        (
            {"melody_guidance": 11.0},
            "Melody strength (0 ignores the melody; higher follows it more tightly) must be a number between 0 and 10",
        ),
        ({"notes": "G4:100000"}, "must be a number of seconds in (0, 60]"),
        ({"prompt": "🎻🎻"}, "has no letter or digit"),
        ({"prompt": "jig " * 600}, "at most 2000 are allowed"),
    ],
)
def test_bad_input_shows_an_error(client, tmp_path, arguments, message):
    if "melody_file" in arguments:
        Melody.from_string(NOTES).to_midi(tmp_path / "tune.mid")
        arguments["melody_file"] = handle_file(str(tmp_path / "tune.mid"))
    with pytest.raises(AppError, match=re.escape(message)):
        generate(client, **arguments)


def test_malformed_midi_and_silent_recording_fail_clearly_and_the_next_request_succeeds(client, tmp_path):
    broken = tmp_path / "broken.mid"
    broken.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01 this is not a MIDI file")
    with pytest.raises(AppError, match="Unreadable MIDI file"):
        generate(client, melody_file=handle_file(str(broken)))
    silence = tmp_path / "silence.wav"
    sf.write(silence, np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises(AppError, match="silent"):
        generate(client, melody_audio=handle_file(str(silence)))
    long_recording = tmp_path / "long.wav"
    sf.write(long_recording, 0.3 * np.sin(np.arange(61 * 16000) * 2 * np.pi * 440 / 16000).astype(np.float32), 16000)
    with pytest.raises(AppError, match=r"lasts 61.0 s; at most 60 s are allowed"):
        generate(client, melody_audio=handle_file(str(long_recording)))
    half_second = read_wav(generate(client, duration=0.5)[0])  # the server still serves after the errors
    assert len(half_second) == 8000


def post(space_url: str, body: str) -> str:
    """A raw API call, as any HTTP client may send it (JSON gradio_client would not produce); returns the event stream."""
    request = urllib.request.Request(
        space_url + "gradio_api/call/generate", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    event_id = json.load(urllib.request.urlopen(request))["event_id"]
    stream = urllib.request.urlopen(f"{space_url}gradio_api/call/generate/{event_id}")
    return stream.read().decode()


GOOD_REQUEST = ["A jig", "", None, None, "", 0.5, 2, 3.0, 2.0, 0, 1, 3, "Text to music", None, 0.8, 0.0, 0.0, False]


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    """A valid MIDI file and a 0.5 s WAV of the tune, outside the Space's upload folder."""
    folder = tmp_path_factory.mktemp("outside-uploads")
    melody = Melody.from_string(NOTES)
    melody.to_midi(folder / "tune.mid")
    sf.write(folder / "tune.wav", melody.render_tones(8000), 16000)
    return {"midi": str(folder / "tune.mid"), "wav": str(folder / "tune.wav")}


def test_no_server_path_is_ever_read(client, space_url, valid_files):
    hostname = open("/etc/hostname").read().strip()
    with pytest.raises(
        AppError, match="Could not read your melody \\(notes\\): Malformed note '/etc/hostname'"
    ) as refused:
        generate(client, notes="/etc/hostname")
    assert hostname not in str(refused.value).replace("/etc/hostname", "")
    # Uploaded, the valid files give music ...
    for upload in (
        {"melody_file": handle_file(valid_files["midi"])},
        {"melody_audio": handle_file(valid_files["wav"])},
    ):
        assert len(read_wav(generate(client, duration=0.5, **upload)[0])) == 8000
    # ... named by their server path instead, they are refused unread, like any other server file.
    for index, path in ((2, valid_files["midi"]), (3, valid_files["wav"]), (2, "/etc/hostname"), (3, "/etc/hostname")):
        data = list(GOOD_REQUEST)
        data[index] = {"path": path, "meta": {"_type": "gradio.FileData"}}
        reply = post(space_url, json.dumps({"data": data}))
        assert "event: error" in reply and "event: complete" not in reply, reply[:300]


def test_numbers_json_cannot_carry_safely_are_refused_by_name(space_url):
    for index, label in ((5, "Duration"), (6, "Denoising steps"), (9, "Seed")):
        for value in ("NaN", "Infinity", "1e999", '"abc"', "null", "[1]"):
            data = list(GOOD_REQUEST)
            data[index] = "@@"
            reply = post(space_url, json.dumps({"data": data}).replace('"@@"', value))
            assert "event: error" in reply and label in reply, (label, value, reply[:300])


def test_oversized_requests_are_refused_before_they_are_read(space_url):
    host, port = urllib.parse.urlsplit(space_url).hostname, urllib.parse.urlsplit(space_url).port
    for path in ("/gradio_api/call/generate", "/gradio_api/upload"):
        connection = http.client.HTTPConnection(host, port)
        connection.putrequest("POST", path)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(24 * 2**20))
        connection.endheaders()  # the 24 MB body is never sent: the answer comes first
        assert connection.getresponse().status == 413
        connection.close()
    assert "event: complete" in post(space_url, json.dumps({"data": GOOD_REQUEST}))


fields = {
    "duration": st.one_of(st.floats(-10, 10), st.integers(-(2**40), 2**40), st.text(max_size=5), st.none()),
    "steps": st.one_of(st.integers(-5, 120), st.floats(-1, 200), st.text(max_size=5), st.none()),
    "melody_guidance": st.one_of(st.floats(-20, 20), st.text(max_size=5), st.booleans()),
    "seed": st.one_of(st.integers(-(2**70), 2**70), st.floats(-1e40, 1e40), st.text(max_size=5)),
    "candidates": st.one_of(st.integers(-3, 10), st.floats(-1, 6)),
    "top_k": st.one_of(st.integers(-3, 20), st.text(max_size=3)),
    "notes": st.one_of(
        st.text(max_size=20), st.sampled_from(["/etc/hostname", "G4:100000", "G4:1e300", "G4:0.25 A4:nan"])
    ),
    "prompt": st.one_of(st.text(max_size=20), st.sampled_from(["🎻", "\x00", "jig " * 600])),
    "mode": st.one_of(st.text(max_size=8), st.sampled_from(["Continue a recording", "Re-render a recording"])),
    "strength": st.one_of(st.floats(-2, 2), st.text(max_size=3)),
    "repaint_start": st.one_of(st.floats(-100, 100), st.text(max_size=3)),
}
LABELS = {
    "duration": "Duration",
    "steps": "Denoising steps",
    "melody_guidance": "Melody strength",
    "seed": "Seed",
    "candidates": "Candidates",
    "top_k": "Retrieved melodies",
    "notes": "melody",
    "prompt": "prompt",
    "mode": "Mode",
    "strength": "Strength",
    "repaint_start": "Repaint from",
}


@settings(
    max_examples=40,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(field=st.sampled_from(sorted(fields)).flatmap(lambda name: st.tuples(st.just(name), fields[name])))
def test_any_field_value_gives_music_or_an_error_naming_the_field(client, field):
    name, value = field
    try:
        result = generate(client, **{"duration": 0.5, name: value})
    except AppError as error:
        event(f"{name}: refused")
        assert LABELS[name].lower() in str(error).lower(), str(error)
        return
    event(f"{name}: music")
    assert np.all(np.isfinite(read_wav(result[0])))


@st.composite
def valid_requests(draw):
    """Valid values for every control, across the four modes (a recording of 0.5 s where a mode needs one)."""
    steps = draw(st.integers(1, 3))
    request = {
        "duration": draw(st.sampled_from([0.6, 0.8, 1.0])),
        "steps": steps,
        "melody_guidance": draw(st.floats(0, 10)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "candidates": draw(st.integers(1, 2)),
        "top_k": draw(st.integers(1, 10)),
        "notes": draw(st.sampled_from(["", NOTES])),
        "mode": draw(st.sampled_from(["Text to music", "Continue a recording", "Re-render a recording",
                                      "Repaint part of a recording"])),
        "strength": draw(st.floats(1 / steps, 1)),
    }  # fmt: skip
    start = draw(st.floats(0, 0.3))
    request.update(repaint_start=start, repaint_end=draw(st.floats(start + 0.1, 0.5)))
    return request


@settings(
    max_examples=16,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(request=valid_requests())
def test_valid_values_of_every_control_give_music_of_the_expected_length(client, valid_files, request):
    event(request["mode"])
    recording = handle_file(valid_files["wav"]) if request["mode"] != "Text to music" else None
    audio = read_wav(generate(client, recording=recording, **request)[0])
    expected = request["duration"] if request["mode"] in ("Text to music", "Continue a recording") else 0.5
    assert len(audio) == round(expected * 16000) and np.all(np.isfinite(audio))


def test_after_refused_requests_the_space_gives_bit_identical_music(client, space_url):
    before = read_wav(generate(client, duration=0.5, seed=5)[0])
    for bad in (
        {"seed": 1e30},
        {"steps": "abc"},
        {"notes": "G4:100000"},
        {"notes": "/etc/hostname"},
        {"prompt": "🎻"},
        {"duration": -1},
    ):
        with pytest.raises(AppError):
            generate(client, **{"duration": 0.5, **bad})
    server_file = {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}
    assert "event: error" in post(space_url, json.dumps({"data": [*GOOD_REQUEST[:2], server_file, *GOOD_REQUEST[3:]]}))
    np.testing.assert_array_equal(read_wav(generate(client, duration=0.5, seed=5)[0]), before)


def test_twenty_concurrent_requests_all_return_their_audio(space_url):
    seeds = [index % 4 for index in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda seed: generate(space_client(space_url), seed=seed, duration=0.8), seeds))
    waveforms = [read_wav(result[0]) for result in results]
    assert all(len(waveform) == 12800 for waveform in waveforms)
    # Two pipelines ran side by side without disturbing each other: a seed gives its audio whatever ran beside it, up to
    # the last bit of a 16-bit sample (math libraries may round a sum differently with concurrent threads), and apart
    # from the audio of the other seeds.
    first = {seed: waveforms[seeds.index(seed)] for seed in set(seeds)}
    for seed, waveform in zip(seeds, waveforms):
        np.testing.assert_allclose(waveform, first[seed], rtol=0, atol=4 / 32768)
    for seed in range(1, 4):
        assert np.abs(first[seed] - first[0]).max() > 100 / 32768


def test_a_browser_fills_the_prompt_and_gets_audio(space_url, tmp_path):
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: `make test` installs Debian's chromium with apt-get"
    with browser_page(viewport={"width": 1280, "height": 1400}) as page:
        page.goto(space_url)
        page.get_by_label("Prompt", exact=True).fill("A lively Irish jig on fiddle")
        page.get_by_role("button", name="Generate").click()
        download = page.locator("a[download='audio.wav']")
        download.wait_for()
        page.get_by_text("retrieved melody #").wait_for()
        screenshot = tmp_path / "space.png"
        page.screenshot(path=str(screenshot), full_page=True)
        with urllib.request.urlopen(download.get_attribute("href")) as response:
            (tmp_path / "audio.wav").write_bytes(response.read())
    print(f"screenshot: {screenshot}")
    assert len(read_wav(str(tmp_path / "audio.wav"))) > 0
    with Image.open(screenshot) as image:
        assert image.width == 1280 and image.height > 1000


def test_the_steps_slider_follows_the_mode(space_url):
    from playwright.sync_api import expect

    with browser_page() as page:
        page.goto(space_url)
        page.get_by_label("Prompt", exact=True).wait_for()
        page.get_by_role("main").get_by_role("button", name="Settings").click()  # not the footer's Settings dialog
        steps = page.get_by_label("number input for Denoising steps")
        expect(steps).to_have_value(str(DEFAULT_X0_NUM_INFERENCE_STEPS), timeout=0)
        page.get_by_text("Recording (to continue, re-render or repaint)").click()
        page.get_by_label("Re-render a recording").check()
        expect(steps).to_have_value(str(DEFAULT_NUM_INFERENCE_STEPS), timeout=0)
        page.get_by_label("Text to music").check()
        expect(steps).to_have_value(str(DEFAULT_X0_NUM_INFERENCE_STEPS), timeout=0)


def test_the_space_gets_basic_pitch_without_its_tensorflow_requirement(tmp_path):
    import base64
    import hashlib
    import importlib.util
    import zipfile

    spec = importlib.util.spec_from_file_location("build_wheels", os.path.join(ROOT, "space", "build_wheels.py"))
    build_wheels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_wheels)
    source = tmp_path / "basic_pitch-0.4.0-py2.py3-none-any.whl"
    with zipfile.ZipFile(source, "w") as wheel:
        wheel.writestr("basic_pitch/__init__.py", "")
        wheel.writestr(
            "basic_pitch-0.4.0.dist-info/METADATA",
            "Name: basic-pitch\nVersion: 0.4.0\nRequires-Dist: tensorflow<2.15.1\nRequires-Dist: resampy<0.4.3\n",
        )
        wheel.writestr("basic_pitch-0.4.0.dist-info/RECORD", "")
    (tmp_path / "out").mkdir()
    built = build_wheels.without_requirements(str(source), str(tmp_path / "out"))
    assert os.path.basename(built) == "basic_pitch-0.4.0+nodeps-py2.py3-none-any.whl"
    with zipfile.ZipFile(built) as wheel:
        assert (
            wheel.read("basic_pitch-0.4.0+nodeps.dist-info/METADATA").decode()
            == "Name: basic-pitch\nVersion: 0.4.0+nodeps\n"
        )
        for line in wheel.read("basic_pitch-0.4.0+nodeps.dist-info/RECORD").decode().split():
            path, digest, size = line.split(",")
            if digest:
                data = wheel.read(path)
                assert (
                    digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                )
                assert int(size) == len(data)
