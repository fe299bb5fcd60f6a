import json
import math
import os

import numpy as np
import pretty_midi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mg2_pipeline.melody import (
    MELODY_VOCAB,
    MELODY_VOCAB_SIZE,
    SKETCH_ATTACK_RANGE_S,
    SKETCH_RELEASE_RANGE_S,
    Melody,
    bin_to_seconds,
    encode_melody_tokens,
    name_to_pitch,
    pitch_to_name,
    seconds_to_bin,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


# ----- vocabulary and bins -----


def test_vocabulary_matches_the_original_table():
    with open(os.path.join(FIXTURES, "melody_vocab.json")) as handle:
        original = json.load(handle)
    assert MELODY_VOCAB_SIZE == 655
    assert MELODY_VOCAB == original
    assert [MELODY_VOCAB[t] for t in ("<s>", "</s>", "<unk>", ",", "|", "<0>", "<100>", "<G9>")] == [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        648,
    ]


def test_bin_formula_is_the_original():
    assert seconds_to_bin(0.0) == 79
    assert seconds_to_bin(-0.3) == 0 and seconds_to_bin(-5.0) == 0
    assert seconds_to_bin(6.0) == 511 and seconds_to_bin(100.0) == 511
    for seconds in np.linspace(-0.3, 6.0, 97):
        expected = round((math.log(seconds + 1) - math.log(0.7)) / (math.log(7) - math.log(0.7)) * 511)
        assert seconds_to_bin(seconds) == expected
    assert bin_to_seconds(79) == 0.0
    assert bin_to_seconds(0) == pytest.approx(-0.3)
    assert bin_to_seconds(511) == pytest.approx(6.0)
    bins = np.arange(512)
    assert np.array_equal(seconds_to_bin(bin_to_seconds(bins)), bins)


def test_pitch_names_use_sharps_and_midi_60_is_c4():
    assert pitch_to_name(60) == "C4" and pitch_to_name(67) == "G4" and pitch_to_name(61) == "C#4"
    assert pitch_to_name(0) == "C-1" and pitch_to_name(127) == "G9"
    assert all(name_to_pitch(pitch_to_name(p)) == p for p in range(128))
    assert name_to_pitch("Db4") == 61 and name_to_pitch("Bb3") == 58
    assert name_to_pitch("Cb4") == 59 and name_to_pitch("B#3") == 60


def test_known_token_string():
    melody = Melody.from_notes([(67, 0.0, 0.5), (69, 0.5, 1.0)])
    assert melody.to_tokens() == "<G4>,<169>,<79>|<A4>,<169>,<79>"
    # A rest of 0.25 s shows as the gap of the next note.
    assert Melody.from_string("G4:0.5 R:0.25 A4:0.5").to_tokens() == "<G4>,<169>,<79>|<A4>,<169>,<129>"


# ----- round trips -----

pitch_tokens = st.integers(0, 127).map(lambda p: f"<{pitch_to_name(p)}>")
triplets = st.tuples(pitch_tokens, st.integers(80, 511), st.integers(0, 511))


@settings(max_examples=300)
@given(st.lists(triplets, min_size=1, max_size=40))
def test_tokens_to_melody_to_tokens_is_identity(notes):
    tokens, previous_onset, previous_offset = [], -1.0, 0.0
    for index, (pitch, duration_bin, gap_bin) in enumerate(notes):
        onset = previous_offset + float(bin_to_seconds(gap_bin))
        # The first gap is 0 s, and a negative gap may overlap the previous note but not start before it.
        if index == 0 or onset <= previous_onset:
            gap_bin, onset = 79, previous_offset
        previous_onset, previous_offset = onset, onset + float(bin_to_seconds(duration_bin))
        tokens.append(f"{pitch},<{duration_bin}>,<{gap_bin}>")
    token_string = "|".join(tokens)
    assert Melody.from_tokens(token_string).to_tokens() == token_string


notes_strategy = st.lists(
    st.tuples(st.integers(21, 108), st.floats(0.01, 5.9), st.floats(0.0, 5.9)), min_size=1, max_size=30
)


@settings(max_examples=200)
@given(notes_strategy)
def test_melody_to_tokens_to_melody_within_bin_quantisation(spec):
    notes, time = [], 0.0
    for pitch, duration, gap in spec:
        onset = time + (gap if notes else 0.0)
        notes.append((pitch, onset, onset + duration))
        time = onset + duration
    melody = Melody.from_notes(notes)
    decoded = Melody.from_tokens(melody.to_tokens())
    assert np.array_equal(decoded.pitches, melody.pitches)
    # Each duration and gap is within half a log bin of the original.
    half_bin = (math.log(7) - math.log(0.7)) / 511 / 2
    for original, restored in (
        (melody.offsets - melody.onsets, decoded.offsets - decoded.onsets),
        (melody.onsets[1:] - melody.offsets[:-1], decoded.onsets[1:] - decoded.offsets[:-1]),
    ):
        assert np.all(np.abs(np.log(original + 1) - np.log(restored + 1)) <= half_bin + 1e-9)


def test_encode_ids_mask_padding_and_truncation():
    melody = Melody.from_string("G4:0.5 A4:0.5 B4:1")
    encoded = melody.encode()
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    assert ids.shape == mask.shape == (1000,)
    # <s> + 3 notes × 5 tokens + 2 separators + </s>
    assert mask.sum() == 1 + 15 + 2 + 1
    assert ids[0] == MELODY_VOCAB["<s>"] and ids[18] == MELODY_VOCAB["</s>"]
    assert [ids[i] for i in (1, 2, 6)] == [MELODY_VOCAB["<G4>"], MELODY_VOCAB[","], MELODY_VOCAB["|"]]
    assert np.all(mask[19:] == 0)
    # Truncation keeps whole notes only: 14 tokens fit <s>, two notes (11) and </s>.
    short = melody.encode(max_length=14)
    assert short["attention_mask"].sum() == 13 and short["input_ids"][12] == MELODY_VOCAB["</s>"]
    long_melody = Melody.from_notes([(60 + i % 12, i * 0.1, i * 0.1 + 0.1) for i in range(400)])
    assert long_melody.encode()["attention_mask"].sum() == 1 + 166 * 6 - 1 + 1


# ----- readers and writers -----


def test_from_string_with_rests_and_flats():
    melody = Melody.from_string("G4:0.5 R:0.5 Bb4:1")
    assert melody.to_list() == [[67, 0.0, 0.5], [70, 1.0, 2.0]]


def test_note_string_round_trips_and_cuts_overlaps():
    text = "R:0.25 G4:0.5 A4:0.5 R:0.125 A#4:1 C5:0.3"
    assert Melody.from_string(text).to_note_string() == text
    assert Melody.from_string(text).to_note_string(max_notes=2) == "R:0.25 G4:0.5 A4:0.5 …"
    assert Melody.from_notes([[60, 0.0, 1.0], [62, 0.5, 1.0]]).to_note_string() == "C4:0.5 D4:0.5"


def test_from_midi_reads_a_polyphonic_file_as_its_skyline(tmp_path):
    midi = pretty_midi.PrettyMIDI()
    melody_track, bass_track, drums = (
        pretty_midi.Instrument(73),
        pretty_midi.Instrument(32),
        pretty_midi.Instrument(0, is_drum=True),
    )
    melody_track.notes = [pretty_midi.Note(100, p, i * 0.5, i * 0.5 + 0.5) for i, p in enumerate([72, 74, 76, 77])]
    bass_track.notes = [pretty_midi.Note(90, 48, 0.0, 2.0)]
    drums.notes = [pretty_midi.Note(90, 90, 0.0, 0.1)]
    midi.instruments += [melody_track, bass_track, drums]
    path = tmp_path / "tune.mid"
    midi.write(str(path))
    melody = Melody.from_midi(path)
    assert melody.pitches.tolist() == [72, 74, 76, 77]
    assert np.allclose(melody.onsets, [0, 0.5, 1.0, 1.5], atol=1e-3)


def test_to_midi_round_trip(tmp_path):
    melody = Melody.from_string("E4:0.25 G4:0.25 R:0.5 C5:1.5")
    melody.to_midi(tmp_path / "out.mid", program=40)
    assert pretty_midi.PrettyMIDI(str(tmp_path / "out.mid")).instruments[0].program == 40
    again = Melody.from_midi(tmp_path / "out.mid")
    assert again.pitches.tolist() == melody.pitches.tolist()
    assert np.allclose(again.notes, melody.notes, atol=2e-3)


def test_from_music21_reads_musicxml_abc_and_streams(tmp_path):
    import music21

    stream = music21.stream.Stream([music21.tempo.MetronomeMark(number=120)])
    for name, quarter_length in [("G4", 1), ("A4", 1), ("B4", 2)]:
        stream.append(music21.note.Note(name, quarterLength=quarter_length))
    melody = Melody.from_music21(stream)
    assert melody.to_list() == [[67, 0.0, 0.5], [69, 0.5, 1.0], [71, 1.0, 2.0]]

    path = tmp_path / "tune.musicxml"
    stream.write("musicxml", fp=str(path))
    assert Melody.from_music21(path).to_list() == melody.to_list()

    abc = "X:1\nT:Test Jig\nM:6/8\nL:1/8\nQ:1/4=90\nK:D\nDFA dfa|\n"
    (tmp_path / "tune.abc").write_text(abc)
    from_abc = Melody.from_music21(tmp_path / "tune.abc", bpm=60)
    assert from_abc.pitches.tolist() == [62, 66, 69, 74, 78, 81]
    assert np.allclose(from_abc.offsets - from_abc.onsets, 0.5)  # eighth notes at 60 quarter-notes per minute


def test_from_music21_takes_the_soprano_of_a_chorale():
    import music21

    chorale = music21.corpus.parse("bach/bwv66.6")
    melody = Melody.from_music21(chorale)
    soprano = [n.pitch.midi for n in chorale.parts[0].stripTies().flatten().notes]
    assert melody.pitches.tolist() == soprano
    assert Melody.from_music21(chorale, part=3).pitches.max() < melody.pitches.max()


def test_piano_roll_transpose_and_slice():
    melody = Melody.from_string("C4:0.5 D4:0.5 E4:1")
    roll = melody.to_piano_roll(frames_per_second=10)
    assert roll.shape == (128, 20)
    assert roll[60, :5].all() and roll[62, 5:10].all() and roll[64, 10:20].all() and roll.sum() == 20
    assert melody.transpose(3).pitches.tolist() == [63, 65, 67]
    window = melody.slice(0.25, 1.5)
    assert window.to_list() == [[60, 0.0, 0.25], [62, 0.25, 0.75], [64, 0.75, 1.25]]


# ----- errors -----


@pytest.mark.parametrize(
    "tokens, message",
    [
        ("<G4>,<169>,<79>|<A4>,<169>", "character 16"),
        ("<G4>,<169>,<79>|<A4>,<600>,<79>", "time bin"),
        ("<G4>,<169>,<79>|<H4>,<169>,<79>", "Unknown pitch name 'H4'"),
        ("<G4>,<169>,<79>|<A#9>,<169>,<79>", "outside the MIDI range"),
        ("<G4>,<20>,<79>", "Negative or zero duration"),
        ("<G4>,<169>,<90>", "first note's gap"),
        ("", "Empty melody"),
        ("G4,169,79", "pitch token"),
    ],
)
def test_malformed_tokens_raise_value_error(tokens, message):
    with pytest.raises(ValueError, match=message):
        Melody.from_tokens(tokens)


def test_bad_notes_strings_and_files_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="Unknown pitch name 'X4'"):
        Melody.from_string("G4:0.5 X4:0.5")
    with pytest.raises(ValueError, match=r"Duration in .G4:-0.5. must be a number of seconds in \(0, 60\]"):
        Melody.from_string("G4:-0.5")
    with pytest.raises(ValueError, match="Negative or zero duration at note 0"):
        Melody.from_notes([(60, 1.0, 0.5)])
    with pytest.raises(ValueError, match="Empty melody"):
        Melody.from_notes([])
    with pytest.raises(ValueError, match="Empty melody"):
        Melody.from_string("R:1")
    with pytest.raises(ValueError, match="not an integer MIDI pitch"):
        Melody.from_notes([(128, 0.0, 1.0)])
    garbage = tmp_path / "broken.mid"
    garbage.write_bytes(b"MThd this is not a midi file")
    with pytest.raises(ValueError, match="Unreadable MIDI file"):
        Melody.from_midi(garbage)
    with pytest.raises(ValueError, match="Unreadable score"):
        Melody.from_music21(tmp_path / "missing.musicxml")
    with pytest.raises(ValueError, match="outside the MIDI range"):
        Melody.from_string("G9:1").transpose(1)
    with pytest.raises(ValueError, match="Malformed melody tokens"):
        encode_melody_tokens("<G4>,<169>,<79>|<Q4>,<169>,<79>")


