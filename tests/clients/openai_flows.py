"""The official `openai` client's flows against a running Tandem gateway.

Usage: python openai_flows.py BASE_URL MODEL

Runs chat (whole and streamed), completions, structured outputs (the
client's `parse` with a Pydantic model, and `response_format` JSON
schema), tool calls (required, streamed, a result fed back) and the
client's error classes; exits non-zero with the failing flow on stderr.
"""

import json
import sys

import openai
from pydantic import BaseModel

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
ask = [{"role": "user", "content": "What is the capital of France?"}]


def check(flow, cond, detail):
    if not cond:
        sys.exit(f"{flow}: {detail}")
    print(f"ok  {flow}")


# Chat, whole and streamed, and completions.
r = client.chat.completions.create(model=model, messages=ask, max_tokens=16, temperature=0)
text = r.choices[0].message.content
check("chat", isinstance(text, str) and text and r.usage.completion_tokens > 0, r)
parts, finish = [], None
for chunk in client.chat.completions.create(
    model=model, messages=ask, max_tokens=16, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    for c in chunk.choices:
        parts.append(c.delta.content or "")
        finish = c.finish_reason or finish
check("chat stream", "".join(parts) == text and finish in ("stop", "length"), (parts, text))
r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
check("completions", r.choices[0].text and r.usage.prompt_tokens > 0, r)


# Structured outputs: the client turns the model into a strict JSON schema
# and parses the answer back into it.
class City(BaseModel):
    name: str
    country: str


r = client.chat.completions.parse(
    model=model, messages=[{"role": "user", "content": "Name a city in Japan."}],
    response_format=City, max_tokens=100, temperature=0,
)
parsed = r.choices[0].message.parsed
check("structured parse", isinstance(parsed, City) and r.choices[0].finish_reason == "stop", r)
schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
          "additionalProperties": False}
r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "What is 6 times 7?"}], max_tokens=60,
    response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}},
)
check("structured json_schema", isinstance(json.loads(r.choices[0].message.content)["answer"], int), r)

# Tool calls: required, then streamed, then the result fed back.
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
weather = [{"role": "user", "content": "What is the weather in Paris?"}]
r = client.chat.completions.create(model=model, messages=weather, tools=tools, tool_choice="required",
                                   max_tokens=80, temperature=0)
calls = r.choices[0].message.tool_calls
check("tool call", calls and calls[0].function.name == "get_weather"
      and "city" in json.loads(calls[0].function.arguments)
      and r.choices[0].finish_reason == "tool_calls", r)
acc = {}
for chunk in client.chat.completions.create(model=model, messages=weather, tools=tools,
                                            tool_choice="required", max_tokens=80, temperature=0,
                                            stream=True):
    for c in chunk.choices:
        for t in c.delta.tool_calls or []:
            e = acc.setdefault(t.index, {"name": "", "arguments": ""})
            e["name"] += (t.function.name or "") if t.function else ""
            e["arguments"] += (t.function.arguments or "") if t.function else ""
check("tool call stream", acc and acc[0]["name"] == "get_weather"
      and acc[0]["arguments"] == calls[0].function.arguments, (acc, calls))
history = weather + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0].id, "type": "function",
         "function": {"name": "get_weather", "arguments": calls[0].function.arguments}}]},
    {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 21, "sky": "sunny"}'},
]
r = client.chat.completions.create(model=model, messages=history, tools=tools, max_tokens=24, temperature=0)
check("tool result", r.choices[0].finish_reason in ("stop", "length", "tool_calls"), r)

# Errors arrive as the client's exception classes.
try:
    client.chat.completions.create(model="no-such-model", messages=ask)
    check("unknown model", False, "accepted")
except openai.NotFoundError:
    check("unknown model", True, "")
try:
    client.chat.completions.create(model=model, messages=ask, tools=tools,
                                   tool_choice={"type": "function", "function": {"name": "nope"}})
    check("bad tool_choice", False, "accepted")
except openai.BadRequestError as e:
    check("bad tool_choice", e.body and e.body.get("param") == "tool_choice", e.body)
print("all flows passed")
