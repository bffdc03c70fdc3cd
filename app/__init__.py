"""An HTTP server for PaliGemma vision-language models."""

__version__ = "0.1.0"
