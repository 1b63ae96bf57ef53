"""ArtMaster: one painter's scans -> an AdaLoRA adapter for FLUX.1-dev that paints like that painter."""

from artmaster.runtime import pin_cpu_kernels

# before any stage imports torch: the same CPU kernels on every machine (artmaster.runtime)
pin_cpu_kernels()

__version__ = "0.1.0"
