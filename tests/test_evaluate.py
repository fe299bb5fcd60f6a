import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile
from conftest import ROOT, run

from mg2_pipeline import CLMPModel, CLMPProcessor, Melody, MelodyRetriever, MG2Pipeline
from mg2_pipeline.presets import build_pipeline

sys.path.insert(0, os.path.join(ROOT, "training"))
from evaluate import (
    CODEC_ROW,
    Bench,
    chroma_note_share,
    chroma_peaks,
    frechet_distance,
    mel_accuracy,
    melody_adherence,  # noqa: E402
    melody_led_summary,
    semitone_miss_share,
    tempo_matches,
)
from evaluate import main as evaluate_main  # noqa: E402
from sound_measures import (
    FAMILIES,
    InstrumentPrompts,
    SoundClassifier,
    family_of,
    onset_click_energy,  # noqa: E402
    paired_preference,
)


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
    clicks[::8000] = 1.0  # 120 BPM
    estimate, strict, octave = tempo_matches(clicks, 120.0)
    assert octave and (abs(estimate - 120) < 20 or abs(estimate - 240) < 40)


def tones(melody: Melody, seconds: float, partials, fade_s: float, bass: bool = False) -> np.ndarray:
    """Harmonic tones with `partials` amplitudes and linear fades; a low C under them when `bass`."""
    t = np.arange(int(seconds * 16000)) / 16000
    waveform = np.zeros_like(t)
    for pitch, onset, offset in melody.notes:
        inside = (t >= onset) & (t < offset)
        envelope = np.clip(np.minimum(t - onset, offset - t) / fade_s, 0, 1) * inside
        frequency = 440 * 2 ** ((pitch - 69) / 12)
        waveform += envelope * sum(a * np.sin(2 * np.pi * k * frequency * t) for k, a in enumerate(partials, 1))
    if bass:
        waveform += 0.8 * np.sin(2 * np.pi * 65.4 * t)
    return (0.3 * waveform / np.abs(waveform).max()).astype(np.float32)


def test_mel_acc_is_split_by_whether_the_real_clip_is_led_by_its_melody():
    melody = Melody.from_string("C4:0.5 E4:0.5 G4:0.5 C5:0.5 " * 2)
    plain = synth_melody(melody, 4.0)
    t = np.arange(len(plain)) / 16000
    # Each note with a third harmonic 3 × as strong, as a clarinet's: the chroma peaks are the notes' fifths.
    reedy = sum(
        np.where((t >= onset) & (t < offset), np.sin(2 * np.pi * 440 * 2 ** ((pitch - 69) / 12) * k * t) * weight, 0)
        for pitch, onset, offset in melody.notes
        for k, weight in ((1, 0.1), (3, 0.3))
    ).astype(np.float32)

    def row(waveform):
        encoded = io.BytesIO()
        soundfile.write(encoded, waveform, 16000, format="WAV")
        return {"audio": {"bytes": encoded.getvalue()}, "melody_notes": melody.to_list(), "caption": "a tune"}

    bench = Bench([row(plain), row(reedy)], 4.0, [plain], pipe=None, seed=0)
    assert bench.melody_led.tolist() == [True, False]
    # The plain tune played for both clips: right on the melody-led clip, wrong against the reedy one's peaks.
    result = bench.row("given melody", "MG2", "model", [plain, plain], [melody] * 2, fad=False)
    assert result["mel_acc_melody_led"] == 1.0
    assert result["mel_acc_not_melody_led"] == mel_accuracy(chroma_peaks(plain), chroma_peaks(reedy)) < 0.2
    codec = bench.row("codec", CODEC_ROW, "ceiling", [plain, reedy], [melody] * 2, fad=False)
    summary = melody_led_summary(bench, [codec, result])
    assert "melody-led clips (1 of 2" in summary and "1.000 and 1.000 (1.00 × the codec)" in summary
    assert f"1.000 and {result['mel_acc_not_melody_led']:.3f} (" in summary
    assert "in 0.000 and 0.000 of them" in summary  # neither reads a semitone off where the real peak is the note
    # MG2 drawing the first clip a semitone sharp: a miss in nearly every frame where the real clip's peak is the note.
    sharp = synth_melody(Melody(melody.notes + np.array([1.0, 0.0, 0.0])), 4.0)
    off = bench.row("given melody", "MG2", "model", [sharp, plain], [melody] * 2, fad=False)
    assert off["semitone_miss_share"] > 0.9
    assert f"in 0.000 and {off['semitone_miss_share']:.3f} of them" in melody_led_summary(bench, [codec, off])
    bench.melody_led[:] = False
    summary = melody_led_summary(bench, [codec, result])
    assert summary.startswith("None of the 2 clips are melody-led. Of the frames") and "0.000 and 0.000" in summary


