"""fit3d-hf: 3D-aware fine-tuning (FiT3D) of 2D vision backbones, built on the Hugging Face ecosystem."""

__version__ = "0.1.0"

__all__ = ["__version__"]
