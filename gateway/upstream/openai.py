"""OpenAI and every OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, Ollama, most clouds)."""

from gateway.upstream.base import Provider


class OpenAIProvider(Provider):
    kind = "openai"
