"""secure-llm-gateway: an OpenAI-compatible gateway with quotas, rate limits and PII redaction."""

__version__ = "0.1.0"
