"""dallm: align a text-to-image diffusion model to a target image distribution with LoRA, and watch it."""

__version__ = "0.1.0"
