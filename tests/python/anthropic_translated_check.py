"""The official `anthropic` Python SDK against a model served by an `openai`
backend: the proxy translates each Messages request to a chat completion and
the answer (JSON or SSE) back into Messages.

Run by tests/tests/translation.rs. Environment:
  CLAW_BASE_URL  proxy base URL WITHOUT /v1 (the SDK appends /v1/messages)
  CLAW_API_KEY   a client key (sent as x-api-key)
  CLAW_MODEL     a model served only by openai backends
  CLAW_ONLY      optional: comma-separated checks to run (default all:
                 stream,messages,tool); tests/tests/mock_protocols.rs runs
                 `tool` against the Anthropic mock itself to pin its shapes
Token counts are the mock's: the words of every message content (the system
prompt included, as a system message), a reply `tok0 tok1 …` capped by
max_tokens, and an automatic prefix cache (every message but the last, once
seen, of at least 4 tokens) reported as `cached_tokens`, which must come back
as `cache_read_input_tokens` with `input_tokens` the uncached rest.
Prints `ok <check> …` per check and exits non-zero on the first failure.
"""

import os
import sys

import anthropic

SYSTEM = "you are a terse assistant"  # 5 words
TOOLS = [
    {
        "name": "get_weather",
        "description": "the weather in a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
]


def main() -> int:
    client = anthropic.Anthropic(
        base_url=os.environ["CLAW_BASE_URL"],
        api_key=os.environ["CLAW_API_KEY"],
        max_retries=0,
        timeout=30,
    )
    model = os.environ["CLAW_MODEL"]
    only = set(filter(None, os.environ.get("CLAW_ONLY", "stream,messages,tool").split(",")))
    if "stream" in only:
        check_stream(client, model)
    if "messages" in only:
        check_messages(client, model)
    if "tool" in only:
        check_tool(client, model)
    return 0


def check_stream(client, model):
    pieces, kinds = [], []
    with client.messages.stream(
        model=model,
        max_tokens=5,
        system=SYSTEM,
        messages=[{"role": "user", "content": "stream please now"}],
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                pieces.append(event.delta.text)
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
    assert final.type == "message" and final.role == "assistant", final
    assert len(final.content) == 1 and final.content[0].type == "text", final.content
    assert final.content[0].text == "".join(pieces) == "tok0 tok1 tok2 tok3 tok4", (final.content, pieces)
    assert final.stop_reason == "max_tokens", final.stop_reason  # from finish_reason "length"
    # system (5) + user (3) words, nothing cached yet.
    assert final.usage.input_tokens == 8, final.usage
    assert final.usage.output_tokens == 5, final.usage
    assert not final.usage.cache_read_input_tokens, final.usage
    print("ok stream", len(pieces), "deltas, final usage", final.usage.input_tokens, final.usage.output_tokens)

    # The same system prompt again: the backend's automatic cache serves it.
    with client.messages.stream(
        model=model,
        max_tokens=3,
        system=SYSTEM,
        messages=[{"role": "user", "content": "again"}],
    ) as stream:
        final = stream.get_final_message()
    assert final.usage.cache_read_input_tokens == 5, final.usage
    assert final.usage.input_tokens == 1, final.usage
    assert final.usage.output_tokens == 3, final.usage
    print("ok stream cache", final.usage.cache_read_input_tokens, final.usage.input_tokens)


def check_messages(client, model):
    msg = client.messages.create(
        model=model,
        max_tokens=64,
        messages=[{"role": "user", "content": "say hello to the sdk"}],
    )
    assert msg.type == "message" and msg.role == "assistant", msg
    assert msg.content and msg.content[0].type == "text" and msg.content[0].text, msg
    assert msg.stop_reason == "end_turn", msg.stop_reason  # from finish_reason "stop"
    assert msg.usage.input_tokens == 5 and msg.usage.output_tokens == 16, msg.usage
    print("ok messages", msg.usage.input_tokens, msg.usage.output_tokens)


def check_tool(client, model):
    question = [{"role": "user", "content": "what is the weather in Paris"}]
    with client.messages.stream(model=model, max_tokens=64, tools=TOOLS, messages=question) as stream:
        call_msg = stream.get_final_message()
    assert call_msg.stop_reason == "tool_use", call_msg.stop_reason  # from "tool_calls"
    blocks = [b for b in call_msg.content if b.type == "tool_use"]
    assert len(blocks) == 1, call_msg.content
    call = blocks[0]
    assert call.name == "get_weather" and call.id and call.input == {"city": "x"}, call
    answer = client.messages.create(
        model=model,
        max_tokens=4,
        tools=TOOLS,
        messages=question
        + [
            {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]},
        ],
    )
    assert answer.content and answer.content[0].type == "text", answer.content
    assert answer.stop_reason == "max_tokens", answer.stop_reason
    print("ok tool stream", call.id, call.input, "->", answer.content[0].text)


if __name__ == "__main__":
    sys.exit(main())
