"""Drives the OpenAI Responses API with the official `openai` Python SDK.

Run by tests/tests/openai_sdk.rs against the real proxies (and against the
mock upstream directly, to check the mock). Environment:
  CLAW_BASE_URL    base URL ending in /v1
  CLAW_BASE_URL_B  optional: a second proxy; continuation, retrieve and
                   delete go there (response ids belong to one provider
                   account: the gateway must route them to it)
  CLAW_API_KEY     a client key
  CLAW_MODEL       a model served by openai backends
Prints `ok <check> …` per check and exits non-zero on the first failure.
"""

import os
import sys

import openai


def main() -> int:
    key = os.environ["CLAW_API_KEY"]
    model = os.environ["CLAW_MODEL"]
    a = openai.OpenAI(base_url=os.environ["CLAW_BASE_URL"], api_key=key, max_retries=0, timeout=30)
    b = openai.OpenAI(
        base_url=os.environ.get("CLAW_BASE_URL_B", os.environ["CLAW_BASE_URL"]),
        api_key=key,
        max_retries=0,
        timeout=30,
    )

    resp = a.responses.create(model=model, input="say hello to the responses api")
    assert resp.object == "response" and resp.status == "completed", resp
    assert resp.output_text, resp
    assert resp.usage is not None and resp.usage.input_tokens == 6, resp.usage
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    print("ok responses", resp.id, resp.usage.input_tokens, resp.usage.output_tokens)

    types = []
    text = []
    completed = None
    stream = a.responses.create(
        model=model,
        instructions="be brief",
        input=[{"role": "user", "content": "stream it please"}],
        max_output_tokens=6,
        stream=True,
    )
    for event in stream:
        types.append(event.type)
        if event.type == "response.output_text.delta":
            text.append(event.delta)
        if event.type in ("response.completed", "response.incomplete"):
            completed = event.response
    for wanted in (
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert wanted in types, (wanted, types)
    assert types[0] == "response.created", types
    assert completed is not None and completed.usage is not None, types
    assert completed.usage.input_tokens == 5 and completed.usage.output_tokens == len(text) == 6, (
        completed.usage,
        text,
    )
    print("ok responses stream", " ".join(sorted(set(types))))

    follow = b.responses.create(
        model=model, previous_response_id=resp.id, input=[{"role": "user", "content": "and again"}]
    )
    assert follow.previous_response_id == resp.id, follow
    # The stored conversation counts as input, and it is the cached prefix.
    expected_input = resp.usage.input_tokens + resp.usage.output_tokens + 2
    assert follow.usage.input_tokens == expected_input, (follow.usage, expected_input)
    assert follow.usage.input_tokens_details.cached_tokens == expected_input - 2, follow.usage
    print("ok responses continue", follow.usage.input_tokens, follow.usage.input_tokens_details.cached_tokens)

    got = b.responses.retrieve(resp.id)
    assert got.id == resp.id and got.output_text == resp.output_text, got
    print("ok responses retrieve", got.id)

    b.responses.delete(resp.id)
    try:
        b.responses.retrieve(resp.id)
    except openai.NotFoundError as e:
        print("ok responses delete ->", e.status_code)
    else:
        raise AssertionError("a deleted response must be a 404")

    try:
        a.responses.create(model=model, previous_response_id="resp_unknown0", input="x")
    except openai.BadRequestError as e:
        assert e.code == "previous_response_not_found", e.body
        print("ok responses unknown previous ->", e.status_code, e.code)
    except openai.NotFoundError as e:
        print("ok responses unknown previous ->", e.status_code)
    else:
        raise AssertionError("an unknown previous_response_id must fail")

    m = a.models.retrieve(model)
    assert m.id == model, m
    print("ok models.retrieve", m.id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
