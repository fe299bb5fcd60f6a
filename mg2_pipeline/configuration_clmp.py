"""CLMP model configuration."""

from transformers import AutoConfig, ClapAudioConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .melody import MAX_MELODY_TOKENS, MELODY_VOCAB, MELODY_VOCAB_SIZE, PAD_TOKEN


class CLMPMelodyConfig(PreTrainedConfig):
    r"""The melody tower: token embedding → masked mean over tokens → MLP.

    Args:
        vocab_size: melody vocabulary size (655, the original MG2 table).
        embedding_dim: token embedding width (1024 in the original).
        hidden_size: output width of the tower's MLP (768 in the original).
        max_length: tokens per melody (1000); longer melodies are cut after the last whole note.
        pad_token_id: id used for padding (masked out of the mean).
    """

    model_type = "clmp_melody_model"
    base_config_key = "melody_config"

    vocab_size: int = MELODY_VOCAB_SIZE
    embedding_dim: int = 1024
    hidden_size: int = 768
    max_length: int = MAX_MELODY_TOKENS
    pad_token_id: int | None = MELODY_VOCAB[PAD_TOKEN]
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02


class CLMPConfig(PreTrainedConfig):
    r"""Configuration of a `CLMPModel`: text, audio (HTS-AT) and melody towers projected to one joint space.

    Args:
        text_config: any transformers text encoder config (BERT, RoBERTa, `ClapTextConfig`, ...).
        audio_config: a `ClapAudioConfig` (HTS-AT), fed the package's 64-bin log-mel.
        melody_config: a `CLMPMelodyConfig`.
        projection_dim: width of the joint embedding space (512).
        projection_hidden_act: activation inside the projection heads.
        logit_scale_init_value: initial temperature inverse (1/0.07); the scale is clamped to <= 100.
        text_pooling: `"mean"` (mean of the last hidden states over the attention mask, as
            sentence-transformers) or `"pooler"` (the encoder's `pooler_output`, as CLAP).
        mel_time_pooling: average-pool the log-mel over this many frames before the audio tower, so
            that a small HTS-AT (`spec_size` 128 reads 256 frames) covers a 10.24 s clip.
        modalities: the towers trained together; `("text", "audio")` is the two-modal CLAP baseline.

    Example:

    ```python
    >>> from mg2_pipeline import CLMPConfig, CLMPModel
    >>> from mg2_pipeline.presets import clmp_config
    >>> model = CLMPModel(clmp_config("tiny"))
    ```
    """

    model_type = "clmp"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "audio_config": ClapAudioConfig,
        "melody_config": CLMPMelodyConfig,
    }

    text_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    melody_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 512
    projection_hidden_act: str = "relu"
    logit_scale_init_value: float = 1 / 0.07
    text_pooling: str = "mean"
    mel_time_pooling: int = 1
    modalities: list[str] | tuple[str, ...] = ("text", "audio", "melody")
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.text_pooling not in ("mean", "pooler"):
            raise ValueError(f"text_pooling must be 'mean' or 'pooler', got {self.text_pooling!r}.")
        if self.mel_time_pooling < 1:
            raise ValueError(f"mel_time_pooling must be >= 1, got {self.mel_time_pooling}.")
        self.modalities = list(self.modalities)
        if len(self.modalities) < 2 or not set(self.modalities) <= {"text", "audio", "melody"}:
            raise ValueError(f"modalities must be two or three of 'text', 'audio', 'melody', got {self.modalities}.")
        self.audio_config.projection_dim = self.projection_dim
        self.audio_config.projection_hidden_act = self.projection_hidden_act


CLMPConfig.register_for_auto_class()
