"""MG2: melody-guided text-to-music generation, Hugging Face Hub-native."""

from .audio import LogMelSpectrogram, load_audio, save_audio
from .melody import MELODY_VOCAB, Melody

__version__ = "0.1.0"

__all__ = ["LogMelSpectrogram", "MELODY_VOCAB", "Melody", "load_audio", "save_audio"]
