"""Official OpenAI and Anthropic Python clients against the Umbra LLM gateway, through the
overlay (the tunneler's loopback listener). Each case prints one JSON object; the Rust test
(tests/llm_gateway.rs) judges it. Usage: python3 client.py CASE BASE_URL
"""
import json
import sys
import threading

import anthropic
import openai

case, base = sys.argv[1], sys.argv[2]
# The agent's own key: whatever it is, the gateway must drop it.
AGENT_KEY = "sk-agent-must-not-leak"
oai = openai.OpenAI(base_url=base + "/v1", api_key=AGENT_KEY, max_retries=0, timeout=20)
ant = anthropic.Anthropic(base_url=base, api_key=AGENT_KEY, max_retries=0, timeout=20)
MSG = [{"role": "user", "content": "say something short please"}]


def err(e):
    return {
        "raised": type(e).__name__,
        "status": getattr(e, "status_code", None),
        "body": getattr(e, "body", None),
        "retry_after": (e.response.headers.get("retry-after") if getattr(e, "response", None) is not None else None),
    }


def out(v):
    print(json.dumps(v))


if case == "chat":
    r = oai.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=5)
    out({"text": r.choices[0].message.content, "usage": r.usage.model_dump()})
elif case == "chat_stream":
    chunks, usage, text = 0, None, ""
    for c in oai.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=7, stream=True):
        chunks += 1
        if c.usage is not None:
            usage = c.usage.model_dump()
        for ch in c.choices:
            text += ch.delta.content or ""
    out({"text": text, "usage": usage, "chunks": chunks})
elif case == "chat_stream_usage":
    usage, text = None, ""
    for c in oai.chat.completions.create(
        model="gpt-4o-mini", messages=MSG, max_tokens=6, stream=True,
        stream_options={"include_usage": True},
    ):
        if c.usage is not None:
            usage = c.usage.model_dump()
        for ch in c.choices:
            text += ch.delta.content or ""
    out({"text": text, "usage": usage})
elif case == "denied":
    res = {}
    for m in ["gpt-4o", "no-such-model"]:
        try:
            oai.chat.completions.create(model=m, messages=MSG)
            res[m] = {"raised": None}
        except Exception as e:  # noqa: BLE001
            res[m] = err(e)
    try:
        ant.messages.create(model="claude-opus-4", max_tokens=5, messages=MSG)
        res["anthropic"] = {"raised": None}
    except Exception as e:  # noqa: BLE001
        res["anthropic"] = err(e)
    out(res)
elif case == "models":
    out({"ids": sorted(m.id for m in oai.models.list())})
elif case == "responses":
    r = oai.responses.create(model="gpt-4o-mini", input="tell me a tale", max_output_tokens=4)
    text = ""
    with oai.responses.stream(model="gpt-4o-mini", input="tell me another tale", max_output_tokens=3) as s:
        for ev in s:
            if ev.type == "response.output_text.delta":
                text += ev.delta
        final = s.get_final_response()
    out({"text": r.output_text, "usage": r.usage.model_dump(), "stream_text": text,
         "stream_usage": final.usage.model_dump()})
elif case == "messages":
    r = ant.messages.create(model="claude-3-5-haiku-latest", max_tokens=4, messages=MSG)
    text = ""
    with ant.messages.stream(model="claude-3-5-haiku-latest", max_tokens=3, messages=MSG) as s:
        for t in s.text_stream:
            text += t
        final = s.get_final_message()
    out({"text": r.content[0].text, "usage": r.usage.model_dump(), "stream_text": text,
         "stream_usage": final.usage.model_dump()})
elif case == "budget":
    res = []
    for _ in range(8):
        try:
            r = oai.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=10)
            res.append({"ok": r.usage.total_tokens})
        except Exception as e:  # noqa: BLE001
            res.append(err(e))
    out({"results": res})
elif case == "budget_midstream":
    text = ""
    try:
        # Sixty one-letter words and 50 tokens of output: more than the 70 tokens left, so the
        # gateway refuses before anything goes upstream.
        prompt = "a " * 60
        with ant.messages.stream(model="claude-3-5-haiku-latest", max_tokens=50,
                                 messages=[{"role": "user", "content": prompt}]) as s:
            for t in s.text_stream:
                text += t
        out({"raised": None, "text": text})
    except Exception as e:  # noqa: BLE001
        d = err(e)
        d["text"] = text
        out(d)
