"""OpenAI's chat completions, completions and models routes (with llama.cpp's tokenize and elmd's /health)."""