def test_semitone_miss_share_counts_only_frames_where_the_real_peak_is_the_melody_note():
    frames_per_second = 16000 / 256
    melody = Melody(np.array([[60, 0.0, 1.0], [64, 2.0, 3.0]]))  # C, a rest, then E
    e_starts = int(2 * frames_per_second)
    real = np.zeros(int(3 * frames_per_second) + 1, dtype=int)
    real[e_starts:] = 11  # during E the real clip's peak is B (its third harmonic), so those frames do not count
    generated = (real + 1) % 12  # one chroma bin from the real peak everywhere, the rest included
    generated[e_starts:] = 5  # during E: F, a semitone from the melody's note but not from the real peak
    assert semitone_miss_share([generated], [real], [melody]) == 1.0  # only the C frames count
    half_c = int(frames_per_second / 2)
    generated[:half_c] = 0  # the first half of the C drawn right
    assert semitone_miss_share([generated], [real], [melody]) == pytest.approx(0.5, abs=0.02)
    generated[:half_c] = 2  # a whole tone off is a wrong note, not a semitone miss
    assert semitone_miss_share([generated], [real], [melody]) == pytest.approx(0.5, abs=0.02)
    generated[:half_c] = 11  # B: a semitone below C, across the octave's wrap
    assert semitone_miss_share([generated], [real], [melody]) == 1.0
    # Frames are pooled over clips, not clips averaged: a second clip with twice as many C frames, all drawn right,
    # brings the share to a third.
    long_c, real_c = Melody(np.array([[60, 0.0, 2.0]])), np.zeros_like(real)
    pooled = semitone_miss_share([generated, real_c], [real, real_c], [melody, long_c])
    assert pooled == pytest.approx(1 / 3, abs=0.02)
    assert semitone_miss_share([generated], [np.full_like(real, 11)], [melody]) is None  # no frame qualifies


def test_onset_clicks_grow_with_hard_note_changes():
    melody = Melody.from_string("C5:0.25 D5:0.25 E5:0.25 G5:0.25 " * 4)
    soft = tones(melody, 4.0, [1, 0.5, 0.25], fade_s=0.03)
    hard = tones(melody, 4.0, [1, 0.5, 0.25], fade_s=0.0005)
    clicked = soft.copy()
    for onset in melody.onsets:  # a 2 ms broadband burst at every note change
        start = int(onset * 16000)
        clicked[start : start + 32] += np.random.default_rng(start).uniform(
            -0.2, 0.2, len(clicked[start : start + 32])
        )
    scores = [onset_click_energy(audio, melody.onsets) for audio in (soft, hard, clicked)]
    assert scores[0] < scores[1] < scores[2] and scores[2] > 5 * scores[0]
    assert onset_click_energy(soft, np.array([100.0])) == 0.0  # an onset past the end is not measured


def test_the_sound_classifier_tells_instruments_and_accompaniment_apart():
    from sound_measures import timbre_features

    from mg2_pipeline.audio import encode_flac, load_audio

    rng = np.random.default_rng(0)
    sounds = {73: [1, 0.05], 56: [1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]}  # flute-like and brass-like partials

    def row(program, accompanied):
        notes = " ".join(
            f"{name}{octave}:0.25" for name, octave in zip(rng.choice(list("CDEFGAB"), 12), rng.integers(4, 6, 12))
        )
        audio = tones(Melody.from_string(notes), 3.0, sounds[program], fade_s=0.01, bass=accompanied)
        return {"audio": {"bytes": encode_flac(audio)}, "programs": [program] + [32] * accompanied}

    train = [row(program, bool(i % 2)) for i in range(24) for program in sounds]
    test = [row(program, accompanied) for program in sounds for accompanied in (False, True) for _ in range(3)]
    classifier = SoundClassifier.fit_on_rows(
        iter(train + [{"audio": {"bytes": b"not audio"}, "programs": [73]}]), max_clips=100
    )
    assert classifier.train_clips == 48  # the unreadable row is skipped
    features = np.stack([timbre_features(load_audio(r["audio"]["bytes"])) for r in test])
    families = np.array(FAMILIES)[classifier.family_probabilities(features).argmax(1)]
    assert list(families) == [family_of(r["programs"][0]) for r in test]  # flutes/pipes and brass
    assert list(classifier.accompanied(features)) == [len(r["programs"]) > 1 for r in test]
    with pytest.raises(ValueError, match="several instruments"):
        SoundClassifier.fit_on_rows(iter(train[::2]), max_clips=100)


