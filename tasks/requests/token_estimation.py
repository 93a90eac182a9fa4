"""Token estimates for OpenAI requests, with tiktoken, offline.

The engine reserves each request's estimated tokens from the tokens-per-minute bucket before
sending it. The estimate counts what the API counts against the limit: the prompt, plus the
completion the request may produce (``max_tokens`` or ``max_completion_tokens``, times ``n``).

Features:
    - Chat completions: messages with string content, or with a list of parts (text parts are
      encoded; image parts count a fixed amount), plus names, tool calls and tool definitions.
    - Completions: a string prompt, a list of strings, a token array or a list of token arrays.
    - Embeddings: a string, a list of strings, a token array or a list of token arrays.
    - Responses (``/v1/responses``): ``input`` as a string or a list of items (messages whose
      content is a string or ``input_text``/``output_text``/``input_image`` parts, tool calls and
      their outputs), plus ``instructions``, ``tools`` and ``text.format``. The completion is
      ``max_output_tokens``; when absent, the limits reserve the chat default (as the Cookbook
      does) and a budget reserves ``default_output_tokens(model)`` (see ``budget_completion_tokens``).
    - The encoding follows the model (o200k_base for gpt-4o, gpt-4.1, gpt-5 and the o-series;
      cl100k_base for gpt-4, gpt-3.5 and text-embedding-*), unless a name is forced.
    - No network, ever. tiktoken downloads its data on first use, with no timeout. This module
      takes the data from the installed ``bpe-openai`` package instead, checks its SHA-256, and
      places it in tiktoken's cache under the name tiktoken looks for. An encoding that is
      not available offline raises ``EncodingUnavailable`` at once.

Usage:
    >>> estimator = TokenEstimator.for_name(None)          # encoding follows each model
    >>> estimator.estimate({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}],
    ...                     "max_tokens": 10})
    18

Pitfalls:
    - These are estimates. The server's count of the prompt can differ by a few tokens for exotic
      message fields. The TPM bucket needs a number before sending; the real usage arrives later.
"""

# Standard library imports
import functools
import gzip
import hashlib
import importlib.resources
import json
import logging
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

# Third-party imports
import tiktoken

# Local application imports
from tasks.requests.request_formats import endpoint_of_body

logger = logging.getLogger(__name__)

# The completion size assumed when a chat request sets no max_tokens (as the Cookbook script does).
DEFAULT_CHAT_COMPLETION_TOKENS = 15
# The API's own default max_tokens for the legacy completions endpoint.
DEFAULT_COMPLETIONS_MAX_TOKENS = 16
# The output a Responses request without max_output_tokens is budgeted at: (model prefix, tokens), first match.
DEFAULT_RESPONSES_OUTPUT_TOKENS = (("o1", 32_768), ("o3", 32_768), ("o4", 32_768), ("gpt-5", 32_768),
                                   ("gpt-4.1", 8_192), ("gpt-4o", 4_096))
DEFAULT_RESPONSES_OUTPUT_FALLBACK = 4_096
# Fixed cost of one image part (the API's "low detail" price; high detail is tiled and costs more).
IMAGE_PART_TOKENS = 85
# The chat format's overhead: per message, per name, and priming of the reply.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_PER_ROLE = 1  # "user", "system", "developer" are one token each
TOKENS_REPLY_PRIMING = 3

# Where tiktoken would download each encoding from (its cache key) and the data's SHA-256.
OFFLINE_ENCODINGS: Dict[str, tuple] = {
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}
# Model name prefixes that use o200k_base; everything else falls back to cl100k_base.
O200K_MODEL_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-4o", "o1", "o3", "o4", "gpt-oss")


class EncodingUnavailable(RuntimeError):
    """Raised when an encoding cannot be loaded without the network."""


