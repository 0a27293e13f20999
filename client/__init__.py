"""The Python client of the langadapt service (`from langadapt.client import Client`)."""

from langadapt.client.client import Client
from langadapt.client.errors import APIError, ChecksumMismatch, ConnectionFailed, LangadaptError

__all__ = ["APIError", "ChecksumMismatch", "Client", "ConnectionFailed", "LangadaptError"]