def test_fit_to_loops_the_whole_melody_and_cuts_it_at_the_length():
    phrase = Melody.from_string("C4:0.5 D4:0.5 R:0.5 E4:0.5")  # 2 s
    fitted = phrase.fit_to(5.0)
    assert fitted.pitches.tolist() == [60, 62, 64] * 2 + [60, 62]
    np.testing.assert_allclose(fitted.onsets, [0, 0.5, 1.5, 2, 2.5, 3.5, 4, 4.5])
    assert fitted.offsets.max() == pytest.approx(5.0)
    cut = phrase.fit_to(1.2)
    assert cut.pitches.tolist() == [60, 62] and cut.offsets.max() == pytest.approx(1.0)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"seconds must be a number in \(0, 600\]"):
            phrase.fit_to(bad)


def test_stretch_rescales_timing_only():
    melody = Melody.from_string("G4:0.5 A4:0.25")
    slower = melody.stretch(2.0)
    assert slower.pitches.tolist() == [67, 69]
    np.testing.assert_allclose(slower.notes[:, 1:], [[0, 1.0], [1.0, 1.5]])
    with pytest.raises(ValueError, match=r"factor must be a number in \(0, "):
        melody.stretch(0)


def test_rendered_tones_sound_the_melody_at_its_pitch_and_time():
    melody = Melody.from_string("R:0.5 A4:1")
    audio = melody.render_tones(32000)
    assert audio.shape == (32000,) and audio.dtype == np.float32
    assert np.abs(audio[:8000]).max() == 0 and np.abs(audio[24000:]).max() == 0
    spectrum = np.abs(np.fft.rfft(audio[8000:24000]))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 Hz per bin for one second


