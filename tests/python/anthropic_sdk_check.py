"""Drives an Anthropic Messages endpoint with the official `anthropic` Python SDK.

Run by tests/tests/anthropic_sdk.rs, against the real proxy (and, to check
the mock itself, against the mock upstream directly). Environment:
  CLAW_BASE_URL    base URL WITHOUT /v1 (the SDK appends /v1/messages)
  CLAW_API_KEY     a client key (sent as x-api-key, as the SDK does)
  CLAW_MODEL       a model served by anthropic backends
  CLAW_BASE_URL_B  optional: a second proxy; the cache check's second
                   request goes there
  CLAW_SKIP        optional: comma-separated checks to skip (e.g.
                   `unknown_model` against the mock, which serves any model)
Prints `ok <check> …` per check and exits non-zero on the first failure.
"""

import os
import sys

import anthropic


def main() -> int:
    base = os.environ["CLAW_BASE_URL"]
    base_b = os.environ.get("CLAW_BASE_URL_B", base)
    key = os.environ["CLAW_API_KEY"]
    model = os.environ["CLAW_MODEL"]
    skip = set(filter(None, os.environ.get("CLAW_SKIP", "").split(",")))
    client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=30)

    msg = client.messages.create(
        model=model,
        max_tokens=64,
        system="you are a terse assistant",
        messages=[{"role": "user", "content": "say hello to the sdk"}],
    )
    assert msg.type == "message" and msg.role == "assistant", msg
    assert msg.content and msg.content[0].type == "text" and msg.content[0].text, msg
    assert msg.stop_reason in ("end_turn", "max_tokens"), msg.stop_reason
    # system (5) + user (5) words, none cached.
    assert msg.usage.input_tokens == 10, msg.usage
    assert msg.usage.output_tokens > 0, msg.usage
    print("ok messages", msg.usage.input_tokens, msg.usage.output_tokens)

    pieces = []
    with client.messages.stream(
        model=model,
        max_tokens=5,
        messages=[{"role": "user", "content": [{"type": "text", "text": "stream please now"}]}],
    ) as stream:
        for text in stream.text_stream:
            pieces.append(text)
        final = stream.get_final_message()
    assert pieces, "no streamed text"
    assert final.content[0].text == "".join(pieces), (final.content, pieces)
    assert final.usage.input_tokens == 3, final.usage
    assert final.usage.output_tokens == len(pieces) == 5, (final.usage, len(pieces))
    assert final.stop_reason == "max_tokens", final.stop_reason
    print("ok stream", len(pieces), "deltas, final usage", final.usage.input_tokens, final.usage.output_tokens)

    count = client.messages.count_tokens(
        model=model,
        system="count these words",
        messages=[{"role": "user", "content": "and these four too"}],
    )
    assert count.input_tokens == 7, count
    print("ok count_tokens", count.input_tokens)

    long_system = " ".join(f"rule{i}" for i in range(40))
    system = [{"type": "text", "text": long_system, "cache_control": {"type": "ephemeral"}}]
    first = client.messages.create(
        model=model, max_tokens=4, system=system, messages=[{"role": "user", "content": "first"}]
    )
    client_b = anthropic.Anthropic(base_url=base_b, api_key=key, max_retries=0, timeout=30)
    second = client_b.messages.create(
        model=model, max_tokens=4, system=system, messages=[{"role": "user", "content": "second"}]
    )
    assert first.usage.cache_creation_input_tokens == 40, first.usage
    assert first.usage.cache_read_input_tokens == 0, first.usage
    assert second.usage.cache_read_input_tokens == 40, second.usage
    assert second.usage.input_tokens == 1, second.usage
    print("ok cache", first.usage.cache_creation_input_tokens, second.usage.cache_read_input_tokens)

    if "unknown_model" not in skip:
        try:
            client.messages.create(
                model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
        except anthropic.NotFoundError as e:
            assert e.body["type"] == "error", e.body
            assert e.body["error"]["type"] == "not_found_error", e.body
            print("ok unknown model ->", e.status_code, e.body["error"]["type"])
        else:
            raise AssertionError("an unknown model must be a 404 not_found_error")

    bad = anthropic.Anthropic(base_url=base, api_key="wrong-key", max_retries=0, timeout=30)
    try:
        bad.messages.create(model=model, max_tokens=8, messages=[{"role": "user", "content": "x"}])
    except anthropic.AuthenticationError as e:
        assert e.body["error"]["type"] == "authentication_error", e.body
        print("ok bad key ->", e.status_code, e.body["error"]["type"])
    else:
        raise AssertionError("a wrong key must be a 401 authentication_error")

    if "models" not in skip:
        info = client.models.retrieve(model)
        assert info.id == model, info
        print("ok models.retrieve", info.id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
