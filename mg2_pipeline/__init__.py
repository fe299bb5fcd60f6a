"""MG2: melody-guided text-to-music generation, Hugging Face Hub-native."""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoProcessor

from .audio import LogMelSpectrogram, load_audio, save_audio
from .autoencoder_mel import MelAutoencoderKL
from .configuration_clmp import CLMPConfig, CLMPMelodyConfig
from .feature_extraction_clmp import CLMPFeatureExtractor
from .melody import MELODY_VOCAB, Melody
from .modeling_clmp import CLMPModel, CLMPOutput
from .pipeline_mg2 import MG2Pipeline, MG2PipelineOutput
from .pipeline_mg2_audio_to_audio import MG2AudioToAudioPipeline
from .pipeline_mg2_inpaint import MG2InpaintPipeline
from .processing_clmp import CLMPProcessor
from .retrieval import GuidingMelody, MelodyRetriever, RetrievalOutput
from .vocoder import GriffinLimVocoder
from .vocos_vocoder import VocosVocoder

__version__ = "0.1.0"

AutoConfig.register("clmp", CLMPConfig)
AutoModel.register(CLMPConfig, CLMPModel)
AutoFeatureExtractor.register(CLMPConfig, CLMPFeatureExtractor)
AutoProcessor.register(CLMPConfig, CLMPProcessor)

__all__ = [
    "CLMPConfig",
    "CLMPFeatureExtractor",
    "GriffinLimVocoder",
    "MG2AudioToAudioPipeline",
    "MG2InpaintPipeline",
    "MG2Pipeline",
    "MG2PipelineOutput",
    "CLMPMelodyConfig",
    "CLMPModel",
    "CLMPOutput",
    "CLMPProcessor",
    "LogMelSpectrogram",
    "MELODY_VOCAB",
    "MelAutoencoderKL",
    "Melody",
    "MelodyRetriever",
    "RetrievalOutput",
    "VocosVocoder",
    "GuidingMelody",
    "load_audio",
    "save_audio",
]
