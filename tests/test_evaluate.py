import json
import os
import sys

import numpy as np
import pytest
import soundfile

from conftest import ROOT, run
from mg2_pipeline import CLMPModel, CLMPProcessor, Melody, MelodyRetriever, MG2Pipeline
from mg2_pipeline.presets import build_pipeline

sys.path.insert(0, os.path.join(ROOT, "training"))
from evaluate import frechet_distance, melody_adherence, tempo_matches  # noqa: E402


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((200, 8))
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(real, real + 1.0) == pytest.approx(8.0, rel=1e-6)  # ‖Δμ‖² with equal covariances
    assert frechet_distance(real, real * 2) > frechet_distance(real, real * 1.1) > 0


def synth_melody(melody: Melody, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    waveform = np.zeros_like(t)
    for pitch, onset, offset in melody.notes:
        waveform += np.where((t >= onset) & (t < offset), np.sin(2 * np.pi * 440 * 2 ** ((pitch - 69) / 12) * t), 0)
    return (0.3 * waveform).astype(np.float32)


def test_melody_adherence_prefers_the_played_melody_and_tempo_is_estimated():
    played = Melody.from_string("C4:0.5 E4:0.5 G4:0.5 C5:0.5 " * 4)
    other = Melody.from_string("F#4:0.5 A#4:0.5 C#5:0.5 D#4:0.5 " * 4)
    audio = synth_melody(played, 8.0)
    assert melody_adherence(audio, played) > melody_adherence(audio, other) + 0.3
    clicks = np.zeros(16000 * 8, np.float32)
    clicks[:: 8000] = 1.0  # 120 BPM
    estimate, strict, octave = tempo_matches(clicks, 120.0)
    assert octave and abs(estimate - 120) < 20 or abs(estimate - 240) < 40


def test_evaluate_writes_results_and_fills_the_model_card(tiny_dataset, tiny_generator_parts, tmp_path):
    parts = dict(build_pipeline("tiny").components, clmp=CLMPModel.from_pretrained(tiny_generator_parts["clmp"]),
                 processor=CLMPProcessor.from_pretrained(tiny_generator_parts["clmp"]),
                 retriever=MelodyRetriever.from_pretrained(tiny_generator_parts["retriever"]))
    MG2Pipeline(**parts).save_pretrained(tmp_path / "mg2")
    MG2Pipeline(**parts, condition="text").save_pretrained(tmp_path / "text")
    output_dir = tmp_path / "eval"
    printed = run([sys.executable, os.path.join(ROOT, "training", "evaluate.py"), "--model", str(tmp_path / "mg2"),
                   "--ablation", str(tmp_path / "text"), "--dataset", tiny_dataset, "--output_dir", str(output_dir),
                   "--num_clips", "4", "--ddim_clips", "2", "--ddim_steps", "3", "--steps", "2", "--seconds", "1.28",
                   "--batch_size", "2", "--save_audio"]).stdout
    results = json.loads((output_dir / "eval_results.json").read_text())["results"]
    assert [r["model"] for r in results] == ["MG2 (DPM-Solver 2)", "text-only ablation (DPM-Solver 2)", "MG2 (DDIM 3, first 2 clips)"]
    for r in results:
        assert np.isfinite(r["fad_clmp"]) and r["fad_clmp"] >= 0 and np.isfinite(r["fad_spectral"])
        assert -1 <= r["clmp_score"] <= 1 and 0 <= r["melody_adherence"] <= 1 and 0 <= r["random_melody_floor"] <= 1
        assert 0 <= r["tempo_within_15pct"] <= r["tempo_within_15pct_or_half_double"] <= 1
    assert "| MG2 (DPM-Solver 2) |" in (output_dir / "eval_results.md").read_text() and "FAD CLMP" in printed
    card = (tmp_path / "mg2" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "pipeline_tag: text-to-audio" in card
    assert "| text-only ablation (DPM-Solver 2) |" in card and "tiny-folk" in card and "- `unet`: UNet2DConditionModel" in card
    audio, rate = soundfile.read(output_dir / "audio" / "mg2" / "000.wav")
    assert rate == 16000 and len(audio) == 20480


def test_generate_samples_writes_wavs_and_spectrograms(tmp_path):
    printed = run([sys.executable, os.path.join(ROOT, "training", "generate_samples.py"), "--model", "preset:tiny",
                   "--output_dir", str(tmp_path), "--seconds", "1.0", "--steps", "2"]).stdout
    wavs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".wav"))
    assert len(wavs) == 6 and all(os.path.isfile(tmp_path / w.replace(".wav", ".png")) for w in wavs)
    assert soundfile.read(tmp_path / wavs[0])[1] == 16000
    assert "your melody" in printed and "retrieved:" in printed
