"""End to end: the real server on loopback, driven by the official openai client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

openai = pytest.importorskip("openai")

from conftest import DOOMED_SEED, break_sampling_for_one_seed  # noqa: E402
from server_process import start_server, stop_server  # noqa: E402

from xytune.bench.serve import synthetic_prompts  # noqa: E402

KEY = "test-key"


@pytest.fixture(scope="module")
def server():
    proc, base = start_server("--api-key", KEY, "--kv-cache-gb", "0.25", "--speculative", "ngram",
                              "--num-speculative-tokens", "4")
    yield base
    stop_server(proc)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    """Plain decoding, no prefix cache: the server (speculative, prefix-cached) must match it."""
    from xytune.runtime.llm import LLM

    return LLM(dtype="float32", kv_cache_gb=0.1, enable_prefix_caching=False)


def _metric(body: str, name: str, **labels: str) -> float:
    """The value of sample ``name`` whose labels include ``labels``, read with prometheus_client's own parser
    (0.0 when absent: a counter nothing has touched yet)."""
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return 0.0


def test_models_and_completion_match_the_engine(client, reference):
    from xytune.runtime.engine.sampling import SamplingParams

    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
    out = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=20,
                                    temperature=0)
    expected = reference.generate("The capital of France is", SamplingParams(max_tokens=20, temperature=0))[0]
    assert out.choices[0].text == expected.outputs[0].text
    assert out.choices[0].finish_reason == expected.outputs[0].finish_reason == "length"
    assert out.usage.completion_tokens == 20 and out.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_speculative_greedy_equals_plain_greedy(client, server, reference):
    from xytune.runtime.engine.sampling import SamplingParams

    prompt = ("Repeat the list: red, green, blue, yellow, red, green, blue, yellow, red, green, blue, yellow, "
              "red, green, blue, yellow, red,")
    before = httpx.get(f"{server}/metrics").text
    out = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=40, temperature=0)
    expected = reference.generate(prompt, SamplingParams(max_tokens=40, temperature=0))[0].outputs[0]
    assert out.choices[0].text == expected.text
    after = httpx.get(f"{server}/metrics").text
    accepted = _metric(after, "xytune_spec_accepted_tokens_total") - _metric(before, "xytune_spec_accepted_tokens_total")
    assert accepted > 10, "a repeating list should accept many drafts"
    assert 0 < _metric(after, "xytune_spec_acceptance_rate") <= 1
    assert _metric(after, "xytune_spec_tokens_per_step") > 1


def test_a_shared_prefix_hits_the_cache(client, server):
    system = ("You are a patient tutor for high-school students. Explain each idea in two sentences, with one "
              "everyday example, and never use jargon without defining it first. ")
    before = _metric(httpx.get(f"{server}/metrics").text, "xytune_prefix_cache_hit_tokens_total")
    first = client.chat.completions.create(model="smollm2-135m", max_tokens=4, temperature=0,
                                           messages=[{"role": "system", "content": system},
                                                     {"role": "user", "content": "What is friction?"}])
    second = client.chat.completions.create(model="smollm2-135m", max_tokens=4, temperature=0,
                                            messages=[{"role": "system", "content": system},
                                                      {"role": "user", "content": "What is inertia?"}])
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 32 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < cached
    after = _metric(httpx.get(f"{server}/metrics").text, "xytune_prefix_cache_hit_tokens_total")
    assert after - before >= cached


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model="smollm2-135m", prompt="Once upon a time", max_tokens=40, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 5
    assert all(c.usage is None for c in chunks)  # usage only when asked for, as OpenAI does
    with_usage = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert with_usage[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in with_usage[:-1])
    with pytest.raises(openai.BadRequestError, match="stream_options needs stream"):
        client.completions.create(stream_options={"include_usage": True}, **kwargs)
    running = list(client.completions.create(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, **kwargs))
    counts = [c.usage.completion_tokens for c in running[:-1]]  # vLLM's extension: usage on every chunk
    assert counts == sorted(counts) and counts[-1] == whole.usage.completion_tokens and counts[0] >= 1
    assert all(c.usage.prompt_tokens == whole.usage.prompt_tokens for c in running)
    assert running[-1].choices == [] and running[-1].usage.total_tokens == whole.usage.total_tokens


def test_chat_streaming_and_not(client):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    whole = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=60, temperature=0)
    text = whole.choices[0].message.content
    assert "4" in text and whole.choices[0].finish_reason == "stop" and "<|im_end|>" not in text
    chunks = list(client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=60, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == text
    assert (chunks[0].usage.prompt_tokens, chunks[0].usage.completion_tokens) == (whole.usage.prompt_tokens, 0)
    assert chunks[-2].usage.completion_tokens == chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]}]
    joined = [{"role": "user", "content": "What is\n2+2?"}]
    from_parts, from_text = (client.chat.completions.create(model="smollm2-135m", messages=m, max_tokens=12,
                                                            temperature=0).choices[0].message.content
                             for m in (parts, joined))
    assert from_parts == from_text  # text parts join with newlines


def test_special_tokens_show_only_when_asked(client):
    """vLLM's skip_special_tokens: past an ignored end-of-turn, the special tokens stay out of the text unless
    the request keeps them; streamed text equals the whole one either way."""
    kwargs = dict(model="smollm2-135m", messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=60,
                  temperature=0)
    plain = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True}).choices[0].message.content
    shown = client.chat.completions.create(**kwargs, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    text = shown.choices[0].message.content
    assert "<|im_end|>" in text and "<|im_end|>" not in plain
    assert text.replace("<|im_end|>", "").replace("<|im_start|>", "") == plain
    streamed = client.chat.completions.create(**kwargs, stream=True,
                                              extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text


def test_stop_strings_and_seeded_sampling(client, reference):
    out = client.completions.create(model="smollm2-135m", prompt="1, 2, 3, 4, 5,", max_tokens=30, temperature=0,
                                    stop=[" 8,"])
    assert out.choices[0].finish_reason == "stop" and " 8," not in out.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2-135m", prompt="1, 2, 3, 4, 5,", max_tokens=30, temperature=0, stop=[" 8,"], stream=True))
    assert streamed == out.choices[0].text
    kept = dict(model="smollm2-135m", prompt="1, 2, 3, 4, 5,", max_tokens=30, temperature=0, stop=[" 8,"],
                extra_body={"include_stop_str_in_output": True})
    with_stop = client.completions.create(**kept).choices[0]
    assert with_stop.text == out.choices[0].text + " 8," and with_stop.finish_reason == "stop"
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **kept)) == with_stop.text
    a, b = (client.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=16, temperature=1.0, seed=3,
                                      extra_body={"top_k": 50, "ignore_eos": True}) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    # min_p 1 keeps only the most likely token: sampling at any temperature is then greedy
    greedy = client.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=16, temperature=0)
    only_top = client.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=16, temperature=1.5, seed=3,
                                         extra_body={"min_p": 1.0})
    assert only_top.choices[0].text == greedy.choices[0].text != a.choices[0].text
    # bad_words: the word never comes out, whether or not a space precedes it
    counting = dict(model="smollm2-135m", prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0)
    assert " 7" in client.completions.create(**counting).choices[0].text
    assert "7" not in client.completions.create(**counting, extra_body={"bad_words": ["7"]}).choices[0].text
    # truncate_prompt_tokens keeps the prompt's end: the same as sending those tokens
    ids = reference.tokenizer.encode("Once upon a time, in a land far away, there lived a")
    cut = client.completions.create(model="smollm2-135m", prompt="Once upon a time, in a land far away, there lived a",
                                    max_tokens=8, temperature=0, extra_body={"truncate_prompt_tokens": 5})
    assert cut.usage.prompt_tokens == 5
    assert cut.choices[0].text == client.completions.create(model="smollm2-135m", prompt=ids[-5:], max_tokens=8,
                                                            temperature=0).choices[0].text
    # a field this server does not know is accepted and unused (as OpenAI's metadata, or other servers' knobs)
    assert client.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=16, temperature=0,
                                     extra_body={"some_other_servers_knob": 3}).choices[0].text == greedy.choices[0].text


def test_bad_requests_are_4xx(client, server):
    cases = [
        dict(prompt="x", temperature=-1),
        dict(prompt="x", n=17),
        dict(prompt="x", top_p=0),
        dict(prompt="x", max_tokens=0),
        dict(prompt=[7] * 9000),
        dict(prompt=[10**8]),
    ]
    for kwargs in cases:
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="smollm2-135m", **kwargs)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2-135m", messages=[])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    bad_key = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    raw = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={
        "authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert raw.status_code == 400 and "error" in raw.json()


def test_logprobs_penalties_and_logit_bias(client, reference):
    """On the speculative server: logprobs equal the plain engine's (such requests decode without drafts),
    streamed ones add up to the whole, chat ones spell the message; penalties and bias as in the engine."""
    from xytune.runtime.engine.sampling import SamplingParams

    prompt = "Repeat: apple, pear, apple, pear, apple, pear, apple,"
    kwargs = dict(model="smollm2-135m", prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    whole = client.completions.create(**kwargs).choices[0]
    ref = reference.generate(prompt, SamplingParams(max_tokens=12, temperature=0, logprobs=3))[0].outputs[0]
    lp = whole.logprobs
    assert whole.text == ref.text and "".join(lp.tokens) == whole.text
    assert lp.token_logprobs == pytest.approx([v for v, _ in ref.logprobs], abs=1e-3)
    assert [len(t) for t in lp.top_logprobs] == [3] * 12 and all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(12)]
    chunks = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kwargs)]
    streamed = [(t, v, o) for c in chunks if c for t, v, o in zip(c.tokens, c.token_logprobs, c.text_offset)]
    assert streamed == [(t, pytest.approx(v, abs=1e-6), o)
                        for t, v, o in zip(lp.tokens, lp.token_logprobs, lp.text_offset)]
    named = client.completions.create(**kwargs, extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    assert named.tokens == [f"token_id:{t}" for t in ref.token_ids]  # vLLM's names, for tokens without text
    assert named.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-6)

    messages = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=2).choices[0]
    content = chat.logprobs.content
    assert bytes(b for t in content for b in t.bytes).decode() == chat.message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    assert client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=4,
                                          temperature=0).choices[0].logprobs is None

    bias = {reference.tokenizer.encode(" banana", add_special_tokens=False)[0]: 5.0}
    out = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=12, temperature=0,
                                    frequency_penalty=1.0, presence_penalty=0.5, logit_bias={str(k): v for k, v in bias.items()},
                                    extra_body={"repetition_penalty": 1.2})
    ref = reference.generate(prompt, SamplingParams(max_tokens=12, temperature=0, frequency_penalty=1.0,
                                                    presence_penalty=0.5, repetition_penalty=1.2, logit_bias=bias))[0].outputs[0]
    assert out.choices[0].text == ref.text != whole.text


def test_echo_scores_the_prompt_as_lm_eval_asks(client, reference):
    """lm-eval's loglikelihood request: context + continuation, echo, max_tokens 0, logprobs 1."""
    from xytune.runtime.engine.sampling import SamplingParams

    context, continuation = "The capital of France is", " Paris"
    out = client.completions.create(model="smollm2-135m", prompt=context + continuation, max_tokens=0, echo=True,
                                    logprobs=1, temperature=0)
    choice, lp = out.choices[0], out.choices[0].logprobs
    assert choice.text == context + continuation and out.usage.completion_tokens == 0
    ref = reference.generate(context + continuation, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([e[0] for e in ref.prompt_logprobs[1:]], abs=1e-3)
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    # echo with generation: the prompt, then the output, in one text and one logprobs list, streamed alike
    kwargs = dict(model="smollm2-135m", prompt=context, max_tokens=4, echo=True, logprobs=1, temperature=0)
    whole = client.completions.create(**kwargs).choices[0]
    plain = client.completions.create(model="smollm2-135m", prompt=context, max_tokens=4, temperature=0).choices[0]
    assert whole.text == context + plain.text and len(whole.logprobs.tokens) == len(ref.prompt_token_ids) - 1 + 4
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.text_offset] == \
        whole.logprobs.text_offset