@dataclass
class TokenEstimator:
    """Estimates the tokens a request counts against a tokens-per-minute limit.

    Attributes:
        forced_encoding: an encoding name used for every model, or None to follow each model.
    """

    forced_encoding: Optional[str] = None
    _by_model: Dict[Optional[str], tiktoken.Encoding] = field(default_factory=dict, repr=False)

    @classmethod
    def for_name(cls, encoding_name: Optional[str]) -> "TokenEstimator":
        """Build an estimator, loading a forced encoding at once so a bad name fails early."""
        estimator = cls(forced_encoding=encoding_name or None)
        if estimator.forced_encoding:
            load_encoding(estimator.forced_encoding)
        return estimator

    def encoding_for(self, model: Optional[str]) -> tiktoken.Encoding:
        """The encoding used for ``model`` (cached per model name)."""
        encoding = self._by_model.get(model)
        if encoding is None:
            name = self.forced_encoding or encoding_name_for_model(model)
            encoding = load_encoding(name)
            self._by_model[model] = encoding
        return encoding

    def estimate(self, body: Dict[str, Any], endpoint: Optional[str] = None) -> int:
        """Estimate the tokens of one request body.

        Args:
            body: the JSON body sent to the API.
            endpoint: "chat", "completions" or "embeddings"; None to tell from the body.

        Returns:
            The prompt's tokens plus the completion tokens the request may use.
        """
        prompt, completion = self.estimate_parts(body, endpoint)
        return prompt + completion

    def estimate_parts(self, body: Dict[str, Any], endpoint: Optional[str] = None) -> Tuple[int, int]:
        """The prompt's tokens, and the most completion tokens the request may use."""
        encoding = self.encoding_for(body.get("model") if isinstance(body.get("model"), str) else None)
        kind = endpoint or endpoint_of_body(body)
        if kind == "responses":
            completion = _whole(body.get("max_output_tokens"), DEFAULT_CHAT_COMPLETION_TOKENS)
            return count_responses_input_tokens(body, encoding), completion
        if kind == "embeddings":
            return count_input_tokens(body.get("input"), encoding), 0
        if kind == "completions":
            prompt_tokens = count_input_tokens(body.get("prompt"), encoding)
            prompts = _prompt_count(body.get("prompt"))
            completions = _whole(body.get("max_tokens"), DEFAULT_COMPLETIONS_MAX_TOKENS)
            choices = max(_whole(body.get("n"), 1), _whole(body.get("best_of"), 1))
            return prompt_tokens, completions * choices * prompts
        prompt_tokens = count_chat_prompt_tokens(body, encoding)
        completions = _whole(
            body.get("max_completion_tokens", body.get("max_tokens")), DEFAULT_CHAT_COMPLETION_TOKENS
        )
        return prompt_tokens, completions * _whole(body.get("n"), 1)


def budget_completion_tokens(body: Dict[str, Any], endpoint: Optional[str], completion_tokens: int) -> int:
    """The completion tokens a cost budget reserves for a request: its stated maximum, or a default.

    A Responses request without ``max_output_tokens`` may write up to the model's whole output
    limit, so the budget reserves ``default_output_tokens(model)`` for it instead of the small
    figure the rate limits use. Other requests reserve ``completion_tokens`` as estimated.
    """
    if (endpoint or endpoint_of_body(body)) == "responses" and body.get("max_output_tokens") is None:
        model = body.get("model") if isinstance(body.get("model"), str) else None
        return default_output_tokens(model)
    return completion_tokens


def default_output_tokens(model: Optional[str]) -> int:
    """The output a Responses request without ``max_output_tokens`` is budgeted at (reasoning models write more)."""
    name = (model or "").split(":")[-1] if (model or "").startswith("ft:") else (model or "")
    for prefix, tokens in DEFAULT_RESPONSES_OUTPUT_TOKENS:
        if name.startswith(prefix):
            return tokens
    return DEFAULT_RESPONSES_OUTPUT_FALLBACK


def count_responses_input_tokens(body: Dict[str, Any], encoding: tiktoken.Encoding) -> int:
    """Count a Responses request's input tokens: instructions, input items, tools and the text format.

    Messages count as in chat (3 tokens each, their role, plus the reply's priming): a string input
    is one user message and ``instructions`` one more message. Other items (tool calls, their
    outputs) count their JSON.
    """
    total = 0
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        total += TOKENS_PER_MESSAGE + TOKENS_PER_ROLE + _count_text(instructions, encoding)
    value = body.get("input")
    if isinstance(value, str):
        total += TOKENS_PER_MESSAGE + TOKENS_PER_ROLE + _count_text(value, encoding)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                total += TOKENS_PER_MESSAGE + TOKENS_PER_ROLE + _count_text(item, encoding)
            elif isinstance(item, dict) and ("role" in item or item.get("type") == "message"):
                total += TOKENS_PER_MESSAGE + _count_content(item.get("content"), encoding)
                total += _count_text(item["role"], encoding) if isinstance(item.get("role"), str) else TOKENS_PER_ROLE
            elif item is not None:
                total += _count_text(json.dumps(item, separators=(",", ":")), encoding)
    total += TOKENS_REPLY_PRIMING
    for extra in ("tools", "text"):
        if body.get(extra):
            total += _count_text(json.dumps(body[extra], separators=(",", ":")), encoding)
    return total


def count_chat_prompt_tokens(body: Dict[str, Any], encoding: tiktoken.Encoding) -> int:
    """Count a chat request's prompt tokens the way the API does."""
    messages = body.get("messages")
    total = 0
    if isinstance(messages, list):
        for message in messages:
            total += TOKENS_PER_MESSAGE
            if not isinstance(message, dict):
                total += _count_text(json.dumps(message), encoding)
                continue
            for key, value in message.items():
                if key == "content":
                    total += _count_content(value, encoding)
                elif key == "name":
                    total += _count_text(value, encoding) + TOKENS_PER_NAME
                elif isinstance(value, str):
                    total += _count_text(value, encoding)
                elif value is not None:
                    total += _count_text(json.dumps(value, separators=(",", ":")), encoding)
        total += TOKENS_REPLY_PRIMING
    for extra in ("tools", "functions", "response_format"):
        if body.get(extra):
            total += _count_text(json.dumps(body[extra], separators=(",", ":")), encoding)
    return total


