"""CLMP: Contrastive Language-Music Pretraining over text, audio and melody (MG2, arXiv 2409.20196)."""

import math
import os
from dataclasses import dataclass
from itertools import combinations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, ClapAudioModel, ClapModel, ClapTextConfig, ClapTextModel, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

# Imported directly (not only through configuration_clmp and melody): diffusers' remote-code loader copies only
# the modules a file imports itself.
from .audio import SAMPLE_RATE  # noqa: F401
from .configuration_clmp import CLMPConfig, CLMPMelodyConfig
from .melody import MELODY_VOCAB_SIZE  # noqa: F401

MAX_LOGIT_SCALE = 100.0


@dataclass
class CLMPOutput(ModelOutput):
    """Output of `CLMPModel.forward`.

    `logits_{a}_{b}[i, j]` is the scaled similarity of item i of modality a to item j of modality b
    (`logits_{b}_{a}` is its transpose); `loss` is the mean InfoNCE over every ordered pair.
    """

    loss: torch.FloatTensor | None = None
    logits_audio_text: torch.FloatTensor | None = None
    logits_text_audio: torch.FloatTensor | None = None
    logits_audio_melody: torch.FloatTensor | None = None
    logits_melody_audio: torch.FloatTensor | None = None
    logits_text_melody: torch.FloatTensor | None = None
    logits_melody_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    melody_embeds: torch.FloatTensor | None = None


def contrastive_loss(
    embeds: dict[str, torch.Tensor], logit_scale: torch.Tensor, pair_weights: dict[str, float] | None = None
) -> tuple[torch.Tensor, dict]:
    """Weighted mean InfoNCE over every ordered pair of the given modalities (six terms for three).

    `embeds` maps modality → L2-normalised `(batch, dim)` embeddings, row i of each being one clip.
    `pair_weights` maps a pair such as `"text_melody"` to its weight (default 1 for every pair).
    Returns the loss and `{"a_b": logits}` for every ordered pair.
    """
    names = [name for name in ("audio", "text", "melody") if name in embeds]
    pair_weights = pair_weights or {}
    unknown = set(pair_weights) - {f"{first}_{second}" for first, second in combinations(names, 2)}
    if unknown:
        raise ValueError(f"`pair_weights` names pairs {sorted(unknown)} that are not among {names} in that order")
    batch_size = embeds[names[0]].shape[0]
    targets = torch.arange(batch_size, device=embeds[names[0]].device)
    logits, total, total_weight = {}, 0.0, 0.0
    for first, second in combinations(names, 2):
        similarity = logit_scale * embeds[first] @ embeds[second].t()
        logits[f"{first}_{second}"], logits[f"{second}_{first}"] = similarity, similarity.t()
        weight = pair_weights.get(f"{first}_{second}", 1.0)
        total = total + weight * (F.cross_entropy(similarity, targets) + F.cross_entropy(similarity.t(), targets))
        total_weight += 2 * weight
    return total / total_weight, logits


class CLMPProjection(nn.Module):
    """Linear → activation → Linear into the joint space (parameter names as CLAP's projection)."""

    def __init__(self, input_dim: int, projection_dim: int, activation: str):
        super().__init__()
        self.linear1 = nn.Linear(input_dim, projection_dim)
        self.activation = ACT2FN[activation]
        self.linear2 = nn.Linear(projection_dim, projection_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.activation(self.linear1(hidden_states)))


class CLMPPreTrainedModel(PreTrainedModel):
    config: CLMPConfig
    base_model_prefix = "clmp"
    input_modalities = ("text", "audio")
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)  # normal(0, initializer_range) linears and embeddings, unit norms
        if isinstance(module, CLMPModel):
            module.logit_scale.fill_(math.log(self.config.logit_scale_init_value))


