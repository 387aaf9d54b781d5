"""Frontends that real clients speak: OpenAI HTTP, KServe v2."""