def test_paired_preference_and_instrument_prompts():
    flute, brass = FAMILIES.index("flutes/pipes"), FAMILIES.index("brass")
    a, b = np.full((2, len(FAMILIES)), 0.05), np.full((2, len(FAMILIES)), 0.05)
    a[:, flute], b[:, brass] = 0.6, 0.6  # each audio sounds like what its prompt asked for
    assert paired_preference(a, b, ["flutes/pipes"] * 2, ["brass"] * 2) == 1.0
    assert paired_preference(b, a, ["flutes/pipes"] * 2, ["brass"] * 2) == 0.0
    assert paired_preference(a, a, ["flutes/pipes"] * 2, ["brass"] * 2) == 0.5  # audio that ignores its prompt

    class Programs:  # two flutes and a trumpet: a family's probability is the sum over its programs
        classes_ = np.array([73, 74, 56])

        def predict_proba(self, features):
            return np.array([[0.3, 0.3, 0.4]])

    classifier = SoundClassifier()
    classifier.instrument = Programs()
    families = classifier.family_probabilities(np.zeros((1, 3)))[0]
    assert (
        families[flute] == pytest.approx(0.6)
        and families[brass] == pytest.approx(0.4)
        and families.sum() == pytest.approx(1)
    )
    prompts = InstrumentPrompts()
    for index in range(40):
        for program in (0, 40, 73, 109):
            other = prompts.other_family_program(index, program)
            assert family_of(other) != family_of(program)
            assert prompts.prompt(index, program) != prompts.prompt(index, other)
    assert prompts.prompt(3, 110) == "Fiddle solo: an old dance tune"
    others = {family_of(prompts.other_family_program(index, 0)) for index in range(7)}
    assert len(others) == len(FAMILIES) - 1  # every other family in turn


EVALUATE = os.path.join(ROOT, "training", "evaluate.py")


def test_evaluate_writes_the_bounded_table_and_fills_the_model_card(tiny_dataset, tiny_generator_parts, tmp_path):
    trained = dict(
        clmp=CLMPModel.from_pretrained(tiny_generator_parts["clmp"]),
        processor=CLMPProcessor.from_pretrained(tiny_generator_parts["clmp"]),
        retriever=MelodyRetriever.from_pretrained(tiny_generator_parts["retriever"]),
    )
    MG2Pipeline(**{**build_pipeline("tiny").components, **trained}, aligned_melody="sketch").save_pretrained(
        tmp_path / "mg2"
    )
    pooled_parts = {**build_pipeline("tiny", aligned_melody=None).components, **trained}
    MG2Pipeline(**pooled_parts).save_pretrained(tmp_path / "pooled")
    MG2Pipeline(**pooled_parts, condition="text").save_pretrained(tmp_path / "text")
    output_dir = tmp_path / "eval"
    printed = run(
        [
            sys.executable,
            EVALUATE,
            "--model",
            str(tmp_path / "mg2"),
            "--ablation",
            str(tmp_path / "text"),
            "--pooled",
            str(tmp_path / "pooled"),
            "--dataset",
            tiny_dataset,
            "--output_dir",
            str(output_dir),
            "--num_clips",
            "4",
            "--ddim_clips",
            "2",
            "--ddim_steps",
            "3",
            "--steps",
            "2",
            "--seconds",
            "1.28",
            "--batch_size",
            "2",
            "--save_audio",
        ]
    ).stdout
    results = json.loads((output_dir / "eval_results.json").read_text())["results"]
    assert [(r["protocol"], r["kind"]) for r in results] == [
        ("codec", "ceiling"),
        ("codec", "ceiling"),
        ("codec", "ceiling"),
        ("codec", "reference"),
        ("codec", "floor"),
        ("given melody", "model"),
        *[("given melody", "floor")] * 4,
        ("retrieved melody", "model"),
        *[("retrieved melody", "floor")] * 3,
        ("retrieved melody", "model"),
    ]
    real, vocoded, through_vae, sketch, floor = results[:5]
    assert real["mel_acc"] == 1.0 and real["fad_clmp"] >= 0 and real["fad_spectral"] >= 0  # test vs validation clips
    assert 0 < through_vae["mel_l1"] and "fad_clmp" in vocoded and "fad_clmp" not in floor
    assert "sketch" in sketch["audio"] and "fad_clmp" not in sketch
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
    assert (
        "| given melody | caption-only model | floor |" in card
        and "tiny-folk" in card
        and "- `unet`: UNet2DConditionModel" in card
    )
    sound = json.loads((output_dir / "eval_results.json").read_text())["sound"]
    assert [r["audio"] for r in sound] == [
        "real clips",
        "real clips through the codec (log-mel → VAE → vocoder)",
        "MG2, given melody, prompt naming the clip's instrument",
        "MG2, given melody, prompt naming another family (scored against that family)",
        "MG2, given melody, prompt naming another family, read as the clip's own family",
        "MG2, retrieved melody, prompt naming the clip's instrument",
        "MG2, given melody, the clip's caption",
        "MG2, given melody, the clip's caption, melody guidance 0",
        "caption-only model, the clip's caption",
        "pooled-only model, given melody, the clip's caption",
        "chance (the most common family / program of these clips)",
    ]
    for r in sound:
        assert all(
            0 <= r[key] <= 1 for key in ("family_accuracy", "program_accuracy", "paired_preference") if key in r
        )
        assert r.get("onset_clicks", 0) >= 0
    assert sound[1]["onset_clicks"] > 0
    assert (
        1 / 8 <= sound[-1]["family_accuracy"] <= 1 and "onset_clicks" not in sound[7]
    )  # melody guidance 0: no onsets
    assert "| real clips | ceiling |" in table and "paired preference" in table
    audio, rate = soundfile.read(output_dir / "audio" / "given" / "000.wav")
    assert rate == 16000 and len(audio) == 20480

    # A guidance-distilled comparison model defaults to other scales than --model's: refused unless they are given.
    MG2Pipeline(**pooled_parts, distilled_guidance_scale=3.0).save_pretrained(tmp_path / "pooled-distilled")
    argv = ["--model", str(tmp_path / "mg2"), "--pooled", str(tmp_path / "pooled-distilled"), "--output_dir", "-"]
    with pytest.raises(SystemExit, match="--pooled .* default to different guidance"):
        evaluate_main(argv)


