"""Chat with elmd from Python using the official OpenAI SDK, streaming the answer.

    pip install openai
    python clients/python_chat.py "Why is the sky blue?"

Any OpenAI client works the same way: point its base URL at the daemon's /v1.
ELMD_URL (default http://127.0.0.1:8356), ELMD_API_KEY (if the daemon needs one) and
ELMD_MODEL (default: the first model the daemon lists) configure it.
"""

import os
import sys

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("ELMD_URL", "http://127.0.0.1:8356") + "/v1",
    api_key=os.environ.get("ELMD_API_KEY", "elmd"),  # the SDK wants a key; without auth any value works
)
model = os.environ.get("ELMD_MODEL") or client.models.list().data[0].id
question = " ".join(sys.argv[1:]) or "Say hello in one sentence."

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": question}],
    max_tokens=int(os.environ.get("ELMD_MAX_TOKENS", "256")),
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
