"""OpenAI and every OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, Ollama, most clouds)."""

from .base import Provider


class OpenAIProvider(Provider):
    kind = "openai"
