"""gpubox: provision a Fedora 42 box with an old NVIDIA card into a local Gemma 4 inference server."""

__version__ = "0.1.0"