class CLMPMelodyModel(CLMPPreTrainedModel):
    """The melody tower: Embedding(655, 1024) → mean over real tokens → Linear, LayerNorm, Linear, GELU,
    Linear, GELU, as in the MG2 paper. Padding is masked out of the mean (the original averaged over it)."""

    config: CLMPMelodyConfig
    main_input_name = "melody_input_ids"

    def __init__(self, config: CLMPMelodyConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        self.linear1 = nn.Linear(config.embedding_dim, config.embedding_dim)
        self.layer_norm = nn.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps)
        self.linear2 = nn.Linear(config.embedding_dim, config.hidden_size)
        self.linear3 = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.GELU()
        self.post_init()

    def forward(
        self, melody_input_ids: torch.LongTensor, melody_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`(batch, tokens)` ids → `(batch, hidden_size)` melody states."""
        if melody_attention_mask is None:
            melody_attention_mask = torch.ones_like(melody_input_ids)
        mask = melody_attention_mask.unsqueeze(-1).to(self.embeddings.weight.dtype)
        pooled = (self.embeddings(melody_input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        hidden = self.linear2(self.layer_norm(self.linear1(pooled)))
        return self.activation(self.linear3(self.activation(hidden)))


class CLMPModel(CLMPPreTrainedModel):
    """Text, audio (HTS-AT) and melody towers with projection heads into one L2-normalised space.

    `get_text_features`, `get_audio_features`, `get_melody_features` give the joint embeddings;
    `forward(..., return_loss=True)` the contrastive loss over the modalities given.
    """

    def __init__(self, config: CLMPConfig):
        super().__init__(config)
        text_config, audio_config = config.text_config, config.audio_config
        add_pooling_layer = config.text_pooling == "pooler"
        if isinstance(text_config, ClapTextConfig):  # not in AutoModel's mapping
            self.text_model = ClapTextModel(text_config, add_pooling_layer=add_pooling_layer)
        else:
            self.text_model = AutoModel.from_config(text_config, add_pooling_layer=add_pooling_layer)
        self.text_projection = CLMPProjection(
            text_config.hidden_size, config.projection_dim, config.projection_hidden_act
        )

        self.audio_model = ClapAudioModel(audio_config)
        audio_width = int(audio_config.patch_embeds_hidden_size * 2 ** (len(audio_config.depths) - 1))
        self.audio_projection = CLMPProjection(audio_width, config.projection_dim, config.projection_hidden_act)

        if "melody" in config.modalities:
            melody_config = config.melody_config
            self.melody_model = CLMPMelodyModel(melody_config)
            self.melody_projection = nn.Sequential(
                nn.Linear(melody_config.hidden_size, melody_config.hidden_size),
                CLMPProjection(melody_config.hidden_size, config.projection_dim, config.projection_hidden_act),
            )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init_value)))
        self.post_init()

    # ----- embeddings -----

    @property
    def text_hidden_size(self) -> int:
        """Width of the text tower's token states (`get_text_hidden_states`)."""
        return self.text_model.config.hidden_size

    def _run_text_model(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None):
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must have shape (batch, length) with length >= 1, got {tuple(input_ids.shape)}."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if torch.any(attention_mask.sum(1) == 0):
            raise ValueError("attention_mask has a row with no tokens: empty text cannot be embedded.")
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask), attention_mask

    def get_text_outputs(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both text outputs from one pass of the tower: `(get_text_features, get_text_hidden_states)`."""
        outputs, attention_mask = self._run_text_model(input_ids, attention_mask)
        if self.config.text_pooling == "pooler":
            pooled = outputs.pooler_output
        else:
            mask = attention_mask.unsqueeze(-1).to(outputs.last_hidden_state.dtype)
            pooled = (outputs.last_hidden_state * mask).sum(1) / mask.sum(1)
        return F.normalize(self.text_projection(pooled), dim=-1), outputs.last_hidden_state

    def get_text_hidden_states(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tokenized captions `(batch, length)` → the text tower's last token states `(batch, length, text_hidden_size)`."""
        return self.get_text_outputs(input_ids, attention_mask)[1]

    def get_text_features(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tokenized captions `(batch, length)` → L2-normalised `(batch, projection_dim)`."""
        return self.get_text_outputs(input_ids, attention_mask)[0]

    def get_audio_features(self, input_features: torch.Tensor) -> torch.Tensor:
        """Log-mel `(batch, frames, 64)` from `LogMelSpectrogram` → L2-normalised `(batch, projection_dim)`."""
        num_mel_bins = self.config.audio_config.num_mel_bins
        max_frames = (
            self.config.audio_config.spec_size
            * (self.config.audio_config.spec_size // num_mel_bins)
            * self.config.mel_time_pooling
        )
        if input_features.ndim != 3 or input_features.shape[-1] != num_mel_bins:
            raise ValueError(
                f"input_features must be a log-mel of shape (batch, frames, {num_mel_bins}), got {tuple(input_features.shape)}."
            )
        if not self.config.mel_time_pooling <= input_features.shape[1] <= max_frames:
            raise ValueError(
                f"input_features has {input_features.shape[1]} frames; this model reads "
                f"{self.config.mel_time_pooling} to {max_frames} frames ({max_frames / 100:.2f} s at 100 frames/s)."
            )
        mel = input_features.unsqueeze(1).to(self.dtype)
        if self.config.mel_time_pooling > 1:
            mel = F.avg_pool2d(mel, kernel_size=(self.config.mel_time_pooling, 1))
        pooled = self.audio_model(input_features=mel).pooler_output
        return F.normalize(self.audio_projection(pooled), dim=-1)

    def get_melody_features(
        self, melody_input_ids: torch.LongTensor, melody_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Melody token ids `(batch, tokens)` (see `Melody.encode`) → L2-normalised `(batch, projection_dim)`."""
        if "melody" not in self.config.modalities:
            raise ValueError(f"This model has no melody tower (modalities={self.config.modalities}).")
        if melody_input_ids.ndim != 2:
            raise ValueError(f"melody_input_ids must have shape (batch, tokens), got {tuple(melody_input_ids.shape)}.")
        if melody_input_ids.numel() and (
            melody_input_ids.min() < 0 or melody_input_ids.max() >= self.config.melody_config.vocab_size
        ):
            raise ValueError(f"melody_input_ids must be in [0, {self.config.melody_config.vocab_size}).")
        if melody_attention_mask is not None and torch.any(melody_attention_mask.sum(1) == 0):
            raise ValueError("melody_attention_mask has a row with no tokens: an empty melody cannot be embedded.")
        hidden = self.melody_model(melody_input_ids, melody_attention_mask)
        return F.normalize(self.melody_projection(hidden), dim=-1)

    # ----- training -----

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        melody_input_ids: torch.LongTensor | None = None,
        melody_attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
        **kwargs,
    ) -> CLMPOutput:
        """Embed whichever modalities are given; with `return_loss`, the InfoNCE over all their pairs."""
        embeds = {}
        if input_ids is not None:
            embeds["text"] = self.get_text_features(input_ids, attention_mask)
        if input_features is not None:
            embeds["audio"] = self.get_audio_features(input_features)
        if melody_input_ids is not None:
            embeds["melody"] = self.get_melody_features(melody_input_ids, melody_attention_mask)
        sizes = {name: tensor.shape[0] for name, tensor in embeds.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Every modality needs the same batch size, got {sizes}.")
        loss, logits = None, {}
        if len(embeds) >= 2:
            loss, logits = contrastive_loss(embeds, self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE))
        elif return_loss:
            raise ValueError(f"return_loss needs at least two modalities, got {sorted(embeds)}.")
        return CLMPOutput(
            loss=loss if return_loss else None,
            **{f"logits_{pair}": value for pair, value in logits.items()},
            text_embeds=embeds.get("text"),
            audio_embeds=embeds.get("audio"),
            melody_embeds=embeds.get("melody"),
        )

    # ----- initialisation from CLAP -----

    @classmethod
    def from_clap(
        cls,
        clap_model_or_path: ClapModel | str | os.PathLike,
        melody_config: CLMPMelodyConfig | dict | None = None,
        **config_kwargs,
    ) -> "CLMPModel":
        """A CLMP whose text and audio towers and projections are those of a transformers `ClapModel`.

        The text tower keeps CLAP's pooled output (`text_pooling="pooler"`); the logit scale starts
        from CLAP's audio one; the melody tower is freshly initialised.
        """
        clap = (
            clap_model_or_path
            if isinstance(clap_model_or_path, ClapModel)
            else ClapModel.from_pretrained(clap_model_or_path)
        )
        config = CLMPConfig(
            text_config=clap.config.text_config.to_dict(),
            audio_config=clap.config.audio_config.to_dict(),
            melody_config=melody_config.to_dict() if isinstance(melody_config, CLMPMelodyConfig) else melody_config,
            projection_dim=clap.config.projection_dim,
            projection_hidden_act=clap.config.projection_hidden_act,
            text_pooling="pooler",
            **config_kwargs,
        )
        model = cls(config)
        model.text_model.load_state_dict(clap.text_model.state_dict())
        model.text_projection.load_state_dict(clap.text_projection.state_dict())
        model.audio_model.load_state_dict(clap.audio_model.state_dict())
        model.audio_projection.load_state_dict(clap.audio_projection.state_dict())
        with torch.no_grad():
            model.logit_scale.copy_(clap.logit_scale_a)
        return model


CLMPModel.register_for_auto_class("AutoModel")
