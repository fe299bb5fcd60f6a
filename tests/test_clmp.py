import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import BLOCK_MG2_PIPELINE
from torch.nn import functional as F
from transformers import (
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    ClapAudioConfig,
    ClapConfig,
    ClapModel,
    ClapTextConfig,
)

from mg2_pipeline import CLMPConfig, CLMPFeatureExtractor, CLMPModel, CLMPProcessor, Melody
from mg2_pipeline.presets import clmp_config, minilm_path

TEXTS = ["a lively jig on fiddle", "a slow air on flute", "a chorale on organ"]


def tiny_model(seed: int = 0, **kwargs) -> CLMPModel:
    torch.manual_seed(seed)
    return CLMPModel(clmp_config("tiny", **kwargs)).eval()


def tiny_processor() -> CLMPProcessor:
    return CLMPProcessor(
        CLMPFeatureExtractor(max_length_s=4.0), AutoTokenizer.from_pretrained(minilm_path()), max_text_length=16
    )


def tiny_inputs():
    rng = np.random.default_rng(0)
    audio = [
        rng.standard_normal(64000).astype(np.float32) * 0.1,
        rng.standard_normal(30000).astype(np.float32) * 0.1,
        np.sin(np.arange(64000) / 10).astype(np.float32),
    ]
    melodies = [
        Melody.from_string("G4:0.5 A4:0.5 B4:1"),
        Melody.from_string("C5:1 D5:1"),
        "<E4>,<169>,<79>|<F#4>,<169>,<79>",
    ]
    return tiny_processor()(text=TEXTS, audio=audio, melody=melodies, return_tensors="pt")


def test_forward_returns_six_logit_matrices_normalised_embeddings_and_the_infonce_loss():
    model = tiny_model()
    inputs = tiny_inputs()
    assert inputs["input_features"].shape == (3, 400, 64) and inputs["melody_input_ids"].shape == (3, 1000)
    with torch.no_grad():
        out = model(**inputs, return_loss=True)
    for name in ("text", "audio", "melody"):
        embeds = getattr(out, f"{name}_embeds")
        assert embeds.shape == (3, 32)
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(3))
    scale = model.logit_scale.exp()
    torch.testing.assert_close(out.logits_audio_text, scale * out.audio_embeds @ out.text_embeds.t())
    torch.testing.assert_close(out.logits_text_audio, out.logits_audio_text.t())
    targets = torch.arange(3)
    terms = [
        F.cross_entropy(getattr(out, f"logits_{a}_{b}"), targets)
        for a in ("audio", "text", "melody")
        for b in ("audio", "text", "melody")
        if a != b
    ]
    assert len(terms) == 6
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_features_match_forward_and_padding_is_masked():
    model = tiny_model()
    melody = Melody.from_string("G4:0.5 A4:0.5 B4:1")
    short, long = melody.encode(max_length=40), melody.encode(max_length=1000)
    with torch.no_grad():
        a = model.get_melody_features(
            torch.tensor(short["input_ids"])[None], torch.tensor(short["attention_mask"])[None]
        )
        b = model.get_melody_features(
            torch.tensor(long["input_ids"])[None], torch.tensor(long["attention_mask"])[None]
        )
    torch.testing.assert_close(a, b)  # the mean runs over real tokens only


