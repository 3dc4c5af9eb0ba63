"""A full tool-call round trip with the official `openai` Python SDK.

Run by tests/tests/translation.rs against a proxy whose model is served by an
`anthropic` backend (the request is translated to Messages and back), and by
tests/tests/mock_protocols.rs against the mock's own chat endpoint (to pin
the mock's shapes). Environment:
  CLAW_BASE_URL  base URL ending in /v1
  CLAW_API_KEY   a client key
  CLAW_MODEL     the model to ask
Each round trip: a request offering a tool -> `tool_calls` (the mock calls
the first tool with its required properties as "x") -> the tool's result
as a `role: tool` message with the call's id -> the final text. Once as
JSON, once streamed (argument deltas reassembled, usage at the end).
Prints `ok <check> …` per check and exits non-zero on the first failure.
"""

import json
import os
import sys

import openai

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "the weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "the city"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city"],
            },
        },
    }
]
QUESTION = [
    {"role": "system", "content": "you answer with tools"},
    {"role": "user", "content": "what is the weather in Paris"},
]


def follow_up(call_id, name, arguments):
    """The conversation after the call: the assistant's call and its result."""
    return QUESTION + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "sunny and 21 degrees"},
    ]


def main() -> int:
    client = openai.OpenAI(
        base_url=os.environ["CLAW_BASE_URL"],
        api_key=os.environ["CLAW_API_KEY"],
        max_retries=0,
        timeout=30,
    )
    model = os.environ["CLAW_MODEL"]

    # JSON round trip.
    first = client.chat.completions.create(model=model, messages=QUESTION, tools=TOOLS, max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1, choice.message
    call = calls[0]
    assert call.type == "function" and call.id, call
    assert call.function.name == "get_weather", call
    assert json.loads(call.function.arguments) == {"city": "x"}, call.function.arguments
    assert first.usage is not None and first.usage.completion_tokens > 0, first.usage
    final = client.chat.completions.create(
        model=model,
        messages=follow_up(call.id, call.function.name, call.function.arguments),
        tools=TOOLS,
        max_tokens=4,
    )
    fc = final.choices[0]
    assert fc.finish_reason in ("stop", "length"), fc
    assert fc.message.content and not fc.message.tool_calls, fc.message
    assert final.usage is not None and final.usage.completion_tokens > 0, final.usage
    print("ok tools json", call.id, call.function.arguments, "->", fc.message.content)

    # Streamed round trip.
    stream = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        tools=TOOLS,
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    )
    ids, names, args, finish, usage, deltas = [], [], [], None, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                assert tc.index == 0, tc
                if tc.id:
                    ids.append(tc.id)
                if tc.function and tc.function.name:
                    names.append(tc.function.name)
                if tc.function and tc.function.arguments:
                    args.append(tc.function.arguments)
                    deltas += 1
            if c.finish_reason:
                finish = c.finish_reason
    assert finish == "tool_calls", finish
    assert len(ids) == 1 and names == ["get_weather"], (ids, names)
    arguments = "".join(args)
    assert json.loads(arguments) == {"city": "x"}, arguments
    assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0, usage
    pieces = []
    stream = client.chat.completions.create(
        model=model,
        messages=follow_up(ids[0], names[0], arguments),
        tools=TOOLS,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    finish, usage = None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            assert not c.delta.tool_calls, c.delta
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert pieces and finish in ("stop", "length"), (pieces, finish)
    assert usage is not None and usage.completion_tokens > 0, (usage, pieces)
    print("ok tools stream", ids[0], deltas, "argument deltas ->", "".join(pieces))
    return 0


if __name__ == "__main__":
    sys.exit(main())
