"""LLM providers for the `llm` node: an OpenAI-compatible HTTP API, or an offline deterministic stand-in."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import httpx

from connectors.outbound import tls_context
from connectors.secrets import redact_text


class ProviderError(RuntimeError):
    """The provider failed; `retryable` says whether another attempt may succeed (429, 5xx, timeouts)."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Completion:
    """One answer: its text, the model and provider that gave it, token usage when the provider reports it."""

    response: str
    model: str
    provider: str
    usage: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Provider(Protocol):
    """What the llm node needs of a provider."""

    name: str

    def complete(self, prompt: str, *, system: str | None, model: str | None, temperature: float | None,
                 max_tokens: int | None, timeout: float) -> Completion: ...


class OfflineProvider:
    """The default: answers at once and always the same way for the same input, with no network.

    It lets workflows run and be tested anywhere; its answer names itself so nobody mistakes it for a model.
    """

    name = "offline"

    def complete(self, prompt: str, *, system: str | None, model: str | None, temperature: float | None,
                 max_tokens: int | None, timeout: float) -> Completion:
        digest = hashlib.sha256(f"{system or ''}\n{prompt}".encode()).hexdigest()[:12]
        words = prompt.split()
        if max_tokens:
            words = words[:max_tokens]
        return Completion(response=f"[offline {digest}] {' '.join(words)}", model=model or "offline",
                          provider=self.name,
                          usage={"prompt_tokens": len(prompt.split()), "completion_tokens": len(words) + 2})


class OpenAICompatibleProvider:
    """POST {base_url}/chat/completions with a bearer key: OpenAI, vLLM, Ollama, LiteLLM and the like."""

    name = "openai"

    def __init__(self, base_url: str, api_key: str | None, default_model: str):
        self.base_url = base_url.rstrip("/")
        self.default_model = default_model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, verify=tls_context(),
                                  limits=httpx.Limits(max_connections=32))

    def complete(self, prompt: str, *, system: str | None, model: str | None, temperature: float | None,
                 max_tokens: int | None, timeout: float) -> Completion:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        body: dict[str, Any] = {"model": model or self.default_model, "messages": messages}
        if temperature is not None:
            body["temperature"] = temperature
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        try:
            response = self._http.post(f"{self.base_url}/chat/completions", json=body, timeout=timeout)
        except httpx.TransportError as exc:
            raise ProviderError(f"LLM provider unreachable: {type(exc).__name__}: {exc}", retryable=True) from None
        if response.status_code >= 400:
            retryable = response.status_code == 429 or response.status_code >= 500
            # redact_text: an upstream may echo the request's Authorization header in its error body.
            raise ProviderError(f"LLM provider answered HTTP {response.status_code}: "
                                f"{redact_text(response.text[:200])}", retryable)
        try:
            data = response.json()
            text = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ProviderError("LLM provider answered without choices[0].message.content", retryable=False) from None
        usage = {k: v for k, v in (data.get("usage") or {}).items() if isinstance(v, int)}
        return Completion(response=text, model=data.get("model") or body["model"], provider=self.name, usage=usage)
