"""The UNet's conditions and their dropped forms, defined once for training and inference.

`train_mg2.py` drops conditions at random so that the pipeline can drop them for classifier-free guidance:

- **The caption**: its pooled CLMP text embedding (the first half of `class_labels`) and, with `text_attention`, its
  token states and mask (`encoder_hidden_states`). Dropped, it is the empty text `DROPPED_TEXT` in both; at
  inference a negative prompt takes the empty text's place in the unconditional prediction.
- **The melody**: its pooled CLMP melody embedding (the second half of `class_labels`) and, for an aligned melody, its
  frames beside the latent's channels. Dropped, the embedding is the dropped text's and the frames are zeros.

`drop_*` arguments are a bool (every row) or a `(batch,)` / `(batch, 1)` bool tensor (per row, as in training).
"""

from __future__ import annotations

import torch

DROPPED_TEXT = ""


def drop_rows(values: torch.Tensor | None, dropped: torch.Tensor, drop, batch_size: int) -> torch.Tensor:
    """`values` (batch first) with the rows where `drop` holds replaced by `dropped`, broadcast to their shape.
    `values` may be None where every row is dropped."""
    if isinstance(drop, bool):
        if not drop:
            return values
        if values is None:
            return dropped.expand(batch_size, *dropped.shape[1:])
        return dropped.to(values.dtype).expand_as(values).clone()
    drop = drop.reshape(-1, *[1] * (values.ndim - 1)).to(values.device)
    return torch.where(drop, dropped.to(values.dtype).expand_as(values), values)


def pooled_condition(
    text_embeds: torch.Tensor,
    melody_embeds: torch.Tensor | None,
    dropped_embeds: torch.Tensor,
    drop_text=False,
    drop_melody=False,
) -> torch.Tensor:
    """`class_labels`: [text ‖ melody] CLMP embeddings `(batch, 2 × projection_dim)`; a dropped half is `dropped_embeds`
    (the dropped text's embedding, `(1, projection_dim)`)."""
    batch_size = len(text_embeds)
    text = drop_rows(text_embeds, dropped_embeds, drop_text, batch_size)
    melody = drop_rows(melody_embeds, dropped_embeds, drop_melody, batch_size)
    return torch.cat([text, melody.to(text.dtype)], dim=-1)


def melody_frames_condition(frames: torch.Tensor, drop_melody) -> torch.Tensor:
    """The aligned melody frames `(batch, channels, frames, bins)`, zeros where the melody is dropped."""
    return drop_rows(frames, torch.zeros((), dtype=frames.dtype, device=frames.device), drop_melody, len(frames))


def text_states_condition(
    states: torch.Tensor, mask: torch.Tensor, dropped_states: torch.Tensor, dropped_mask: torch.Tensor, drop_text
) -> tuple[torch.Tensor, torch.Tensor]:
    """The caption's token states `(batch, tokens, dim)` and mask `(batch, tokens)`, the dropped text's where dropped."""
    return (
        drop_rows(states, dropped_states, drop_text, len(states)),
        drop_rows(mask, dropped_mask, drop_text, len(mask)),
    )
