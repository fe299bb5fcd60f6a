import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

from mg2_pipeline import MelAutoencoderKL, MG2InpaintPipeline, MG2Pipeline
from mg2_pipeline.autoencoder_mel import vae_scale_factor
from mg2_pipeline.presets import build_pipeline, build_vae, load_vae, unet_config, vae_config

FOLDED_TINY = {**vae_config("tiny"), "latent_channels": 16, "latent_fold": 2}


def folded_tiny_vae(seed: int = 0) -> MelAutoencoderKL:
    torch.manual_seed(seed)
    return MelAutoencoderKL(**FOLDED_TINY).eval()


def test_the_folded_latent_is_the_autoencoders_latent_with_each_patch_in_channels():
    vae = folded_tiny_vae()
    plain = build_vae({**FOLDED_TINY, "latent_channels": 4, "latent_fold": 1}).eval()
    plain.load_state_dict(vae.state_dict())
    mel = torch.randn(2, 1, 40, 64)
    with torch.no_grad():
        folded, unfolded = vae.encode(mel).latent_dist, plain.encode(mel).latent_dist
        assert folded.mean.shape == (2, 16, 10, 16) and vae_scale_factor(vae) == 4 == 40 // 10
        torch.testing.assert_close(folded.mean, F.pixel_unshuffle(unfolded.mean, 2))
        torch.testing.assert_close(folded.std, F.pixel_unshuffle(unfolded.std, 2))
        torch.testing.assert_close(folded.kl(), unfolded.kl())
        torch.testing.assert_close(vae.decode(folded.mode()).sample, plain.decode(unfolded.mode()).sample)


def test_a_saved_folded_vae_loads_with_its_fold_and_the_latent_the_unet_sees(tmp_path):
    vae = folded_tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(str(tmp_path / "vae"))
    assert isinstance(loaded, MelAutoencoderKL)
    assert loaded.config.latent_channels == 16 and loaded.config.latent_fold == 2 and vae_scale_factor(loaded) == 4
    latent = torch.randn(1, 16, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(latent).sample, vae.decode(latent).sample)
    build_vae(vae_config("tiny")).save_pretrained(tmp_path / "plain")
    assert type(load_vae(str(tmp_path / "plain"))) is AutoencoderKL


def test_a_fold_that_does_not_divide_the_channels_or_tiling_is_refused():
    with pytest.raises(ValueError, match=r"latent_channels \(10\) must be a multiple of latent_fold²"):
        MelAutoencoderKL(**{**FOLDED_TINY, "latent_channels": 10})
    for fold in (0, 2.0):
        with pytest.raises(ValueError, match=f"latent_fold must be an integer >= 1, got {fold}"):
            MelAutoencoderKL(**{**FOLDED_TINY, "latent_fold": fold})
    vae = folded_tiny_vae()
    vae.enable_tiling()
    for run in (lambda: vae.encode(torch.randn(1, 1, 40, 64)), lambda: vae.decode(torch.randn(1, 16, 10, 16))):
        with pytest.raises(ValueError, match="does not tile"):
            run()
    unfolded = MelAutoencoderKL(**vae_config("tiny"))
    unfolded.enable_tiling()
    unfolded.encode(torch.randn(1, 1, 40, 64))  # unfolded, it tiles as AutoencoderKL does


def test_a_pipeline_with_a_folded_vae_generates_the_requested_length_and_reloads(tmp_path):
    pipe = build_pipeline("tiny", seed=0)
    vae = folded_tiny_vae()
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(-4.7)
    config = unet_config("tiny", pipe.clmp.config.projection_dim, "sketch")
    unet = UNet2DConditionModel(**{**config, "in_channels": 32, "out_channels": 16})
    folded = MG2Pipeline(**{**pipe.components, "vae": vae, "unet": unet}, aligned_melody="sketch")
    folded.set_progress_bar_config(disable=True)
    assert folded.vae_scale_factor == 4
    out = folded("a jig", num_inference_steps=2, audio_length_in_s=1.28, generator=torch.Generator().manual_seed(0))
    assert out.audios.shape == (1, 20480) and np.all(np.isfinite(out.audios)) and np.abs(out.audios).max() > 0
    latents = folded(
        "a jig", num_inference_steps=2, audio_length_in_s=1.28, output_type="latent", generator=torch.Generator()
    ).audios
    assert latents.shape == (1, 16, 128 // 4, 64 // 4)
    folded.save_pretrained(tmp_path / "folded")
    reloaded = MG2Pipeline.from_pretrained(tmp_path / "folded")
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.vae, MelAutoencoderKL) and reloaded.vae.config.latent_fold == 2
    again = reloaded(
        "a jig", num_inference_steps=2, audio_length_in_s=1.28, generator=torch.Generator().manual_seed(0)
    )
    np.testing.assert_array_equal(again.audios, out.audios)
    assert MG2InpaintPipeline.from_pipe(reloaded).vae is reloaded.vae  # the task pipelines take a folded VAE too


def test_a_preset_folded_keeps_its_latent_shape_from_a_finer_grid():
    mel = torch.randn(1, 1, 256, 64)
    with torch.no_grad():
        shapes = {
            fold: MelAutoencoderKL(**vae_config("small", latent_fold=fold)).encode(mel).latent_dist.mode().shape
            for fold in (1, 2)
        }
    assert shapes[1] == shapes[2] == (1, 32, 32, 8)
    assert vae_config("small", latent_fold=2)["block_out_channels"] == (16, 32, 64)
    assert type(build_vae(vae_config("small", latent_fold=1))) is AutoencoderKL  # nothing folded: diffusers' own class
    assert vae_config("small")["latent_fold"] == 2 and vae_config("tiny")["latent_fold"] == 1  # the presets' own
    folded = build_vae(vae_config("small"))
    assert isinstance(folded, MelAutoencoderKL)
    mid_blocks = (folded.encoder.mid_block, folded.decoder.mid_block)
    assert all(attention is None for block in mid_blocks for attention in block.attentions)
    for fold in (0, 3, 8):
        with pytest.raises(
            ValueError, match=rf"latent_fold must be one of \[1, 2, 4\] for the 'small' VAE, got {fold}"
        ):
            vae_config("small", latent_fold=fold)
