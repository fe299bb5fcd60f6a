"""Pictures of generated music: the log-mel spectrogram of a clip and the piano roll of its melody.

Figures are built with matplotlib's object API (no pyplot state), so a server may draw from many threads, and with
fixed margins (a tight layout would double the drawing time).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .audio import LogMelSpectrogram
from .melody import Melody

PIANO_ROLL_FPS = 100


def _draw_piano_roll(axes, melody: Melody, duration: float | None) -> None:
    roll = melody.to_piano_roll(frames_per_second=PIANO_ROLL_FPS)
    low, high = int(melody.pitches.min()) - 2, int(melody.pitches.max()) + 3
    axes.imshow(
        roll[low:high],
        origin="lower",
        aspect="auto",
        cmap="Greys",
        extent=(0, roll.shape[1] / PIANO_ROLL_FPS, low - 0.5, high - 0.5),
        interpolation="nearest",
    )
    axes.set(xlim=(0, duration or melody.duration), ylabel="MIDI pitch")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))


def plot_spectrogram(waveform, sampling_rate: int, melody: Melody | None = None, title: str | None = None) -> Figure:
    """Log-mel spectrogram of a mono waveform; with `melody`, its piano roll below on the same time axis."""
    return plot_spectrograms([waveform], sampling_rate, [title], melody)


def plot_spectrograms(waveforms, sampling_rate: int, titles: list[str | None], melody: Melody | None = None) -> Figure:
    """Log-mel spectrograms of mono waveforms one above the other (to compare them), on one time axis; with `melody`,
    its piano roll at the bottom."""
    if len(titles) != len(waveforms):
        raise ValueError(
            f"titles has {len(titles)} entries for {len(waveforms)} waveforms; pass one title (or None) each."
        )
    rows = len(waveforms) + (melody is not None)
    figure = Figure(figsize=(10, 2.6 * rows))
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.2 / rows, top=1 - 0.12 / rows, hspace=0.45)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1, squeeze=False)[:, 0]
    duration = None
    for spectrogram_axes, waveform, title in zip(axes, waveforms, titles):
        waveform = np.asarray(waveform, dtype=np.float32)
        log_mel = LogMelSpectrogram(sample_rate=sampling_rate)(torch.from_numpy(waveform)).numpy()
        duration = len(waveform) / sampling_rate
        spectrogram_axes.imshow(
            log_mel.T,
            origin="lower",
            aspect="auto",
            cmap="magma",
            extent=(0, duration, 0, log_mel.shape[1]),
            interpolation="nearest",
        )
        spectrogram_axes.set(title=title, ylabel="mel bin")
    if melody is not None:
        _draw_piano_roll(axes[-1], melody, duration)
        axes[-1].set_title("guiding melody")
    figure.axes[-1].set_xlabel("seconds")
    return figure


def plot_piano_roll(melody: Melody, title: str | None = None) -> Figure:
    """Piano roll of a melody (pitch against seconds)."""
    figure = Figure(figsize=(10, 2.4))
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.2, top=0.88)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    _draw_piano_roll(axes, melody, None)
    axes.set(title=title, xlabel="seconds")
    return figure


def figure_to_png(figure: Figure, path: str | None = None, dpi: int = 80) -> bytes:
    """Render a figure as PNG bytes (also written to `path` when given)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    if path is not None:
        with open(path, "wb") as handle:
            handle.write(buffer.getvalue())
    return buffer.getvalue()
