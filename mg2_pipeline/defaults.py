"""User-facing defaults, defined once for the pipeline, the `mg2` command line, the Space and the training scripts'
evaluation. Torch-free, so that `mg2 --help` stays fast."""

DEFAULT_MODEL = "checkpoints/mg2-small"  # where `make demo` saves the model it trains
# Text to music: 4 steps stay within 5 % of 25 on melody, instrument and FAD (docs/evaluation.md, few-step sampling).
DEFAULT_NUM_INFERENCE_STEPS = 4
# Continuing, re-rendering or repainting a recording: not yet measured at fewer steps.
DEFAULT_AUDIO_NUM_INFERENCE_STEPS = 25
DEFAULT_GUIDANCE_SCALE = 3.0  # text (classifier-free) guidance
DEFAULT_MELODY_GUIDANCE_SCALE = 3.0  # equal to the text's: plain guidance of both, one UNet pass fewer per step
DEFAULT_STRENGTH = 0.8  # audio-to-audio, as diffusers' img2img
MAX_SEED = 2**32 - 1  # what torch and numpy generators both take, and a browser's numbers hold exactly