elif case == "concurrent":
    results = []
    lock = threading.Lock()

    def one():
        try:
            # fake-slow answers after 0.9 s, so the eight requests overlap whatever the load.
            r = oai.chat.completions.create(model="fake-slow", messages=MSG, max_tokens=30)
            v = {"ok": r.usage.total_tokens}
        except Exception as e:  # noqa: BLE001
            v = err(e)
        with lock:
            results.append(v)

    ts = [threading.Thread(target=one) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out({"results": results})
elif case == "disconnect":
    s = oai.chat.completions.create(model="fake-slow", messages=MSG, max_tokens=60, stream=True)
    got = 0
    for c in s:
        got += 1
        if got >= 3:
            break
    s.close()
    out({"got": got})
elif case == "rpm":
    res = []
    for _ in range(3):
        try:
            oai.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=1)
            res.append({"ok": True})
        except Exception as e:  # noqa: BLE001
            res.append(err(e))
    out({"results": res})
elif case == "upstream_fail":
    res = {}
    try:
        oai.chat.completions.create(model="fake-fail", messages=MSG)
        res["before"] = {"raised": None}
    except Exception as e:  # noqa: BLE001
        res["before"] = err(e)
    text = ""
    try:
        for c in oai.chat.completions.create(model="fake-midfail", messages=MSG, stream=True):
            for ch in c.choices:
                text += ch.delta.content or ""
        res["during"] = {"raised": None}
    except Exception as e:  # noqa: BLE001
        res["during"] = err(e)
    res["during"]["text"] = text
    out(res)
elif case == "nousage":
    r = oai.chat.completions.create(model="fake-nousage", messages=MSG, max_tokens=8)
    out({"text": r.choices[0].message.content})
elif case == "n":
    # One request asking for fifty outputs of up to 100 tokens each, then the same again.
    res = []
    for _ in range(2):
        try:
            r = oai.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=100, n=50)
            res.append({"choices": len(r.choices), "usage": r.usage.model_dump()})
        except Exception as e:  # noqa: BLE001
            res.append(err(e))
    odd = {}
    for label, n in [("string", "50"), ("fraction", 2.5), ("huge", 100000)]:
        try:
            oai.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=1, extra_body={"n": n})
            odd[label] = {"raised": None}
        except Exception as e:  # noqa: BLE001
            odd[label] = err(e)
    try:
        oai.chat.completions.create(model="gpt-4o-mini", max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/huge.png"}}]}])
        odd["image_url"] = {"raised": None}
    except Exception as e:  # noqa: BLE001
        odd["image_url"] = err(e)
    out({"results": res, "odd": odd})
elif case == "framing":
    # "hi" is one word to the gateway's old estimate and eleven tokens to the provider.
    res = []
    for _ in range(40):
        try:
            r = oai.chat.completions.create(model="fake-framing", max_tokens=5,
                                            messages=[{"role": "user", "content": "hi"}])
            res.append({"ok": r.usage.total_tokens})
        except Exception as e:  # noqa: BLE001
            res.append(err(e))
            break
    out({"results": res})
elif case == "headers":
    r = ant.messages.create(
        model="claude-3-5-haiku-latest", max_tokens=2, messages=MSG,
        extra_headers={
            "anthropic-beta": "files-api-2025-04-14,prompt-caching-2024-07-31, mcp-client-2025-04-04",
            "anthropic-version": "2099-01-01",
        })
    c = oai.chat.completions.create(model="gpt-4o-mini", max_tokens=1, messages=MSG,
                                    extra_headers={"OpenAI-Beta": "assistants=v2"})
    plain = ant.messages.create(model="claude-3-5-haiku-latest", max_tokens=2, messages=MSG)
    out({"text": r.content[0].text, "chat": c.choices[0].message.content, "plain": plain.content[0].text})
else:
    raise SystemExit("unknown case " + case)