def test_n_choices_streamed_and_not(client):
    """n choices are n seeded samples (choice i with seed + i): reproducible, the first equal to n=1."""
    kwargs = dict(model="smollm2-135m", prompt="My favourite animal is", max_tokens=10, temperature=1.0, seed=5,
                  extra_body={"ignore_eos": True})
    three = client.completions.create(n=3, **kwargs)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.text for c in three.choices]
    assert len(set(texts)) > 1 and three.usage.completion_tokens == 30
    assert [c.text for c in client.completions.create(n=3, **kwargs).choices] == texts
    assert client.completions.create(n=1, **kwargs).choices[0].text == texts[0]
    streamed = {0: "", 1: "", 2: ""}
    finished = []
    for chunk in client.completions.create(n=3, stream=True, **kwargs):
        c = chunk.choices[0]
        streamed[c.index] += c.text
        if c.finish_reason:
            finished.append(c.index)
    assert [streamed[i] for i in range(3)] == texts and sorted(finished) == [0, 1, 2]
    chat = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=6, temperature=0, n=2)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: the same twice


def test_a_batch_of_prompts_gets_prompt_major_choices(client):
    """OpenAI's batch form (a list of prompts, as lm-eval sends them): choice p * n + i is prompt p's i-th."""
    prompts = ["The capital of France is", "1, 2, 3,", "Roses are red,"]
    single = [client.completions.create(model="smollm2-135m", prompt=p, max_tokens=5, temperature=0) for p in prompts]
    batch = client.completions.create(model="smollm2-135m", prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in batch.choices] == list(range(6))
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in single for _ in range(2)]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in single)
    assert batch.usage.completion_tokens == 2 * sum(s.usage.completion_tokens for s in single)
    ids = client.completions.create(model="smollm2-135m", prompt=[[504, 2988, 282], [33, 28, 33]], max_tokens=3,
                                    temperature=0)
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(model="smollm2-135m", prompt=[[504, 2988, 282], [33, 28, 33]],
                                           max_tokens=3, temperature=0, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert [streamed[0], streamed[1]] == [c.text for c in ids.choices]
    for bad in ([], [""], ["a", 3]):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="smollm2-135m", prompt=bad, max_tokens=2)


