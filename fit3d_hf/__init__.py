"""fit3d-hf: 3D-aware fine-tuning (FiT3D) of 2D vision backbones, built on the Hugging Face ecosystem."""

from transformers import AutoConfig, AutoModel

from .backbones import BACKBONE_SHORT_NAMES, DenseFeatureExtractor, load_backbone
from .configuration_fit3d import FiT3DConfig
from .hub import make_model_card, push_to_hub
from .modeling_fit3d import FiT3DModel, FiT3DModelOutput, FiT3DPreTrainedModel

__version__ = "0.1.0"

# Importing fit3d_hf teaches AutoConfig/AutoModel the "fit3d" model type. Saved checkpoints also carry
# configuration_fit3d.py and modeling_fit3d.py (auto_map), so they load with trust_remote_code=True where
# fit3d-hf is not installed.
AutoConfig.register(FiT3DConfig.model_type, FiT3DConfig, exist_ok=True)
AutoModel.register(FiT3DConfig, FiT3DModel, exist_ok=True)
FiT3DConfig.register_for_auto_class()
FiT3DModel.register_for_auto_class("AutoModel")

__all__ = [
    "BACKBONE_SHORT_NAMES",
    "DenseFeatureExtractor",
    "FiT3DConfig",
    "FiT3DModel",
    "FiT3DModelOutput",
    "FiT3DPreTrainedModel",
    "__version__",
    "load_backbone",
    "make_model_card",
    "push_to_hub",
]
