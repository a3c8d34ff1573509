"""Ollama's API: generation (/api/chat, /api/generate) and its model routes."""
