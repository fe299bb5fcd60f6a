"""User-facing defaults, defined once for the pipeline, the `mg2` command line, the Space and the training scripts'
evaluation. Torch-free, so that `mg2 --help` stays fast."""

DEFAULT_MODEL = "checkpoints/mg2-small"  # where `make demo` saves the model it trains
DEFAULT_NUM_INFERENCE_STEPS = 25
# Text to music with an x₀-predicting UNet (`make demo`'s model): 4 steps keep Mel acc and FAD within 5 % of 25 and the
# instrument no lower (docs/evaluation.md, few-step sampling). Noise-predicting models and a recording's tasks keep 25.
DEFAULT_X0_NUM_INFERENCE_STEPS = 4
# Measured on a 1 600-step `make distill` student: 3 and 2 steps stay within 5 % of its 25; at 2 the instrument figures
# of evaluate.py fall against 4 steps, at 3 they hold (docs/evaluation.md#few-step-sampling).
DEFAULT_DISTILLED_NUM_INFERENCE_STEPS = 3
DEFAULT_GUIDANCE_SCALE = 3.0  # text (classifier-free) guidance
DEFAULT_MELODY_GUIDANCE_SCALE = 3.0  # equal to the text's: plain guidance of both, one UNet pass fewer per step
DEFAULT_STRENGTH = 0.8  # audio-to-audio, as diffusers' img2img
MAX_SEED = 2**32 - 1  # what torch and numpy generators both take, and a browser's numbers hold exactly
