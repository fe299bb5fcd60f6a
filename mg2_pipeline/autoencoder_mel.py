"""`MelAutoencoderKL`: diffusers' `AutoencoderKL` whose latent folds each `latent_fold × latent_fold` patch into
channels, so the encoder can keep a finer grid than the latent the UNet sees."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ModelMixin  # noqa: F401  diffusers' pipeline loader looks ModelMixin up here
from diffusers.configuration_utils import register_to_config


class MelAutoencoderKL(AutoencoderKL):
    r"""
    An `AutoencoderKL` on log-mel images whose latent is folded: the autoencoder down-samples by
    `2 ** (len(block_out_channels) - 1)`, then each `latent_fold × latent_fold` patch of its latent becomes channels
    (`pixel_unshuffle`), and the decoder unfolds it first. The latent is `latent_channels` deep (the folded count, what
    the UNet sees) and `vae_scale_factor(vae)` times smaller than the mel on both axes.

    A ×4 autoencoder with 8 channels folded by 2 gives the same latent shape as a ×8 one with 32 channels, but its
    encoder and decoder keep every second mel frame and bin apart where a ×8 one merges them. With `latent_fold=1`
    it is an `AutoencoderKL`.

    Parameters: those of `AutoencoderKL` (defaults for 1-channel log-mels: 1 channel in and out, `sample_size` 1024),
    and `latent_fold` (int, default 1). `presets.build_vae` makes a plain `AutoencoderKL` when nothing is folded.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 1024,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float] | None = None,
        latents_std: tuple[float] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        latent_fold: int = 1,
    ):
        if not isinstance(latent_fold, int) or latent_fold < 1:
            raise ValueError(f"latent_fold must be an integer >= 1, got {latent_fold!r}.")
        if latent_channels % latent_fold**2:
            raise ValueError(
                f"latent_channels ({latent_channels}) must be a multiple of latent_fold² ({latent_fold**2}): each "
                "folded patch becomes latent_fold² channels."
            )
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=down_block_types,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            latent_channels=latent_channels // latent_fold**2,
            norm_num_groups=norm_num_groups,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            latents_mean=latents_mean,
            latents_std=latents_std,
            force_upcast=force_upcast,
            use_quant_conv=use_quant_conv,
            use_post_quant_conv=use_post_quant_conv,
            mid_block_add_attention=mid_block_add_attention,
        )
        # AutoencoderKL's own registration recorded the unfolded count; the config states the latent the UNet sees.
        self.register_to_config(latent_channels=latent_channels)

    def _check_not_tiled(self) -> None:
        if self.use_tiling and self.config.latent_fold > 1:
            raise ValueError("MelAutoencoderKL with latent_fold > 1 does not tile; decode in windows instead.")

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_not_tiled()
        # The moments are [mean ‖ log-variance]: fold each half so the posterior's channels stay paired.
        mean, logvar = super()._encode(x).chunk(2, dim=1)
        fold = self.config.latent_fold
        return torch.cat([F.pixel_unshuffle(mean, fold), F.pixel_unshuffle(logvar, fold)], dim=1)

    def _decode(self, z: torch.Tensor, return_dict: bool = True):
        self._check_not_tiled()
        return super()._decode(F.pixel_shuffle(z, self.config.latent_fold), return_dict=return_dict)


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """How many mel frames (and bins) one latent position covers, for an `AutoencoderKL` or a `MelAutoencoderKL`."""
    return 2 ** (len(vae.config.block_out_channels) - 1) * vae.config.get("latent_fold", 1)
