"""ArtMaster: one painter's scans -> an AdaLoRA adapter for FLUX.1-dev that paints like that painter."""

__version__ = "0.1.0"
