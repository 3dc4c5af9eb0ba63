"""Drives a running Claw proxy with the official `openai` Python SDK.

Run by tests/tests/openai_sdk.rs, which starts the real control plane, proxy
and mock upstream and passes their coordinates in the environment:
  CLAW_BASE_URL  proxy base URL ending in /v1
  CLAW_API_KEY   a client key
  CLAW_MODEL     a chat model configured on the proxy
  CLAW_EMBED_MODEL  an embedding-capable model name
Prints one line per check and exits non-zero on the first failure.
"""

import os
import sys

import openai


def main() -> int:
    client = openai.OpenAI(
        base_url=os.environ["CLAW_BASE_URL"],
        api_key=os.environ["CLAW_API_KEY"],
        max_retries=0,
        timeout=30,
    )
    model = os.environ["CLAW_MODEL"]

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "say hello to the sdk"}]
    )
    assert chat.choices[0].message.content, chat
    assert chat.usage is not None and chat.usage.total_tokens > 0, chat.usage
    print("ok chat", chat.usage.total_tokens)

    pieces = []
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert pieces, "no streamed content"
    assert usage is not None and usage.completion_tokens > 0, usage
    print("ok stream", len(pieces), "chunks")

    emb = client.embeddings.create(model=os.environ["CLAW_EMBED_MODEL"], input="embed me")
    assert emb.data and len(emb.data[0].embedding) > 0, emb
    print("ok embeddings", len(emb.data[0].embedding))

    models = [m.id for m in client.models.list()]
    assert model in models, models
    print("ok models", models)

    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    except openai.NotFoundError as e:
        print("ok unknown model ->", e.status_code)
    else:
        raise AssertionError("unknown model must be a 404")

    bad = openai.OpenAI(base_url=os.environ["CLAW_BASE_URL"], api_key="wrong", max_retries=0)
    try:
        bad.models.list()
    except openai.AuthenticationError as e:
        print("ok bad key ->", e.status_code)
    else:
        raise AssertionError("a wrong key must be a 401")
    return 0


if __name__ == "__main__":
    sys.exit(main())
