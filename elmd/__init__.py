"""elmd: a private, on-device serving daemon for OpenELM with an OpenAI-compatible API."""

__version__ = "0.1.0"