def test_training_step_reduces_the_loss():
    model = tiny_model().train()
    inputs = tiny_inputs()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model(**inputs, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_save_load_round_trip_with_processor(tmp_path):
    model, processor = tiny_model(), tiny_processor()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, CLMPModel) and isinstance(loaded_processor, CLMPProcessor)
    assert loaded_processor.max_text_length == 16 and loaded_processor.feature_extractor.max_length_s == 4.0
    inputs = tiny_inputs()
    reloaded_inputs = loaded_processor(text=TEXTS, audio=[np.ones(16000, np.float32)] * 3, return_tensors="pt")
    assert torch.equal(reloaded_inputs["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).text_embeds, model(**inputs).text_embeds)
        torch.testing.assert_close(loaded(**inputs).melody_embeds, model(**inputs).melody_embeds)


def test_saved_folder_loads_with_remote_code_without_the_package(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    tiny_processor().save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "modeling_clmp.py") and os.path.isfile(tmp_path / "configuration_clmp.py")
    with torch.no_grad():
        tokens = AutoTokenizer.from_pretrained(minilm_path())(
            ["a jig"], padding="max_length", max_length=16, return_tensors="pt"
        )
        expected = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
    np.save(tmp_path / "expected.npy", expected.numpy())
    script = BLOCK_MG2_PIPELINE + textwrap.dedent(f"""
        import numpy as np, torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        inputs = processor(text=["a jig"], melody=["<G4>,<169>,<79>"], return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs)
        assert "mg2_pipeline" not in sys.modules
        assert np.allclose(out.text_embeds.numpy(), np.load({str(tmp_path / "expected.npy")!r}), atol=1e-6)
        print("remote-code", type(model).__module__, out.melody_embeds.shape)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-code transformers_modules" in result.stdout


def test_from_clap_copies_text_and_audio_towers(tmp_path):
    text_config = ClapTextConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=80,
    )
    audio_config = ClapAudioConfig(
        spec_size=64,
        num_mel_bins=64,
        patch_embeds_hidden_size=16,
        depths=[1, 1],
        num_attention_heads=[1, 2],
        window_size=4,
        hidden_size=32,
    )
    torch.manual_seed(0)
    clap = ClapModel(
        ClapConfig(text_config=text_config.to_dict(), audio_config=audio_config.to_dict(), projection_dim=24)
    ).eval()
    clap.save_pretrained(tmp_path / "clap")
    model = CLMPModel.from_clap(tmp_path / "clap", melody_config={"embedding_dim": 16, "hidden_size": 16}).eval()
    assert model.config.projection_dim == 24 and model.config.text_pooling == "pooler"
    ids = torch.randint(5, 1000, (2, 12))
    mel = torch.randn(2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.get_text_features(ids), clap.get_text_features(input_ids=ids).pooler_output)
        torch.testing.assert_close(
            model.get_audio_features(mel), clap.get_audio_features(input_features=mel[:, None]).pooler_output
        )
        assert model.get_melody_features(
            torch.tensor(Melody.from_string("C4:1").encode(50)["input_ids"])[None]
        ).shape == (1, 24)


def test_clap_baseline_has_no_melody_tower():
    model = tiny_model(modalities=("text", "audio"))
    assert not hasattr(model, "melody_model")
    with pytest.raises(ValueError, match="no melody tower"):
        model.get_melody_features(torch.zeros(1, 10, dtype=torch.long))


def test_paper_preset_has_the_original_dimensions():
    with torch.device("meta"):
        model = CLMPModel(clmp_config("paper"))
    assert model.text_model.config.hidden_size == 768
    assert model.melody_model.embeddings.weight.shape == (655, 1024)
    assert model.audio_projection.linear1.in_features == 1024  # HTS-AT base: embed 128 × 2^3
    assert 190e6 < sum(p.numel() for p in model.parameters()) < 210e6


def test_bad_inputs_raise_value_errors_naming_the_argument():
    model, processor = tiny_model(), tiny_processor()
    with pytest.raises(ValueError, match="text must be a non-empty"):
        processor(text=["a jig", "  "])
    with pytest.raises(ValueError, match=r"audio\[0\] is silent"):
        processor(audio=[np.zeros(16000, np.float32)])
    with pytest.raises(ValueError, match="same batch size"):
        processor(text=["a", "b"], melody=["<G4>,<169>,<79>"])
    with pytest.raises(ValueError, match="Malformed melody tokens"):
        processor(melody=["<G4>,<169>"])
    with pytest.raises(ValueError, match="input_features must be a log-mel"):
        model.get_audio_features(torch.zeros(2, 400, 80))
    with pytest.raises(ValueError, match="frames"):
        model.get_audio_features(torch.zeros(2, 4000, 64))
    with pytest.raises(ValueError, match="same batch size"):
        model(input_ids=torch.ones(2, 5, dtype=torch.long), melody_input_ids=torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="melody_attention_mask has a row with no tokens"):
        model.get_melody_features(torch.ones(2, 5, dtype=torch.long), torch.tensor([[1, 1, 0, 0, 0], [0] * 5]))
    with pytest.raises(ValueError, match="at least two modalities"):
        model(input_ids=torch.ones(2, 5, dtype=torch.long), return_loss=True)
    with pytest.raises(ValueError, match="sampling_rate must be 16000"):
        processor(audio=[np.ones(1000, np.float32)], sampling_rate=44100)
    with pytest.raises(ValueError, match="Unknown CLMP preset"):
        clmp_config("huge")
    # A melody over the token limit is cut after the last whole note that fits (documented), not refused.
    long_melody = Melody.from_notes([(60 + i % 12, i * 0.1, i * 0.1 + 0.1) for i in range(400)])
    assert processor(melody=[long_melody])["melody_attention_mask"].sum() == 1 + 166 * 6
    assert CLMPConfig().projection_dim > 0 and CLMPConfig().modalities == ["text", "audio", "melody"]


def test_contrastive_loss_pair_weights():
    from mg2_pipeline.modeling_clmp import contrastive_loss

    generator = torch.Generator().manual_seed(0)
    embeds = {
        name: torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=-1)
        for name in ("audio", "text", "melody")
    }
    scale = torch.tensor(10.0)
    plain, logits = contrastive_loss(embeds, scale)
    assert set(logits) == {"audio_text", "text_audio", "audio_melody", "melody_audio", "text_melody", "melody_text"}
    torch.testing.assert_close(contrastive_loss(embeds, scale, {"text_melody": 1.0})[0], plain)
    pair = {name: torch.nn.functional.cross_entropy(logits[name], torch.arange(4)) for name in logits}
    weighted = (
        pair["audio_text"]
        + pair["text_audio"]
        + pair["audio_melody"]
        + pair["melody_audio"]
        + 3 * (pair["text_melody"] + pair["melody_text"])
    ) / 10
    torch.testing.assert_close(contrastive_loss(embeds, scale, {"text_melody": 3.0})[0], weighted)
    with pytest.raises(ValueError, match="pair_weights` names pairs"):
        contrastive_loss(embeds, scale, {"melody_text": 2.0})
