"""MG2 Space: describe music, and MG2 plays it along a melody retrieved for your words (or yours).

    python space/app.py                                   # serves checkpoints/mg2-small on http://127.0.0.1:7860
    MG2_MODEL=org/mg2-small python space/app.py           # a Hub repo id, or a folder, or preset:tiny (random, for tests)

Environment: `MG2_MODEL` (default `checkpoints/mg2-small`), `MG2_CONCURRENCY` (generations run at once,
default 1: on CPU one generation already uses every core), `MG2_QUEUE_SIZE` (waiting requests, default 64),
and Gradio's own `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT`.

A visitor's request is bounded before any work: every number must lie in its control's range (checked for API
calls too), uploads are at most `MAX_FILE_SIZE`, and melodies come only from what the visitor uploaded or typed
(the Notes box is read as notes or tokens, never as a path on this server).
"""

from __future__ import annotations

import copy
import glob
import hashlib
import io
import os
import queue
import shutil
import tempfile
import threading
import time

import gradio as gr
import numpy as np
import soundfile
import torch
from gradio.utils import get_upload_folder
from starlette.middleware import Middleware

from mg2_pipeline import Melody, MG2AudioToAudioPipeline, MG2InpaintPipeline, MG2Pipeline, load_audio
from mg2_pipeline.defaults import (
    DEFAULT_MODEL,
    DEFAULT_STRENGTH,
    MAX_SEED,
)
from mg2_pipeline.melody import AUDIO_EXTENSIONS, MAX_MELODY_TEXT_CHARACTERS
from mg2_pipeline.pipeline_mg2 import MAX_PROMPT_CHARACTERS, check_number
from mg2_pipeline.plotting import figure_to_png, plot_piano_roll, plot_spectrogram
from mg2_pipeline.presets import load_pipeline

MODEL = os.environ.get("MG2_MODEL", DEFAULT_MODEL)
CONCURRENCY = int(os.environ.get("MG2_CONCURRENCY", "1"))
QUEUE_SIZE = int(os.environ.get("MG2_QUEUE_SIZE", "64"))
MAX_CANDIDATES = 4
MAX_TOP_K = 10
MAX_STEPS = 100
MAX_FILE_SIZE = "20mb"
MAX_RECORDING_SECONDS = 60
MAX_DURATION_SECONDS = 300  # long pieces are denoised window by window; five minutes take a few minutes on CPU
MODES = ["Text to music", "Continue a recording", "Re-render a recording", "Repaint part of a recording"]
MAX_REQUEST_BYTES = 21 * 2**20  # an upload of MAX_FILE_SIZE and its form fields; API JSON is a few kB
SCORE_FILE_TYPES = [".mid", ".midi", ".xml", ".musicxml", ".mxl", ".abc", ".krn"]
RETRIEVED_COLUMNS = [
    "rank",
    "id",
    "title",
    "type",
    "meter",
    "source",
    "similarity",
    "matches the prompt's",
    "first notes (paste into Notes to edit)",
]
EXAMPLES = [
    ["A lively Irish jig played on fiddle at 120 BPM in D major", ""],
    ["A gentle waltz on accordion with bass and chords at 90 BPM", ""],
    ["A slow chorale on church organ, solemn and calm", ""],
    ["A simple folk song on piano at 100 BPM", "D4:0.3 G4:0.3 G4:0.3 A4:0.3 B4:0.6 A4:0.3 G4:0.3 E4:0.6 D4:0.6"],
]


def load_model(model: str) -> MG2Pipeline:
    if model == DEFAULT_MODEL and not os.path.isdir(model):
        raise SystemExit(
            f"No model at {DEFAULT_MODEL}: run `make demo` first, or set MG2_MODEL to a folder, "
            "a Hub repo id, or preset:tiny."
        )
    return load_pipeline(model)