def test_a_random_timbre_keeps_pitch_and_time_and_changes_only_the_sound():
    melody = Melody.from_string("R:0.5 A4:1")
    plain = melody.render_tones(32000)
    sounds = [melody.render_tones(32000, timbre_seed=seed) for seed in range(6)]
    assert np.array_equal(sounds[0], melody.render_tones(32000, timbre_seed=0))  # seeded
    for audio in sounds:
        assert np.abs(audio[:8000]).max() == 0 and np.abs(audio[24000:]).max() == 0 and 0.02 < np.abs(audio).max() < 1
        spectrum = np.abs(np.fft.rfft(audio[8000:24000]))
        assert spectrum[438:443].max() >= 0.4 * spectrum.max()  # the fundamental stays strong: it carries the pitch
        assert np.argmax(spectrum) % 440 <= 2 or np.argmax(spectrum) % 440 >= 438  # every peak a partial of A4
    spectra = [np.abs(np.fft.rfft(audio[8000:24000]))[[440, 880, 1320, 1760]] for audio in [plain] + sounds]
    partials = [spectrum / spectrum[0] for spectrum in spectra]
    assert min(np.abs(a - b).max() for i, a in enumerate(partials) for b in partials[:i]) > 0.05  # every sound its own


def test_the_plain_sketch_starts_and_ends_its_notes_like_a_typical_training_sketch():
    # Generation is guided by the plain sketch; training sees random envelopes. At their sharp end (10 ms fades) the
    # generated audio clicked at every note change, so the plain sketch's must sit in the middle of training's.
    audio = Melody.from_string("R:0.5 A4:1").render_tones(32000).astype(np.float64)
    window = 80  # 5 ms, about two periods of A4
    note = np.sqrt(np.convolve(audio**2, np.ones(window) / window, mode="same"))[8000:24000]
    # From the note's start to 90 % of its level, and from 90 % of its level to its end: 0.9 × attack and release.
    rise_s = np.argmax(note >= 0.9 * note.max()) / 16000
    fall_s = (len(note) - np.nonzero(note >= 0.9 * note.max())[0][-1]) / 16000
    for measured, (low, high) in ((rise_s, SKETCH_ATTACK_RANGE_S), (fall_s, SKETCH_RELEASE_RANGE_S)):
        quartiles = 0.9 * (low + (high - low) * np.array([0.25, 0.75]))  # of the uniform envelopes training draws
        assert quartiles[0] - window / 16000 <= measured <= quartiles[1] + window / 16000


def test_pitch_class_roll_marks_the_sounding_pitch_class_and_height():
    roll = Melody.from_string("C4:0.5 R:0.5 A5:0.5").to_pitch_class_roll(num_frames=20, frames_per_second=10)
    assert roll.shape == (13, 20)
    assert roll[0, :5].tolist() == [1] * 5 and roll[:, 5:10].sum() == 0 and roll[9, 10:15].tolist() == [1] * 5
    assert roll[12, 0] == 0.0 and roll[12, 10] == pytest.approx((81 - 60) / 24) and roll[:, 15:].sum() == 0


def test_legato_fills_short_rests_only():
    melody = Melody.from_notes([(60, 0.0, 0.5), (62, 0.7, 1.0), (64, 2.0, 2.5)])
    held = melody.legato(0.5)
    assert held.to_list() == [[60, 0.0, 0.7], [62, 0.7, 1.0], [64, 2.0, 2.5]]  # the 1 s rest stays
    assert melody.legato(0).to_list() == melody.to_list()
    with pytest.raises(ValueError, match="max_gap_s"):
        melody.legato(float("nan"))
