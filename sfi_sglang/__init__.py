"""Slow-Fast Inference (SFI) sparse decoding as an SGLang attention backend (``--attention-backend sfi``)."""

__version__ = "0.1.0"
