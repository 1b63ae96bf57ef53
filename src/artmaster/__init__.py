"""ArtMaster: one painter's scans -> an AdaLoRA adapter for FLUX.1-dev that paints like that painter."""

import logging

from artmaster.runtime import pin_cpu_kernels

# before any stage imports torch: the same CPU kernels on every machine (artmaster.runtime)
pin_cpu_kernels()

__version__ = "0.1.0"


class _PilImageProcessorFallback(logging.Filter):
    """Drops transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back
    to `CLIPImageProcessorPil`" notice, printed by every stage that imports diffusers' FluxPipeline.
    The PIL processors are what we want here (the pipelines' image processors serve IP-adapters,
    which we never load), and torchvision cannot be installed on the CPU install: PyPI's
    torchvision 0.28.0 is linked against CUDA torch and fails to import next to torch 2.13.0+cpu."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_PilImageProcessorFallback())
