"""The official `openai` Python package against a running HCP gateway.

Usage: python openai_client.py BASE_URL TENANT_KEY ADMIN_TOKEN
Exits non-zero (an AssertionError or an unexpected exception) when the gateway does not behave as
the OpenAI API does for this client.
"""

import json
import sys
import urllib.request

import openai

base, key, admin = sys.argv[1], sys.argv[2], sys.argv[3]
root = base.rsplit("/v1", 1)[0]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=30)
model = client.models.list().data[0].id

# Non-streaming chat, and the legacy completions endpoint.
r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Is the grid tight?"}], max_tokens=16
)
assert r.object == "chat.completion", r
assert r.choices[0].message.role == "assistant"
assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens > 0, r.usage
assert len(r.choices[0].message.content.split()) == 16
c = client.completions.create(model=model, prompt="Hashprice today is", max_tokens=4)
assert c.usage.completion_tokens == 4 and c.choices[0].text.strip(), c

# Streaming, with usage in the last chunk when asked.
chunks = list(
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Stream please"}],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
)
text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
assert len(text.split()) == 24, text
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24, chunks[-1]
assert any(ch.choices and ch.choices[0].finish_reason == "length" for ch in chunks)
plain = list(
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "again"}], max_tokens=3, stream=True
    )
)
assert all(getattr(ch, "usage", None) is None for ch in plain)

# A bad key.
bad = openai.OpenAI(base_url=base, api_key="hcpk_nokey_0123456789abcdef0123456789abcdef", max_retries=0)
try:
    bad.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    raise AssertionError("a bad key was served")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.body["code"] == "invalid_api_key", e.body

# An over-long request.
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=100_000)
    raise AssertionError("an over-long request was served")
except openai.BadRequestError as e:
    assert e.body["code"] == "context_length_exceeded", e.body

# A rate limit: a key allowed one request a second (a burst of two).
req = urllib.request.Request(
    f"{root}/api/v1/tenants/demo/keys",
    data=json.dumps({"rate_per_s": 1}).encode(),
    headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"},
    method="POST",
)
slow_key = json.load(urllib.request.urlopen(req))["key"]
slow = openai.OpenAI(base_url=base, api_key=slow_key, max_retries=0)
limited = 0
for _ in range(4):
    try:
        slow.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    except openai.RateLimitError as e:
        assert e.status_code == 429 and e.response.headers.get("retry-after"), e
        limited += 1
assert limited >= 1, "no request was rate limited"
print("openai client: ok")
