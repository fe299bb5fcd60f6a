"""The dropped conditions guidance uses at inference are the ones training teaches (`mg2_pipeline.conditioning`)."""

import os
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import ROOT

from mg2_pipeline.conditioning import DROPPED_TEXT, drop_rows, pooled_condition
from mg2_pipeline.melody import Melody
from mg2_pipeline.presets import build_pipeline

sys.path.insert(0, os.path.join(ROOT, "training"))
from train_mg2 import build_condition, guided_target  # noqa: E402

CAPTIONS = ["a jig on fiddle", "a slow air on flute"]


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    pipe = build_pipeline("tiny", text_attention=True)
    assert pipe.config.aligned_melody is not None
    return pipe


def training_rows(pipe, drop: str) -> tuple:
    """`train_mg2.build_condition` on two captions with their melodies, every row dropping `drop`."""
    melodies = [Melody.from_string("G4:0.5 A4:0.5 B4:1"), Melody.from_string("D5:1 C5:0.5 A4:0.5")]
    encoded = pipe.processor(melody=melodies, return_tensors="pt")
    seeded = torch.Generator().manual_seed(1)
    frames = torch.randn(2, pipe.unet.config.in_channels - pipe.vae.config.latent_channels, 8, 8, generator=seeded)
    batch = {
        "text_embeds": pipe.encode_text(CAPTIONS, "cpu"),
        "melody_frames": frames,
        "melody_input_ids": encoded["melody_input_ids"],
        "melody_attention_mask": encoded["melody_attention_mask"],
        "retrieved_embeds": torch.randn(2, pipe.clmp.config.projection_dim, generator=seeded),
        "caption": CAPTIONS,
    }
    batch["text_states"], batch["text_mask"] = pipe.encode_text_states(CAPTIONS, "cpu")
    rates = {"both": (1.0, 0.0, 0.0), "melody": (0.0, 0.0, 1.0), "none": (0.0, 0.0, 0.0)}[drop]
    args = SimpleNamespace(
        condition="text_melody",
        gt_melody_prob=1.0,
        condition_dropout=rates[0],
        text_dropout=rates[1],
        melody_dropout=rates[2],
    )
    empty_text = (pipe.encode_text([DROPPED_TEXT], "cpu"), *pipe.encode_text_states([DROPPED_TEXT], "cpu"))
    # Training reads the caption's token states from its cache: it never runs the text tower.
    with mock.patch.object(pipe.clmp, "_run_text_model", side_effect=AssertionError("text tower run")):
        condition, dropped_frames, states, mask = build_condition(
            pipe, batch, args, empty_text, torch.Generator().manual_seed(0), "cpu"
        )
    return batch, pipe.encode_melody(melodies, "cpu"), condition, dropped_frames, states, mask


def inference_rows(pipe, melody_embeds, frames, guidance_scale: float, melody_guidance_scale: float):
    pipe._guidance_scale, pipe._melody_guidance_scale = guidance_scale, melody_guidance_scale
    condition = pipe.encode_condition(CAPTIONS, None, None, None, 1, "cpu")
    condition.melody_embeds, condition.melody_frames = melody_embeds, frames
    return pipe.prepare_guidance_inputs(condition, "cpu")


@torch.no_grad()
def test_the_unconditional_prediction_sees_what_training_drops(pipe):
    batch, melody_embeds, condition, frames, states, mask = training_rows(pipe, "both")
    guidance = inference_rows(pipe, melody_embeds, batch["melody_frames"], 3.0, 3.0)
    assert guidance.terms == (False, False, True)
    torch.testing.assert_close(guidance.condition[2:], condition)
    torch.testing.assert_close(guidance.melody_frames[2:], frames)
    assert frames.abs().sum() == 0
    torch.testing.assert_close(guidance.text_states[2:], states)
    torch.testing.assert_close(guidance.text_mask[2:], mask)


@torch.no_grad()
def test_the_melody_free_prediction_sees_what_training_drops(pipe):
    batch, melody_embeds, condition, frames, states, mask = training_rows(pipe, "melody")
    guidance = inference_rows(pipe, melody_embeds, batch["melody_frames"], 3.0, 2.0)
    assert guidance.terms == (False, True, True)
    melody_free = slice(2, 4)
    torch.testing.assert_close(guidance.condition[melody_free], condition)
    torch.testing.assert_close(guidance.melody_frames[melody_free], frames)
    torch.testing.assert_close(guidance.text_states[melody_free], states)
    # and the conditional prediction is the undropped training condition
    _, _, kept, kept_frames, kept_states, _ = training_rows(pipe, "none")
    torch.testing.assert_close(guidance.condition[:2], kept)
    torch.testing.assert_close(guidance.melody_frames[:2], kept_frames)
    torch.testing.assert_close(guidance.text_states[:2], kept_states)
    assert not torch.equal(kept, condition)


@torch.no_grad()
def test_guidance_distillation_targets_the_prediction_inference_guides(pipe):
    batch, melody_embeds, condition, frames, states, mask = training_rows(pipe, "none")
    empty_text = (pipe.encode_text([DROPPED_TEXT], "cpu"), *pipe.encode_text_states([DROPPED_TEXT], "cpu"))
    latents = torch.randn(2, pipe.unet.config.out_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500, 500])
    target = guided_target(pipe, latents, t, condition, frames, states, mask, empty_text, 3.0)
    guidance = inference_rows(pipe, melody_embeds, batch["melody_frames"], 3.0, 3.0)
    torch.testing.assert_close(target, pipe.predict_noise(latents, 500, guidance, slice(0, 8), 3.0, 3.0, None))
    conditional = pipe.predict_noise(latents, 500, guidance, slice(0, 8), 1.0, 1.0, None)
    assert not torch.allclose(target, conditional, atol=1e-3)


def test_drop_rows_replaces_only_the_rows_asked():
    values, dropped = torch.arange(6.0).reshape(3, 2), torch.tensor([[-1.0, -2.0]])
    out = drop_rows(values, dropped, torch.tensor([False, True, False]), 3)
    assert out.tolist() == [[0.0, 1.0], [-1.0, -2.0], [4.0, 5.0]]
    assert drop_rows(values, dropped, False, 3) is values
    assert drop_rows(None, dropped, True, 3).tolist() == [[-1.0, -2.0]] * 3
    both = pooled_condition(values, values + 10, dropped, drop_text=torch.tensor([True, False, False]))
    assert both[0].tolist() == [-1.0, -2.0, 10.0, 11.0] and both[1].tolist() == [2.0, 3.0, 12.0, 13.0]
