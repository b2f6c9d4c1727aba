"""Generation: left-padded batches equal one-by-one greedy decoding, nothing inherited from the checkpoint,
stop sequences, sampling, adapters, sharding, and the vLLM guard."""

import types

import pytest
import torch

from lorapro.evaluation import generation as gen
from lorapro.evaluation.config import GenerationConfigSection

PROMPTS = [
    "Question: what is 2+2?\nAnswer:",
    "x",
    "A much longer prompt, with many more bytes in it, so that the batch needs left padding.",
    "Hi",
]


@pytest.fixture(scope="module")
def tiny():
    model, tok = gen.load_eval_model("builtin:tiny-llama", device="cpu")
    return model, tok


def settings(**kw):
    kw.setdefault("progress", False)
    kw.setdefault("max_new_tokens", 10)
    return GenerationConfigSection(**kw)


def manual_greedy(model, tok, prompt, steps):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return tok.decode(ids[0, -steps:], skip_special_tokens=True)


def test_batched_left_padding_equals_one_by_one_and_manual_greedy(tiny):
    model, tok = tiny
    batched = gen.generate(model, tok, PROMPTS, settings(batch_size=4))
    single = [gen.generate(model, tok, [p], settings(batch_size=1))[0] for p in PROMPTS]
    assert batched == single
    assert [b[0] for b in batched] == [manual_greedy(model, tok, p, 10) for p in PROMPTS]
    assert tok.padding_side == "right" or tok.padding_side == "left"  # restored, whatever it was


def test_checkpoint_sampling_settings_are_not_inherited(tiny):
    model, tok = tiny
    saved = model.generation_config
    try:
        model.generation_config = type(saved)(do_sample=True, temperature=5.0, top_k=0, repetition_penalty=3.0)
        outs = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            outs.append(gen.generate(model, tok, PROMPTS[:2], settings(batch_size=2)))
        assert outs[0] == outs[1] == [[manual_greedy(model, tok, p, 10)] for p in PROMPTS[:2]]
        cfg = gen.explicit_generation_config(tok, model, max_new_tokens=5)
        assert cfg.do_sample is False and cfg.num_beams == 1 and cfg.repetition_penalty == 1.0
    finally:
        model.generation_config = saved


def test_eos_ids_from_checkpoint_and_tokenizer(tiny):
    model, tok = tiny
    fake = types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=[7, tok.eos_token_id]))
    cfg = gen.explicit_generation_config(tok, fake, max_new_tokens=3)
    assert sorted(cfg.eos_token_id) == sorted({7, tok.eos_token_id})


def test_stop_sequences_cut_the_output(tiny):
    model, tok = tiny
    full = gen.generate(model, tok, [PROMPTS[0]], settings(max_new_tokens=12))[0][0]
    stop = full[4:6]
    cut = gen.generate(model, tok, [PROMPTS[0]], settings(max_new_tokens=12), stops=[stop])[0][0]
    assert cut == full[: full.find(stop)]
    assert gen.cut_at_stop("abc### Instruction def", ["###", "de"]) == "abc"
    assert gen.cut_at_stop("abc", []) == "abc"


def test_sampling_is_explicit_and_seeded(tiny):
    model, tok = tiny
    s = settings(do_sample=True, temperature=1.0, num_samples=3, seed=5, batch_size=2)
    a = gen.generate(model, tok, PROMPTS[:2], s)
    b = gen.generate(model, tok, PROMPTS[:2], s)
    assert a == b and all(len(x) == 3 for x in a)
    assert len(set(a[0])) > 1  # three samples of a random model at temperature 1 differ


def test_adapter_is_applied(tmp_path, tiny):
    from peft import LoraConfig, get_peft_model

    from lorapro.models import load_model_and_tokenizer

    base, tok = load_model_and_tokenizer("builtin:tiny-llama")
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = peft_model(ids).logits
    for merge in (False, True):
        loaded, _ = gen.load_eval_model("builtin:tiny-llama", str(tmp_path / "adapter"), device="cpu", merge_adapter=merge)
        with torch.no_grad():
            got = loaded(ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(tiny[0](ids).logits, expected, atol=1e-3)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        gen.load_eval_model("builtin:tiny-llama", str(tmp_path))


def test_encoder_decoder_generation():
    model, tok = gen.load_eval_model("builtin:tiny-t5", task="seq2seq", device="cpu")
    out = gen.generate(model, tok, ["classify: a", "classify: a much longer input"], settings(batch_size=2, max_new_tokens=4))
    single = [gen.generate(model, tok, [p], settings(batch_size=1, max_new_tokens=4))[0] for p in ["classify: a", "classify: a much longer input"]]
    assert out == single and all(len(o) == 1 for o in out)


def test_shard_and_merge():
    n, world = 10, 3
    shards = [gen.shard_indices(n, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    merged = gen.merge_shards(n, [(s, [f"out{i}" for i in s]) for s in shards])
    assert merged == [f"out{i}" for i in range(n)]
    with pytest.raises(RuntimeError, match="no rank"):
        gen.merge_shards(n, [(shards[0], ["x"] * len(shards[0]))])
    with pytest.raises(RuntimeError, match="two ranks"):
        gen.merge_shards(2, [([0, 1], ["a", "b"]), ([1], ["c"])])


def test_vllm_asked_for_but_missing_gives_a_clear_error(tiny):
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="vLLM is not installed.*backend=hf"):
        gen.require_vllm()
    with pytest.raises(RuntimeError, match="vLLM is not installed"):
        gen.generate(tiny[0], tiny[1], ["x"], settings(backend="vllm"), vllm_model=("builtin:tiny-llama", None, "float32"))


def test_infer_model_task():
    assert gen.infer_model_task("builtin:tiny-t5") == "seq2seq"
    assert gen.infer_model_task("builtin:tiny-llama") == "causal-lm"
    assert gen.infer_model_task("builtin:tiny-llama", classifier=True) == "seq-cls"
    assert gen.infer_model_task("anything", "seq2seq") == "seq2seq"