# Concurrent generations share the CPU cores: each gets its share of threads, so they do not oversubscribe them.
torch.set_num_threads(max(1, (os.cpu_count() or 1) // CONCURRENCY))
# Loaded once. A pipeline keeps per-call state (the scheduler's step counter, the guidance scale), so each
# concurrent generation borrows its own set of task pipelines (one per mode); they share every model and the index.
PIPE = load_model(MODEL)
TASKS = dict(zip(MODES, (MG2Pipeline, MG2InpaintPipeline, MG2AudioToAudioPipeline, MG2InpaintPipeline)))
WORKERS: queue.Queue[dict[str, MG2Pipeline]] = queue.Queue()
for _ in range(CONCURRENCY):
    components = {**PIPE.components, "scheduler": copy.deepcopy(PIPE.scheduler)}
    settings = {
        key: PIPE.config.get(key)
        for key in ("condition", "aligned_melody", "text_attention", "distilled_guidance_scale")
    }
    pipelines = {mode: task(**components, **settings) for mode, task in TASKS.items()}
    for pipeline in pipelines.values():
        pipeline.set_progress_bar_config(desc="denoising")
    WORKERS.put(pipelines)
DEFAULT_STEPS = {mode: pipeline.default_num_inference_steps for mode, pipeline in pipelines.items()}
DEFAULT_GUIDANCE, DEFAULT_MELODY_GUIDANCE = PIPE.default_guidance_scales
# The audio, pictures and MIDI each request returns, as files named by their content. Gradio copies a returned file into
# its cache atomically, but writes arrays and images there in place, so two requests with the same result (same prompt
# and seed) could each be served the other's half-written file.
OUTPUT_DIR = tempfile.mkdtemp(prefix="mg2-space-")
OUTPUT_LOCK = threading.Lock()
CACHE_SECONDS = 3600  # also how long Gradio keeps its copies


class RequestSizeLimit:
    """ASGI middleware: a request declaring a body larger than `max_bytes` gets 413 before it is read, and one that
    streams more than that without declaring it is cut off there."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"text/plain")]})
            return await send(
                {"type": "http.response.body", "body": f"Requests are limited to {self.max_bytes} bytes.".encode()}
            )
        received = 0

        async def bounded_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return {"type": "http.disconnect"} if received > self.max_bytes else message

        return await self.app(scope, bounded_receive, send)


def bounded(control):
    """`control` (a `gr.Slider` or `gr.Number`) refusing any value outside its range, also one sent through the API,
    with its label and range: Gradio's own check fails on text with an error that names nothing. (A subclass
    would make Gradio write a `.pyi` stub beside this file.)"""
    preprocess = control.preprocess

    def checked_preprocess(payload):
        return preprocess(
            checked_field(control.label, payload, control.minimum, control.maximum, control.precision == 0)
        )

    control.preprocess = checked_preprocess
    return control


def one_of(control):
    """`control` (a `gr.Radio`) refusing a value outside its choices with an error naming its label (Gradio's own names
    nothing)."""
    preprocess, choices = control.preprocess, [value for _, value in control.choices]

    def checked_preprocess(payload):
        if payload not in choices:
            raise gr.Error(f"{control.label} must be one of {choices}, got {payload!r}.")
        return preprocess(payload)

    control.preprocess = checked_preprocess
    return control


def checked_field(label: str, value, low: float, high: float, integer: bool):
    try:
        check_number(label, value, low, high)
        if integer and not float(value).is_integer():
            raise ValueError(f"{label} must be a whole number, got {value!r}.")
    except (TypeError, ValueError) as error:
        raise gr.Error(str(error)) from None
    return value


def uploaded(path: str, kind: str, extensions) -> str:
    """The path of a file the visitor uploaded, refused unless it lies in Gradio's upload folder and has an allowed
    extension: the Space never opens another path on the server."""
    folder = os.path.realpath(get_upload_folder())
    if os.path.commonpath([os.path.realpath(path), folder]) != folder:
        raise gr.Error(f"The {kind} was not uploaded to this Space.")
    if not path.lower().endswith(tuple(extensions)):
        raise gr.Error(f"The {kind} must be one of {', '.join(extensions)}, got {os.path.basename(path)!r}.")
    return path


def read_melody(melody_file: str | None, melody_audio: str | None, melody_notes: str | None) -> Melody | None:
    """The user's melody from whichever one input is filled, or None to retrieve one."""
    given = {
        name: value
        for name, value in (
            ("score file", melody_file),
            ("audio", melody_audio),
            ("notes", (melody_notes or "").strip() or None),
        )
        if value
    }
    if len(given) > 1:
        raise gr.Error(f"Give one melody, not several ({' and '.join(given)}); clear the others.")
    if not given:
        return None
    ((kind, value),) = given.items()
    if kind != "notes":
        uploaded(value, f"melody {kind}", SCORE_FILE_TYPES if kind == "score file" else AUDIO_EXTENSIONS)
    try:
        if kind == "audio":  # transcription costs time in proportion: a visitor gets at most a minute of it
            return Melody.from_audio(
                load_audio(value, PIPE.sampling_rate, max_seconds=MAX_RECORDING_SECONDS), PIPE.sampling_rate
            )
        return Melody.from_text(value) if kind == "notes" else Melody.load(value, sample_rate=PIPE.sampling_rate)
    except (ValueError, TypeError, OSError) as error:
        message = (
            str(error) if kind == "notes" else str(error).replace(value, os.path.basename(value))
        )  # no server paths
        raise gr.Error(f"Could not read your melody ({kind}): {message}") from None


def read_recording(path: str | None, mode: str) -> np.ndarray:
    """The visitor's uploaded or recorded audio for `mode` (at most `MAX_RECORDING_SECONDS`), as samples: the pipeline
    is never handed a path."""
    if not path:
        raise gr.Error(f"Mode {mode!r} needs a recording: upload or record one under Recording.")
    uploaded(path, "recording", AUDIO_EXTENSIONS)
    try:
        return load_audio(path, PIPE.sampling_rate, max_seconds=MAX_RECORDING_SECONDS)
    except ValueError as error:
        raise gr.Error(f"Could not read your recording: {str(error).replace(path, os.path.basename(path))}") from None


def retrieved_table(prompt: str, top_k: int) -> list[list]:
    """The melodies the pipeline would retrieve for `prompt`, best first (matching the facts the prompt names)."""
    if PIPE.retriever is None or len(PIPE.retriever) == 0:
        return []
    hits = PIPE.retriever.search_matching(
        PIPE.encode_text([prompt], PIPE.device), [prompt], k=min(top_k, len(PIPE.retriever))
    )
    return [
        [
            rank,
            hit.id,
            hit.metadata.get("title", ""),
            hit.metadata.get("tune_type", ""),
            hit.metadata.get("meter", ""),
            hit.metadata.get("source", ""),
            round(hit.score, 3),
            ", ".join(hit.metadata["matched_facts"].values()),
            hit.melody.to_note_string(max_notes=8),
        ]
        for rank, hit in enumerate(hits.melodies[0], start=1)
    ]


def check_prompt(prompt: str | None) -> str:
    if not prompt or not prompt.strip():
        raise gr.Error("The prompt is empty: describe the music to generate.")
    try:
        return PIPE.check_prompt(prompt.strip())[0]
    except (TypeError, ValueError) as error:
        raise gr.Error(str(error)) from None


def describe_melody(guide) -> str:
    start, end = guide.metadata["audio_span_s"]
    repeats = f", {guide.metadata['repeats']}× through" if guide.metadata["repeats"] > 1 else ""
    shape = (
        f"{len(guide.melody)} notes, {guide.melody.duration:.1f} s · plays {start:.1f}–{end:.1f} s{repeats} in "
        f"{len(guide.metadata['windows'])} window(s)"
    )
    if guide.id is None:
        return f"**{'Your melody' if guide.metadata['source'] == 'user' else 'Melody transcribed from your recording'}** · {shape}"
    details = [
        f"**{guide.metadata.get('title') or 'Untitled'}**",
        f"retrieved melody #{guide.id}",
        f"source: {guide.metadata.get('source', 'unknown')}",
        f"similarity {guide.score:.3f}",
        shape,
    ]
    details += [
        f"{key.replace('_', ' ')}: {guide.metadata[key]}"
        for key in ("tune_type", "meter", "key", "tempo_bpm")
        if guide.metadata.get(key)
    ]
    if guide.metadata.get("matched_facts"):
        details.append("matches the prompt's " + ", ".join(guide.metadata["matched_facts"].values()))
    return " · ".join(details)


def write_output(data: bytes, name: str) -> str:
    """`data` as `OUTPUT_DIR/<its hash>/name`: requests with the same result share one file, written whole before any
    of them sees it. Files not handed out for longer than Gradio keeps its cache are removed."""
    folder = os.path.join(OUTPUT_DIR, hashlib.sha1(data).hexdigest()[:16])
    path = os.path.join(folder, name)
    with OUTPUT_LOCK:  # a file handed out again is never the one being removed
        os.makedirs(folder, exist_ok=True)
        if not os.path.exists(path):
            descriptor, staging_path = tempfile.mkstemp(dir=folder, prefix=".staging-")
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
            os.replace(staging_path, path)
        os.utime(folder)  # handed out now: kept for another CACHE_SECONDS
        for old_folder in glob.glob(os.path.join(OUTPUT_DIR, "*")):
            if old_folder != folder and time.time() - os.path.getmtime(old_folder) > CACHE_SECONDS:
                shutil.rmtree(old_folder, ignore_errors=True)
    return path


def write_audio(waveform: np.ndarray, sampling_rate: int) -> str:
    buffer = io.BytesIO()
    soundfile.write(buffer, waveform, sampling_rate, format="WAV", subtype="PCM_16")
    return write_output(buffer.getvalue(), "audio.wav")


def write_midi(melody: Melody) -> str:
    buffer = io.BytesIO()
    melody.to_pretty_midi().write(buffer)
    return write_output(buffer.getvalue(), "melody.mid")


def default_steps(mode: str) -> int:
    """The Denoising steps slider follows the mode: each task pipeline's own default for this model."""
    return DEFAULT_STEPS[mode]


def retrieve(prompt: str, top_k: float):
    """The melodies the index returns for a prompt, best first."""
    return retrieved_table(check_prompt(prompt), int(top_k))


def generate(
    prompt: str,
    negative_prompt: str,
    melody_file: str | None,
    melody_audio: str | None,
    melody_notes: str,
    duration: float,
    steps: float,
    guidance: float,
    melody_guidance: float,
    seed: float,
    candidates: float,
    top_k: float,
    mode: str = MODES[0],
    recording: str | None = None,
    strength: float = DEFAULT_STRENGTH,
    repaint_start: float = 0.0,
    repaint_end: float = 0.0,
    whole_melody: bool = False,
    progress=gr.Progress(track_tqdm=True),
):
    """Music for a prompt, guided by the best retrieved melody or by yours; the best of `candidates` by CLMP score.
    With a recording: continue it to `duration`, re-render it (`strength`) or repaint a span of it."""
    prompt = check_prompt(prompt)
    melody = read_melody(melody_file, melody_audio, melody_notes)
    audio = read_recording(recording, mode) if mode != MODES[0] else None
    length = None if mode in (MODES[2], MODES[3]) or (mode == MODES[0] and whole_melody) else float(duration)
    if mode == MODES[1] and PIPE.mel_frames(length) <= PIPE.mel_frames(len(audio) / PIPE.sampling_rate):
        raise gr.Error(
            f"Mode {mode!r} needs a Duration longer than the recording ({len(audio) / PIPE.sampling_rate:.2f} s), "
            f"got {length:g} s."
        )
    candidates = int(candidates)
    common = {
        "negative_prompt": (negative_prompt or "").strip() or None,
        "melody": melody,
        "num_inference_steps": int(steps),
        "guidance_scale": float(guidance),
        "melody_guidance_scale": float(melody_guidance),
        "num_waveforms_per_prompt": candidates,
        "generator": torch.Generator().manual_seed(int(seed)),
    }
    retrieval = {"retrieval_top_k": min(candidates, len(PIPE.retriever)) if PIPE.retriever is not None else 1}
    pipelines = WORKERS.get()  # this request's own pipeline for each mode
    try:
        pipe = pipelines[mode]
        if mode == MODES[0]:
            output = pipe(prompt, audio_length_in_s=length, **retrieval, **common)
        elif mode == MODES[1]:
            output = pipe(prompt, audio=audio, repaint_end_s=length, **retrieval, **common)
        elif mode == MODES[2]:
            output = pipe(prompt, audio=audio, strength=float(strength), **common)
        else:
            output = pipe(
                prompt, audio=audio, repaint_start_s=float(repaint_start), repaint_end_s=float(repaint_end), **common
            )
        table = retrieved_table(prompt, int(top_k))
    except (ValueError, TypeError) as error:
        raise gr.Error(str(error)) from None
    finally:
        WORKERS.put(pipelines)
    waveform, guide = output.audios[0], output.melodies[0]
    audio_path = write_audio(waveform, output.sampling_rate)  # within ±1: the pipeline scales a louder one down
    if guide is None:  # a text-only model has no melody
        spectrogram = plot_spectrogram(waveform, output.sampling_rate, title=prompt[:90])
        return (
            audio_path,
            write_output(figure_to_png(spectrogram), "spectrogram.png"),
            "Text-only model: no guiding melody.",
            None,
            None,
            table,
        )
    # As played: a continuation's melody starts where the recording ends; a short melody is repeated to fill the length.
    spectrogram = plot_spectrogram(waveform, output.sampling_rate, guide.as_played(), title=prompt[:90])
    piano_roll = plot_piano_roll(guide.melody, title=guide.metadata.get("title") or "your melody")
    return (
        audio_path,
        write_output(figure_to_png(spectrogram), "spectrogram.png"),
        describe_melody(guide),
        write_output(figure_to_png(piano_roll), "piano-roll.png"),
        write_midi(guide.melody),
        table,
    )


def build_demo() -> gr.Blocks:
    min_seconds = PIPE.frames_multiple * PIPE.hop_length / PIPE.sampling_rate
    with gr.Blocks(title="MG2: melody-guided music generation", delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as demo:
        gr.Markdown(
            "# MG2: melody-guided text-to-music\nDescribe the music. MG2 finds the melody in its index that "
            "best fits your words (or takes yours) and generates audio that follows it. "
            f"Model: `{MODEL}`, {len(PIPE.retriever) if PIPE.retriever is not None else 0} melodies indexed."
        )
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(
                    label="Prompt",
                    placeholder="A lively Irish jig on fiddle at 120 BPM",
                    lines=2,
                    max_length=MAX_PROMPT_CHARACTERS,
                )
                negative_prompt = gr.Textbox(
                    label="Negative prompt", placeholder="noisy, distorted", max_length=MAX_PROMPT_CHARACTERS
                )
                with gr.Accordion("Your melody (optional: otherwise one is retrieved)", open=False):
                    with gr.Tab("Notes"):
                        melody_notes = gr.Textbox(
                            label="Notes",
                            placeholder="G4:0.5 A4:0.5 B4:1 R:0.5 D5:1",
                            max_length=MAX_MELODY_TEXT_CHARACTERS,
                        )
                    with gr.Tab("Score file"):
                        melody_file = gr.File(
                            label="MIDI, MusicXML, ABC or Humdrum", file_types=SCORE_FILE_TYPES, type="filepath"
                        )
                    with gr.Tab("Audio"):
                        # format=None: the file is read as uploaded (the browser sends recordings as WAV), no ffmpeg.
                        melody_audio = gr.Audio(
                            label="Hum, sing or play it (transcribed)",
                            sources=["upload", "microphone"],
                            type="filepath",
                            format=None,
                        )
                with gr.Accordion("Recording (to continue, re-render or repaint)", open=False):
                    mode = one_of(gr.Radio(MODES, value=MODES[0], label="Mode"))
                    # format=None: the file is read as uploaded (the browser sends recordings as WAV), no ffmpeg.
                    recording = gr.Audio(
                        label=f"Recording (at most {MAX_RECORDING_SECONDS} s)",
                        sources=["upload", "microphone"],
                        type="filepath",
                        format=None,
                    )
                    strength = bounded(
                        gr.Slider(
                            0.05,
                            1,
                            value=DEFAULT_STRENGTH,
                            step=0.05,
                            label="Strength (re-render: 0 keeps the recording, 1 generates anew)",
                        )
                    )
                    with gr.Row():
                        repaint_start = bounded(
                            gr.Number(0.0, minimum=0, maximum=MAX_RECORDING_SECONDS, label="Repaint from (s)")
                        )
                        repaint_end = bounded(
                            gr.Number(0.0, minimum=0, maximum=MAX_RECORDING_SECONDS, label="Repaint to (s)")
                        )
                with gr.Accordion("Settings", open=False):
                    duration = bounded(
                        gr.Slider(
                            min_seconds,
                            MAX_DURATION_SECONDS,
                            step=min_seconds,
                            value=PIPE.default_audio_length_in_s,
                            label="Duration (seconds; a continuation's total length)",
                        )
                    )
                    whole_melody = gr.Checkbox(
                        False, label="Play the whole melody once (its own length, not Duration)"
                    )
                    steps = bounded(
                        gr.Slider(
                            1,
                            MAX_STEPS,
                            value=DEFAULT_STEPS[MODES[0]],
                            step=1,
                            precision=0,
                            label="Denoising steps",
                        )
                    )
                    guidance = bounded(gr.Slider(0, 10, value=DEFAULT_GUIDANCE, step=0.1, label="Text guidance scale"))
                    melody_guidance = bounded(
                        gr.Slider(
                            0,
                            10,
                            value=DEFAULT_MELODY_GUIDANCE,
                            step=0.1,
                            label="Melody strength (0 ignores the melody; higher follows it more tightly)",
                        )
                    )
                    seed = bounded(gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed"))
                    candidates = bounded(
                        gr.Slider(
                            1,
                            MAX_CANDIDATES,
                            value=1,
                            step=1,
                            precision=0,
                            label="Candidates (generated, best kept by CLMP text–audio score)",
                        )
                    )
                    top_k = bounded(
                        gr.Slider(1, MAX_TOP_K, value=5, step=1, precision=0, label="Retrieved melodies to list")
                    )
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary")
                    retrieve_button = gr.Button("Find melodies only")
            with gr.Column():
                audio = gr.Audio(label="Music", type="filepath", interactive=False)
                spectrogram = gr.Image(label="Mel spectrogram and guiding melody", type="filepath", interactive=False)
                melody_info = gr.Markdown(label="Guiding melody")
                piano_roll = gr.Image(label="Guiding melody (piano roll)", type="filepath", interactive=False)
                midi = gr.File(label="Guiding melody (MIDI)", interactive=False)
        retrieved = gr.Dataframe(
            headers=RETRIEVED_COLUMNS, label="Top retrieved melodies for the prompt", interactive=False
        )
        gr.Examples(EXAMPLES, inputs=[prompt, melody_notes])

        generate_button.click(
            generate,
            [
                prompt,
                negative_prompt,
                melody_file,
                melody_audio,
                melody_notes,
                duration,
                steps,
                guidance,
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
            ],
            [audio, spectrogram, melody_info, piano_roll, midi, retrieved],
            api_name="generate",
            concurrency_limit=CONCURRENCY,
        )
        retrieve_button.click(retrieve, [prompt, top_k], retrieved, api_name="retrieve", concurrency_limit=4)
        mode.change(default_steps, mode, steps, api_visibility="private", queue=False)
    return demo.queue(max_size=QUEUE_SIZE)


demo = build_demo()

if __name__ == "__main__":
    demo.launch(
        max_file_size=MAX_FILE_SIZE,
        app_kwargs={"middleware": [Middleware(RequestSizeLimit, max_bytes=MAX_REQUEST_BYTES)]},
    )
