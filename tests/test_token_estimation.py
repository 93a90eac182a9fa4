"""Token estimates: chat (string and parts), completions, embeddings, per-model encodings, no network."""

# Standard library imports
import os
import subprocess
import sys
import time

# Third-party imports
import pytest
import tiktoken

# Local application imports
from tasks.requests.request_formats import endpoint_of, endpoint_of_body
from tasks.shards.run_state import Budget, RunContext
from tasks.requests.token_estimation import (
    EncodingUnavailable,
    TokenEstimator,
    budget_completion_tokens,
    encoding_name_for_model,
    load_encoding,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tokens(text: str, name: str = "o200k_base") -> int:
    return len(load_encoding(name).encode_ordinary(text))


def test_chat_counts_messages_names_and_the_completion_times_n() -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "name": "ann", "content": "What is the capital of France?"},
        ],
        "max_tokens": 40,
        "n": 2,
    }
    prompt = (3 + _tokens("system") + _tokens("You are terse.")
              + 3 + _tokens("user") + _tokens("ann") + 1 + _tokens("What is the capital of France?") + 3)
    assert TokenEstimator().estimate(body) == prompt + 40 * 2


def test_chat_content_parts_count_text_and_images() -> None:
    parts = {"model": "gpt-4o", "max_completion_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe this picture"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]}]}
    expected = 3 + _tokens("user") + _tokens("Describe this picture") + 85 + 3 + 5
    assert TokenEstimator().estimate(parts) == expected


def test_completions_with_a_list_of_prompts() -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": ["one two", "three"], "max_tokens": 7, "n": 3}
    expected = _tokens("one two", "cl100k_base") + _tokens("three", "cl100k_base") + 7 * 3 * 2
    assert TokenEstimator().estimate(body) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        ("hello world", lambda: _tokens("hello world", "cl100k_base")),
        (["hello", "big world"], lambda: _tokens("hello", "cl100k_base") + _tokens("big world", "cl100k_base")),
        ([1, 2, 3, 4], lambda: 4),
        ([[1, 2], [3, 4, 5]], lambda: 5),
    ],
)
def test_embeddings_inputs(value: object, expected) -> None:
    body = {"model": "text-embedding-3-small", "input": value}
    assert TokenEstimator().estimate(body) == expected()


def test_encoding_follows_the_model_unless_forced() -> None:
    assert encoding_name_for_model("gpt-4o-mini") == "o200k_base"
    assert encoding_name_for_model("gpt-4.1-nano") == "o200k_base"
    assert encoding_name_for_model("o3-mini") == "o200k_base"
    assert encoding_name_for_model("gpt-4") == "cl100k_base"
    assert encoding_name_for_model("gpt-3.5-turbo") == "cl100k_base"
    assert encoding_name_for_model("text-embedding-3-small") == "cl100k_base"
    assert encoding_name_for_model(None) == "cl100k_base"
    body = {"model": "gpt-4o-mini", "input": "Schadenfreude über alles"}
    forced = TokenEstimator.for_name("cl100k_base").estimate(body, "embeddings")
    assert forced == _tokens("Schadenfreude über alles", "cl100k_base")
    assert TokenEstimator().estimate(body, "embeddings") == _tokens("Schadenfreude über alles", "o200k_base")


def test_a_responses_body_is_told_from_an_embeddings_one_by_url_and_body() -> None:
    assert endpoint_of("http://h/v1/responses", {"model": "text-embedding-3-small", "input": "x"}) == "responses"
    assert endpoint_of("http://h/v1/embeddings", {"model": "gpt-4o-mini", "input": "x"}) == "embeddings"
    assert endpoint_of_body({"model": "text-embedding-3-small", "input": ["a", "b"]}) == "embeddings"
    assert endpoint_of_body({"model": "nomic-embed-text", "input": "a"}) == "embeddings"
    assert endpoint_of_body({"input": "a"}) == "embeddings"
    assert endpoint_of_body({"model": "gpt-4o-mini", "input": "a"}) == "responses"
    assert endpoint_of_body({"input": "a", "instructions": "b"}) == "responses"
    assert endpoint_of_body({"input": [{"role": "user", "content": "a"}]}) == "responses"


def test_responses_input_counts_like_chat_messages_and_reserves_max_output_tokens() -> None:
    text = "Tell me a story about a unicorn in three sentences."
    estimator = TokenEstimator()
    chat = estimator.estimate_parts({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})
    responses = estimator.estimate_parts({"model": "gpt-4o-mini", "input": text}, "responses")
    assert responses == chat  # one user message, the same overhead; the completion default is the chat one
    items = {"model": "gpt-4o-mini", "instructions": "Be brief.", "max_output_tokens": 40,
             "input": [{"role": "user", "content": [{"type": "input_text", "text": text},
                                                     {"type": "input_image", "image_url": "data:image/png;base64,AA"}]}]}
    prompt, completion = estimator.estimate_parts(items)
    expected = (3 + 1 + _tokens("Be brief.", "o200k_base")) + (3 + 1 + _tokens(text, "o200k_base") + 85) + 3
    assert (prompt, completion) == (expected, 40)
    # The budget reserves the model's default output when max_output_tokens is absent.
    assert budget_completion_tokens({"model": "gpt-4o-mini", "input": "x"}, "responses", 15) == 4_096
    assert budget_completion_tokens({"model": "o3-mini", "input": "x"}, "responses", 15) == 32_768
    assert budget_completion_tokens(items, "responses", 40) == 40
    assert budget_completion_tokens({"model": "gpt-4o-mini", "messages": []}, "chat", 15) == 15


def test_loaded_encodings_match_tiktoken_reference_counts() -> None:
    # Well-known counts: "hello world" is 2 tokens in both encodings.
    assert load_encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert isinstance(load_encoding("o200k_base"), tiktoken.Encoding)


def test_special_token_text_is_counted_as_plain_text() -> None:
    body = {"model": "gpt-4", "input": "<|endoftext|>"}
    assert TokenEstimator().estimate(body) > 1


def test_unknown_encoding_fails_at_once() -> None:
    with pytest.raises(EncodingUnavailable, match="not available offline"):
        TokenEstimator.for_name("r50k_base")


def test_works_with_no_network_and_an_empty_cache(tmp_path) -> None:
    # A fresh cache folder, proxies that lead nowhere, and tiktoken's downloader made to fail loudly:
    # loading must not try the network at all.
    code = (
        "import requests\n"
        "def refuse(*args, **kwargs):\n"
        "    raise SystemExit('the network was used')\n"
        "requests.get = refuse\n"
        "from tasks.requests.token_estimation import TokenEstimator\n"
        "e = TokenEstimator()\n"
        "print(e.estimate({'model': 'gpt-4o-mini', 'input': 'hi'}, 'embeddings'), e.estimate({'model': 'gpt-4', 'input': 'hi'}, 'embeddings'))\n"
    )
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "cache"), HTTPS_PROXY="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "1"]
    assert time.monotonic() - start < 30


def test_requests_are_estimated_only_while_a_token_limit_or_the_budget_needs_it() -> None:
    context = RunContext(settings=None, limiter=None, client=None, estimator=None, progress=None)
    assert context.estimator_for(limits_tokens=False) is None
    assert context.estimator_for(limits_tokens=True) is not None  # a limit applies (or is still to be learned)
    assert context.estimator_for(limits_tokens=False) is None  # the server stated none: no more estimates
    priced = RunContext(settings=None, limiter=None, client=None, estimator=None, progress=None,
                        budget=Budget(limit_usd=1.0))
    assert priced.estimator_for(limits_tokens=False) is not None  # a budget prices every request
