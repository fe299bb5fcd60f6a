"""CLMP processor: text tokenizer + log-mel feature extractor + the MG2 melody tokenizer."""

from __future__ import annotations

import numpy as np
from transformers import BatchFeature, ProcessorMixin

# audio is imported directly (not only through feature_extraction_clmp): diffusers' remote-code loader
# copies only the modules a file imports itself.
from .audio import SAMPLE_RATE  # noqa: F401
from .feature_extraction_clmp import CLMPFeatureExtractor
from .melody import MAX_MELODY_TOKENS, Melody, encode_melody_tokens


class CLMPProcessor(ProcessorMixin):
    """Prepares CLMP inputs, as `ClapProcessor` does, plus melodies.

    `processor(text=..., audio=..., melody=..., return_tensors="pt")` returns `input_ids` /
    `attention_mask` (text), `input_features` (log-mel) and `melody_input_ids` /
    `melody_attention_mask`. A melody is a `Melody` or its token string; one longer than
    `melody_max_length` tokens is cut after the last whole note that fits.
    """

    def __init__(
        self, feature_extractor, tokenizer, melody_max_length: int = MAX_MELODY_TOKENS, max_text_length: int = 77
    ):
        self.melody_max_length = melody_max_length
        self.max_text_length = max_text_length
        super().__init__(feature_extractor, tokenizer)

    def __call__(
        self,
        text=None,
        audio=None,
        melody=None,
        sampling_rate: int | None = None,
        return_tensors: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        if text is None and audio is None and melody is None:
            raise ValueError("Pass at least one of text, audio or melody.")
        data = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
                raise ValueError("text must be a non-empty string or a list of non-empty strings.")
            data.update(self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_text_length))
        if audio is not None:
            data.update(self.feature_extractor(audio, sampling_rate=sampling_rate))
        if melody is not None:
            melodies = [melody] if isinstance(melody, (str, Melody)) else list(melody)
            if not melodies:
                raise ValueError("melody must be a Melody, a token string, or a non-empty list of them.")
            encoded = [self.encode_melody(item) for item in melodies]
            data["melody_input_ids"] = np.stack([e["input_ids"] for e in encoded])
            data["melody_attention_mask"] = np.stack([e["attention_mask"] for e in encoded])
        sizes = {key: len(value) for key, value in data.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"text, audio and melody must have the same batch size, got {sizes}.")
        return BatchFeature(dict(data), tensor_type=return_tensors)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """The feature extractor is this module's own class and loads directly: through `AutoFeatureExtractor`, a
        processor loaded as remote code (e.g. inside a `DiffusionPipeline`) would need `trust_remote_code` twice."""
        from transformers import AutoTokenizer

        kwargs.pop("trust_remote_code", None)
        processor_dict, _ = cls.get_processor_dict(pretrained_model_name_or_path, **kwargs)
        settings = {
            key: processor_dict[key] for key in ("melody_max_length", "max_text_length") if key in processor_dict
        }
        return cls(
            CLMPFeatureExtractor.from_pretrained(pretrained_model_name_or_path, **kwargs),
            AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs),
            **settings,
        )

    def encode_melody(self, melody: Melody | str) -> dict[str, np.ndarray]:
        if isinstance(melody, Melody):
            return melody.encode(max_length=self.melody_max_length)
        if isinstance(melody, str):
            Melody.from_tokens(melody)  # validates, with the position of any malformed token
            return encode_melody_tokens(melody, max_length=self.melody_max_length)
        raise TypeError(f"melody must be a Melody or a token string, got {type(melody).__name__}.")


CLMPProcessor.register_for_auto_class("AutoProcessor")