def count_input_tokens(value: Any, encoding: tiktoken.Encoding) -> int:
    """Count tokens of an embeddings ``input`` or completions ``prompt``.

    Accepts a string, a list of strings, a token array or a list of token arrays.
    """
    if value is None:
        return 0
    if isinstance(value, str):
        return _count_text(value, encoding)
    if isinstance(value, list):
        if all(isinstance(item, int) for item in value):
            return len(value)
        return sum(count_input_tokens(item, encoding) for item in value)
    return _count_text(json.dumps(value), encoding)


def encoding_name_for_model(model: Optional[str]) -> str:
    """The encoding a model uses; cl100k_base when the model is unknown or absent."""
    if not model:
        return "cl100k_base"
    base = model.split(":")[-1] if model.startswith("ft:") else model
    if base.startswith(O200K_MODEL_PREFIXES):
        return "o200k_base"
    try:
        name = tiktoken.encoding_name_for_model(base)
    except KeyError:
        return "cl100k_base"
    return name if name in OFFLINE_ENCODINGS else "cl100k_base"


@functools.lru_cache(maxsize=None)
def load_encoding(name: str) -> tiktoken.Encoding:
    """Load a tiktoken encoding without touching the network.

    Raises:
        EncodingUnavailable: when the encoding's data is not installed.
    """
    if name not in OFFLINE_ENCODINGS:
        known = ", ".join(sorted(OFFLINE_ENCODINGS))
        raise EncodingUnavailable(f"token encoding {name!r} is not available offline; use one of: {known}")
    blob_url, sha256 = OFFLINE_ENCODINGS[name]
    cache_dir = _tiktoken_cache_dir()
    cache_path = os.path.join(cache_dir, hashlib.sha1(blob_url.encode()).hexdigest())
    if not _file_has_hash(cache_path, sha256):
        data = _packaged_encoding_data(name)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise EncodingUnavailable(f"the installed data for {name!r} does not match tiktoken's checksum")
        os.makedirs(cache_dir, exist_ok=True)
        temporary = f"{cache_path}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, cache_path)
        logger.debug("placed %s data in tiktoken's cache at %s", name, cache_path)
    return tiktoken.get_encoding(name)


# Helpers


def _count_text(text: Any, encoding: tiktoken.Encoding) -> int:
    """Count tokens of a text, treating special-token lookalikes as plain text."""
    if not isinstance(text, str):
        text = json.dumps(text)
    return len(encoding.encode_ordinary(text))


def _count_content(content: Any, encoding: tiktoken.Encoding) -> int:
    """Count a message's content: a string, or a list of typed parts."""
    if content is None:
        return 0
    if isinstance(content, str):
        return _count_text(content, encoding)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                total += _count_text(part.get("text", ""), encoding)
            elif isinstance(part, dict) and part.get("type") in ("image_url", "input_image"):
                total += IMAGE_PART_TOKENS
            elif isinstance(part, str):
                total += _count_text(part, encoding)
            else:
                total += _count_text(json.dumps(part), encoding)
        return total
    return _count_text(json.dumps(content), encoding)


def _prompt_count(prompt: Any) -> int:
    """How many prompts a completions request holds (each gets its own completion)."""
    if isinstance(prompt, list) and prompt and not all(isinstance(item, int) for item in prompt):
        return len(prompt)
    return 1


def _whole(value: Any, default: int) -> int:
    """A non-negative whole number from a request field, or the default."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return default
    return int(value)


def _tiktoken_cache_dir() -> str:
    """The folder tiktoken reads its cache from, making sure caching is on."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR")
    if cache_dir is None:
        cache_dir = os.environ.get("DATA_GYM_CACHE_DIR")
    if not cache_dir:
        # An empty TIKTOKEN_CACHE_DIR turns tiktoken's cache off, which would make it download.
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
        os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
    return cache_dir


def _file_has_hash(path: str, sha256: str) -> bool:
    """True when the file exists and its SHA-256 is ``sha256``."""
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest() == sha256
    except OSError:
        return False


def _packaged_encoding_data(name: str) -> bytes:
    """Read an encoding's rank file from the installed bpe-openai package."""
    try:
        resource = importlib.resources.files("bpe_openai.data") / f"{name}.tiktoken.gz"
        return gzip.decompress(resource.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError, OSError) as error:
        raise EncodingUnavailable(f"token encoding {name!r} needs the bpe-openai package: {error}") from error
