"""Talks to a running `deltatune serve` (decoder) with the official `openai` Python client.

Usage: python tools/openai_client_check.py http://127.0.0.1:8080 MODEL [API_KEY]

Lists the models, runs a completion, a streamed chat completion and an error case, and prints
what came back. Needs only the `openai` package (install it in a throwaway venv).
"""

import sys

from openai import NotFoundError, OpenAI

base, model = sys.argv[1], sys.argv[2]
key = sys.argv[3] if len(sys.argv) > 3 else "none"
client = OpenAI(base_url=base.rstrip("/") + "/v1", api_key=key)

print("models:", [m.id for m in client.models.list()])

r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
print("completion:", repr(r.choices[0].text), "finish:", r.choices[0].finish_reason, "usage:", r.usage)

print("chat stream: ", end="")
for chunk in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=16, temperature=0, stream=True
):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()

try:
    client.completions.create(model="no-such-delta", prompt="x", max_tokens=1)
except NotFoundError as e:
    print("unknown model ->", e.status_code, e.body["code"] if isinstance(e.body, dict) else e.body)