def test_the_fuzzers_reproducers_are_answered_not_crashed(server):
    """Bodies the schema allows that once gave 500s (schemathesis, issue 17): a 2xx or a 400 with a message."""
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [("/v1/chat/completions", {"messages": [{"role": "tool"}], "max_tokens": 2}),
             ("/v1/chat/completions", {"messages": [{"role": "system", "content": None},
                                                    {"role": "user", "content": "Hi"}], "max_tokens": 2}),
             ("/tokenize", {"messages": [{"role": "tool"}]}),
             ("/tokenize", {"messages": [{"role": "system", "content": None}]}),
             ("/tokenize", {"messages": [], "add_generation_prompt": False, "continue_final_message": True}),
             ("/tokenize", {"messages": [], "add_generation_prompt": True}),
             ("/v1/completions", {"prompt": "", "allowed_token_ids": [0, 1, 2], "max_tokens": 2}),
             ("/v1/completions", {"prompt": "", "allowed_token_ids": [2**63 + 5], "max_tokens": 2})]
    for path, body in cases:
        r = httpx.post(f"{server}{path}", json=body, headers=auth, timeout=120)
        assert r.status_code == 200 or (r.status_code == 400 and r.json()["error"]["message"]), (path, body, r.text)


def test_tokenize_and_detokenize(server, reference):
    """vLLM's /tokenize and /detokenize: the server's own tokenizer and chat template, round trip."""
    text = "Hello, naïve world 😀"
    tok = httpx.post(f"{server}/tokenize", json={"prompt": text}).json()
    assert tok["tokens"] == reference.tokenizer.encode(text) and tok["count"] == len(tok["tokens"]) > 0
    assert tok["max_model_len"] > tok["count"]
    assert httpx.post(f"{server}/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == text
    chat = httpx.post(f"{server}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    templated = reference.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat["tokens"] == reference.tokenizer.encode(templated, add_special_tokens=False)
    for path, body in [("/tokenize", {}), ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}),
                       ("/detokenize", {"tokens": [10**9]}), ("/detokenize", {"tokens": "abc"})]:
        r = httpx.post(f"{server}{path}", json=body)
        assert r.status_code == 400 and r.json()["error"]["message"], (path, body, r.text)
    assert httpx.post(f"{server}/tokenize", json={"prompt": "x", "model": "gpt-4"}).status_code == 404


