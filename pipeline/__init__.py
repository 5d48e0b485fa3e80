"""reid-prompt: caption person re-identification image sets with a vision model."""

__version__ = "0.1.0"