def test_codec_only_evaluates_any_vae_without_a_pipeline(tiny_dataset, tmp_path):
    from mg2_pipeline import MelAutoencoderKL
    from mg2_pipeline.presets import vae_config

    # a folded latent: evaluate must load the VAE's own class and its ×4 scale
    MelAutoencoderKL(**{**vae_config("tiny"), "latent_channels": 16, "latent_fold": 2}).save_pretrained(
        tmp_path / "vae"
    )
    codec_run = run(
        [
            sys.executable,
            EVALUATE,
            "--codec_only",
            "--vae",
            str(tmp_path / "vae"),
            "--dataset",
            tiny_dataset,
            "--output_dir",
            str(tmp_path / "codec"),
            "--num_clips",
            "3",
            "--seconds",
            "2.56",
        ]
    )
    printed = codec_run.stdout
    # the codec rows' long stage shows its progress, clip by clip
    assert re.search(r"codec: vocoder and VAE \+ vocoder: 100%\S* 3/3", codec_run.stderr)
    results = json.loads((tmp_path / "codec" / "eval_results.json").read_text())["results"]
    assert [r["audio"] for r in results] == [
        "real clip (FAD: test vs validation clips)",
        "log-mel → vocoder",
        "log-mel → VAE → vocoder",
        "melody sketch (as MG2 is given it) → VAE → vocoder",
        "real clip vs another clip's melody / audio",
    ]
    assert (
        "fad_clmp" not in results[0] and results[1]["mel_acc"] > results[2]["mel_acc"]
    )  # an untrained VAE loses the melody
    assert "model card" not in printed
    # 2.54 s is 254 mel frames: a multiple of the unfolded ×2, not of the folded ×4
    result = subprocess.run(
        [sys.executable, EVALUATE, "--codec_only", "--vae", str(tmp_path / "vae"), "--dataset", tiny_dataset]
        + ["--output_dir", str(tmp_path / "short"), "--num_clips", "3", "--seconds", "2.54"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode != 0 and "gives 254 mel frames; the VAE needs a multiple of 4" in result.stderr


def test_generate_samples_writes_wavs_and_spectrograms(tmp_path):
    printed = run(
        [
            sys.executable,
            os.path.join(ROOT, "training", "generate_samples.py"),
            "--model",
            "preset:tiny",
            "--output_dir",
            str(tmp_path),
            "--seconds",
            "1.0",
            "--steps",
            "2",
        ]
    ).stdout
    wavs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".wav") and p[0].isdigit())
    assert len(wavs) == 7 and all(os.path.isfile(tmp_path / w.replace(".wav", ".png")) for w in wavs)
    # One melody and seed, two instruments: two different clips, drawn one above the other.
    piano, trumpet = (soundfile.read(tmp_path / f"same-tune-{name}.wav")[0] for name in ("piano", "trumpet"))
    assert len(piano) == len(trumpet) == 16000 and not np.allclose(piano, trumpet)
    assert os.path.getsize(tmp_path / "same-tune.png") > 0 and "solo piano / A slow tune on solo trumpet" in printed
    assert soundfile.read(tmp_path / wavs[0])[1] == 16000
    assert "your melody" in printed and "retrieved:" in printed