def test_chat_continues_a_prefilled_assistant_message(client, server):
    """vLLM's continue_final_message / add_generation_prompt / echo / chat_template_kwargs."""
    messages = [{"role": "user", "content": "Count from one to ten in words."},
                {"role": "assistant", "content": "one, two, three,"}]
    cont = dict(add_generation_prompt=False, continue_final_message=True)
    tokens = httpx.post(f"{server}/tokenize", json={"messages": messages, **cont}).json()["tokens"]
    prompt = httpx.post(f"{server}/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert prompt.endswith("one, two, three,")  # no end-of-turn after the prefilled text
    kwargs = dict(model="smollm2-135m", messages=messages, max_tokens=8, temperature=0)
    went_on = client.chat.completions.create(**kwargs, extra_body=cont).choices[0].message.content
    same = client.completions.create(model="smollm2-135m", prompt=tokens, max_tokens=8, temperature=0)
    assert went_on == same.choices[0].text and went_on.strip()  # the same tokens, continued
    echoed = client.chat.completions.create(**kwargs, extra_body={**cont, "echo": True}).choices[0].message.content
    assert echoed == "one, two, three," + went_on
    streamed = client.chat.completions.create(**kwargs, stream=True, extra_body={**cont, "echo": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == echoed
    # after a generation prompt the reply is a new assistant turn: nothing to echo from the user's message
    fresh = client.chat.completions.create(**{**kwargs, "messages": messages[:1]}, extra_body={"echo": True})
    assert not fresh.choices[0].message.content.startswith("Count from one")
    kept = client.chat.completions.create(**{**kwargs, "messages": messages[:1]},
                                          extra_body={"chat_template_kwargs": {"unused_flag": True}})
    assert kept.choices[0].message.content == fresh.choices[0].message.content
    bad = [(dict(extra_body={"continue_final_message": True}), "needs add_generation_prompt: false"),
           (dict(extra_body={"chat_template_kwargs": {"messages": []}}), "may not set"),
           (dict(messages=[{"role": "user", "content": ""}], extra_body=cont), "cannot be continued")]
    for override, message in bad:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(**{**kwargs, **override})


def test_unsupported_or_out_of_range_fields_are_400(client):
    for kwargs, message in [(dict(max_tokens=0), "max_tokens 0 needs echo"), (dict(best_of=2), "best_of must equal n"),
                            (dict(presence_penalty=2.5), "presence_penalty"), (dict(logprobs=21), "logprobs"),
                            (dict(logit_bias={"99999999": 1}), "outside the vocabulary"),
                            (dict(logit_bias={"7": 500}), "logit_bias"),
                            (dict(extra_body={"use_beam_search": True}), "use_beam_search is not supported"),
                            (dict(extra_body={"guided_json": {"type": "object"}}), "guided_json is not supported"),
                            (dict(extra_body={"prompt_logprobs": 1}), "prompt_logprobs is not supported"),
                            (dict(extra_body={"min_p": 1.5}), "min_p"),
                            (dict(extra_body={"allowed_token_ids": [10**9]}), "allowed_token_ids names token id"),
                            (dict(extra_body={"allowed_token_ids": []}), "allowed_token_ids must name"),
                            (dict(extra_body={"truncate_prompt_tokens": 0}), "truncate_prompt_tokens"),
                            (dict(extra_body={"bad_words": [" "]}), "bad_words must be non-blank")]:
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(**{"model": "smollm2-135m", "prompt": "x", "max_tokens": 2, **kwargs})
    chat = dict(model="smollm2-135m", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="only text content parts"):
        client.chat.completions.create(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}], **chat)
    with pytest.raises(openai.BadRequestError, match="tools are not supported"):
        client.chat.completions.create(messages=[{"role": "user", "content": "x"}], tools=[{
            "type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], **chat)
    with pytest.raises(openai.BadRequestError, match="functions are not supported"):
        client.chat.completions.create(messages=[{"role": "user", "content": "x"}], functions=[{
            "name": "f", "parameters": {"type": "object"}}], **chat)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"}, **chat)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "x"}],
                                       top_logprobs=2)


@pytest.mark.parametrize("n", [1, 3])
def test_disconnected_stream_frees_its_kv(server, n):
    headers = {"authorization": f"Bearer {KEY}"}
    total = httpx.get(f"{server}/health").json()["kv_blocks_total"]
    body = {"prompt": "Tell me a very long story.", "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
            "stream": True, "n": n}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        deadline = time.time() + 10  # the engine's gauges travel at most every 0.2 s
        while httpx.get(f"{server}/health").json()["kv_blocks_free"] == total and time.time() < deadline:
            next(lines)
        assert httpx.get(f"{server}/health").json()["kv_blocks_free"] < total
    deadline = time.time() + 30
    while time.time() < deadline:
        health = httpx.get(f"{server}/health").json()
        if health["kv_blocks_free"] == total and health["requests_active"] == 0:
            break
        time.sleep(0.2)
    assert health["kv_blocks_free"] == total and health["requests_active"] == 0


def test_bench_serve_against_the_server(server, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "xytune.cli", "bench", "serve", "--url", server, "--api-key", KEY,
                           "--sweep-rates", "2,inf", "--num-prompts", "6", "--input-len", "32", "--output-len", "8",
                           "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--save-result",
                           "--result-filename", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["backend"] == "openai" and result["model_id"] == "smollm2-135m"
    vocab = httpx.get(f"{server}/v1/models", headers={"authorization": f"Bearer {KEY}"}).json()["data"][0]["vocab_size"]
    trace = synthetic_prompts(6, 32, 8, vocab, seed=0)  # what the benchmark sent (its default seed)
    sent = (sum(len(p.prompt) for p in trace), sum(p.max_tokens for p in trace))
    assert [r["request_rate"] for r in result["rates"]] == [2.0, float("inf")]
    for r in result["rates"]:  # vllm bench serve's flat keys
        assert r["completed"] == 6 and r["failed"] == 0 and r["slo_attainment"] == 1.0
        assert 0 < r["median_ttft_ms"] <= r["p99_ttft_ms"] and r["median_tpot_ms"] > 0
        assert r["mean_e2el_ms"] > r["mean_ttft_ms"] and r["median_itl_ms"] > 0
        assert (r["total_input_tokens"], r["total_output_tokens"]) == sent  # the server's usage, summed
        assert r["total_token_throughput"] > r["output_throughput"] > 0 and r["request_goodput"] > 0
    assert result["capacity"] == float("inf")
    # the chat endpoint, one request in flight at a time: the run lasts at least the sum of their latencies
    chat = tmp_path / "chat.json"
    proc = subprocess.run([sys.executable, "-m", "xytune.cli", "bench", "serve", "--url", server, "--api-key", KEY,
                           "--rate", "inf", "--num-prompts", "3", "--input-len", "16", "--output-len", "6",
                           "--endpoint", "/v1/chat/completions", "--max-concurrency", "1", "--save-result",
                           "--result-filename", str(chat)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    one = json.loads(chat.read_text())
    assert one["backend"] == "openai-chat" and one["max_concurrency"] == 1 and one["completed"] == 3
    assert one["duration"] * 1e3 >= 0.95 * 3 * one["mean_e2el_ms"]
    bad = subprocess.run([sys.executable, "-m", "xytune.cli", "bench", "serve", "--url", "http://127.0.0.1:9",
                          "--rate", "1", "--num-prompts", "1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "cannot list models" in bad.stderr


def test_metrics_count_requests_and_latencies(client, server):
    before = httpx.get(f"{server}/metrics").text
    client.completions.create(model="smollm2-135m", prompt="Hello there", max_tokens=5, temperature=0)
    text = httpx.get(f"{server}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    model = {"model_name": "smollm2-135m"}

    def grew(name, by=1.0, **labels):
        return _metric(text, name, **labels) >= _metric(before, name, **labels) + by

    # the finished request, under xytune's names and vLLM's (model_name label) alike
    assert grew("xytune_requests_total", finished_reason="length")
    assert grew("vllm:request_success_total", finished_reason="length", **model)
    assert grew("xytune_generated_tokens_total", 5) and grew("vllm:generation_tokens_total", 5, **model)
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens"):
        assert grew(f"xytune_{name}_count") and grew(f"vllm:{name}_count", **model), name
        assert families[f"vllm:{name}"].type == "histogram"
    assert _metric(text, "vllm:e2e_request_latency_seconds_sum", **model) >= \
        _metric(text, "vllm:time_to_first_token_seconds_sum", **model)
    # tokens per step: a histogram of the quantity the xy policy sizes, one observation per step
    assert grew("xytune_step_tokens_count") and grew("vllm:iteration_tokens_total_count", **model)
    assert _metric(text, "xytune_step_tokens_count") == _metric(text, "xytune_step_seconds_count")
    # running totals are counters (rate() works), levels are gauges
    for name in ("xytune_preemptions", "vllm:num_preemptions", "xytune_prefix_cache_hit_tokens",
                 "vllm:prefix_cache_hits", "vllm:spec_decode_num_draft_tokens"):
        assert families[name].type == "counter", name
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert families[name].type == "gauge" and families[name].samples[0].labels == model, name
    assert 0 <= _metric(text, "vllm:kv_cache_usage_perc", **model) <= 1
    assert _metric(text, "xytune_cost_model_calibration_scale") > 0


def test_sigterm_drains_in_flight_requests():
    import signal
    import threading

    proc, base = start_server("--kv-cache-gb", "0.1")
    result = {}

    def call():
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 48,
                                                        "temperature": 0, "ignore_eos": True}, timeout=120)
        result["status"], result["body"] = r.status_code, r.json()

    t = threading.Thread(target=call)
    t.start()
    time.sleep(1.0)  # the request is in flight
    proc.send_signal(signal.SIGTERM)
    t.join(timeout=120)
    assert proc.wait(timeout=60) == 0  # drained, then a clean exit (uvicorn alone re-raises SIGTERM: -15)
    assert result["status"] == 200 and result["body"]["usage"]["completion_tokens"] == 48


def _engine_processes(pid: int) -> list[int]:
    """Child processes of the server that multiprocessing spawned (not its resource tracker)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(c) for c in f.read().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the engine process through /proc")
def test_a_dead_engine_process_fails_requests_instead_of_hanging_them():
    import os
    import signal

    proc, base = start_server("--kv-cache-gb", "0.1")
    try:
        (core,) = _engine_processes(proc.pid)
        body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # streaming has begun
            os.kill(core, signal.SIGKILL)
            start = time.time()
            rest = [line for line in lines if line]
        # the stream ends with an error event, well before 400 tokens and without [DONE]
        assert time.time() - start < 30
        assert "engine" in json.loads(rest[-1][len("data: "):])["error"]["message"]
        assert "data: [DONE]" not in rest
        health = httpx.get(f"{base}/health", timeout=5)
        assert health.status_code == 503 and "engine failed" in health.json()["error"]["message"]
        refused = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and "engine" in refused.json()["error"]["message"]
    finally:
        stop_server(proc)


def test_the_engine_also_runs_in_the_server_process(reference):
    from xytune.runtime.engine.sampling import SamplingParams

    proc, base = start_server("--kv-cache-gb", "0.1", "--no-engine-process")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        out = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=12,
                                        temperature=0)
        expected = reference.generate("The capital of France is", SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
        assert out.choices[0].text == expected.text
        if Path("/proc/self/task").exists():
            assert _engine_processes(proc.pid) == []
    finally:
        stop_server(proc)


def test_a_request_the_engine_fails_is_a_500_and_the_others_are_served(reference, monkeypatch):
    """Over real HTTP, a sampler that raises for one request's parameters (as a bug would): that request gets
    a 500 naming the error (an error event when streamed), the requests sharing its steps get exactly their
    text, and the server serves on."""
    from xytune.runtime.engine.async_engine import AsyncEngine
    from xytune.runtime.engine.sampling import SamplingParams
    from xytune.runtime.serve.app import build_app

    good = {"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    doomed = {**good, "temperature": 0.8, "seed": DOOMED_SEED}
    expected = reference.generate(good["prompt"], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text
    break_sampling_for_one_seed(monkeypatch)
    engine = AsyncEngine(reference.engine)
    engine.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(engine, reference.tokenizer, "smollm2-135m")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1/completions"
        with ThreadPoolExecutor(3) as pool:
            calls = [pool.submit(httpx.post, url, json=body, timeout=120) for body in (good, doomed, good)]
            first, failed, last = [c.result() for c in calls]
        assert failed.status_code == 500, failed.text
        assert "FloatingPointError" in failed.json()["error"]["message"]
        assert [r.status_code for r in (first, last)] == [200, 200]
        assert [r.json()["choices"][0]["text"] for r in (first, last)] == [expected, expected]
        with httpx.stream("POST", url, json={**doomed, "stream": True}, timeout=120) as r:
            events = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and "FloatingPointError" in json.loads(events[-1][6:])["error"]["message"]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        assert httpx.post(url, json=good, timeout=120).json()["choices"][0]["text"] == expected
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.stop()
    assert not reference.engine.requests
    assert reference.engine.kv.allocator.num_free == reference.engine.kv.num_blocks
