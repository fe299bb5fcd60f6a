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
from evaluate import (chroma_note_share, chroma_peaks, frechet_distance, mel_accuracy, melody_adherence,  # noqa: E402
                      tempo_matches)


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


def test_adherence_measures_prefer_the_played_melody_and_tempo_is_estimated():
    played = Melody.from_string("C4:0.5 E4:0.5 G4:0.5 C5:0.5 " * 4)
    other = Melody.from_string("F#4:0.5 A#4:0.5 C#5:0.5 D#4:0.5 " * 4)
    audio, other_audio = synth_melody(played, 8.0), synth_melody(other, 8.0)
    assert melody_adherence(audio, played) > melody_adherence(audio, other) + 0.3
    peaks = chroma_peaks(audio)
    assert len(peaks) == 8 * 16000 // 256 + 1 and peaks.min() >= 0 and peaks.max() < 12
    assert chroma_note_share(peaks, played) > 0.9 and chroma_note_share(peaks, other) < 0.1
    assert mel_accuracy(peaks, peaks) == 1.0 and mel_accuracy(peaks, chroma_peaks(other_audio)) < 0.1
    # The 261.2 Hz high-pass: a bass line under the melody does not move the chroma peaks much.
    bass = synth_melody(Melody.from_string("C2:2 G2:2 " * 2), 8.0) * 2
    assert mel_accuracy(chroma_peaks(audio + bass), peaks) > 0.8
    clicks = np.zeros(16000 * 8, np.float32)
    clicks[:: 8000] = 1.0  # 120 BPM
    estimate, strict, octave = tempo_matches(clicks, 120.0)
    assert octave and abs(estimate - 120) < 20 or abs(estimate - 240) < 40


EVALUATE = os.path.join(ROOT, "training", "evaluate.py")


def test_evaluate_writes_the_bounded_table_and_fills_the_model_card(tiny_dataset, tiny_generator_parts, tmp_path):
    trained = dict(clmp=CLMPModel.from_pretrained(tiny_generator_parts["clmp"]),
                   processor=CLMPProcessor.from_pretrained(tiny_generator_parts["clmp"]),
                   retriever=MelodyRetriever.from_pretrained(tiny_generator_parts["retriever"]))
    MG2Pipeline(**{**build_pipeline("tiny").components, **trained}, aligned_melody="sketch").save_pretrained(tmp_path / "mg2")
    pooled_parts = {**build_pipeline("tiny", aligned_melody=None).components, **trained}
    MG2Pipeline(**pooled_parts).save_pretrained(tmp_path / "pooled")
    MG2Pipeline(**pooled_parts, condition="text").save_pretrained(tmp_path / "text")
    output_dir = tmp_path / "eval"
    printed = run([sys.executable, EVALUATE, "--model", str(tmp_path / "mg2"), "--ablation", str(tmp_path / "text"),
                   "--pooled", str(tmp_path / "pooled"),
                   "--dataset", tiny_dataset, "--output_dir", str(output_dir), "--num_clips", "4", "--ddim_clips", "2",
                   "--ddim_steps", "3", "--steps", "2", "--seconds", "1.28", "--batch_size", "2", "--save_audio"]).stdout
    results = json.loads((output_dir / "eval_results.json").read_text())["results"]
    assert [(r["protocol"], r["kind"]) for r in results] == [
        ("codec", "ceiling"), ("codec", "ceiling"), ("codec", "ceiling"), ("codec", "floor"),
        ("given melody", "model"), *[("given melody", "floor")] * 4,
        ("retrieved melody", "model"), *[("retrieved melody", "floor")] * 3, ("retrieved melody", "model")]
    real, vocoded, through_vae, floor = results[:4]
    assert real["mel_acc"] == 1.0 and real["fad_clmp"] >= 0 and real["fad_spectral"] >= 0  # test vs validation clips
    assert 0 < through_vae["mel_l1"] and "fad_clmp" in vocoded and "fad_clmp" not in floor
    for r in results:
        assert r["clips"] == (2 if "DDIM" in r["audio"] else 4)
        assert 0 <= r["mel_acc"] <= 1 and 0 <= r["chroma_vs_notes"] <= 1 and 0 <= r["chroma_cosine"] <= 1
        assert all(np.isfinite(r[key]) and r[key] >= 0 for key in ("fad_clmp", "fad_spectral") if key in r)
    # real audio follows its own melody better than another clip's
    assert real["chroma_vs_notes"] > floor["chroma_vs_notes"] and real["chroma_cosine"] > floor["chroma_cosine"]
    table = (output_dir / "eval_results.md").read_text()
    assert "| codec | log-mel → VAE → vocoder | ceiling |" in table and "Mel acc" in printed
    card = (tmp_path / "mg2" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "pipeline_tag: text-to-audio" in card
    assert "| given melody | caption-only model | floor |" in card and "tiny-folk" in card and "- `unet`: UNet2DConditionModel" in card
    audio, rate = soundfile.read(output_dir / "audio" / "given" / "000.wav")
    assert rate == 16000 and len(audio) == 20480


def test_codec_only_evaluates_any_vae_without_a_pipeline(tiny_dataset, tmp_path):
    from diffusers import AutoencoderKL

    from mg2_pipeline.presets import vae_config

    AutoencoderKL(**vae_config("tiny")).save_pretrained(tmp_path / "vae")
    printed = run([sys.executable, EVALUATE, "--codec_only", "--vae", str(tmp_path / "vae"), "--dataset", tiny_dataset,
                   "--output_dir", str(tmp_path / "codec"), "--num_clips", "3", "--seconds", "2.56"]).stdout
    results = json.loads((tmp_path / "codec" / "eval_results.json").read_text())["results"]
    assert [r["audio"] for r in results] == ["real clip (FAD: test vs validation clips)", "log-mel → vocoder",
                                             "log-mel → VAE → vocoder", "real clip vs another clip's melody / audio"]
    assert "fad_clmp" not in results[0] and results[1]["mel_acc"] > results[2]["mel_acc"]  # an untrained VAE loses the melody
    assert "model card" not in printed


def test_generate_samples_writes_wavs_and_spectrograms(tmp_path):
    printed = run([sys.executable, os.path.join(ROOT, "training", "generate_samples.py"), "--model", "preset:tiny",
                   "--output_dir", str(tmp_path), "--seconds", "1.0", "--steps", "2"]).stdout
    wavs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".wav"))
    assert len(wavs) == 7 and all(os.path.isfile(tmp_path / w.replace(".wav", ".png")) for w in wavs)
    assert soundfile.read(tmp_path / wavs[0])[1] == 16000
    assert "your melody" in printed and "retrieved:" in printed
