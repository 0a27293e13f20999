"""The Python client of the langadapt service (`from langadapt.client import Client`)."""

from langadapt.client.client import Client
from langadapt.client.errors import APIError, ChecksumMismatch, ConnectionFailed, LangadaptError
from langadapt.jobs.signatures import verify_signature  # for webhook receivers

__all__ = ["APIError", "ChecksumMismatch", "Client", "ConnectionFailed", "LangadaptError", "verify_signature"]
