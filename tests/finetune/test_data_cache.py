"""The tokenization cache: a second run with the same data, tokenizer, template and filters reads the examples
instead of encoding the records again (and gets exactly the same examples); anything that changes the examples
changes the key; under torchrun only one process per machine writes it."""

import json

import pytest

import lorapro.finetune.data as data
from lorapro.cli import main as lorapro_main
from lorapro.config import load_config
from lorapro.finetune.config import TrainConfig
from lorapro.models import build_byte_tokenizer


@pytest.fixture
def encodes(monkeypatch):
    """Counts calls of encode_record (one per record tokenized)."""
    calls = []
    real = data.encode_record

    def counting(record, spec, tokenizer):
        calls.append(1)
        return real(record, spec, tokenizer)

    monkeypatch.setattr(data, "encode_record", counting)
    return calls


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "tokenized_cache_dir", lambda: tmp_path / "cache")
    return tmp_path / "cache"


def _cfg(*overrides):
    return load_config(TrainConfig, None, list(overrides)).data


def _build(data_cfg, task="causal-lm", tok=None):
    return data.build_datasets(data_cfg, task, tok or build_byte_tokenizer())


def test_second_build_reads_the_cache_and_gets_the_same_examples(add_data, cache, encodes):
    cfg = _cfg(f"data.train={add_data}", "data.train_size=20", "data.eval_size=8")
    train1, eval1, summary1 = _build(cfg)
    assert len(encodes) == 28 and "(tokenized; cached in" in summary1
    train2, eval2, summary2 = _build(cfg)
    assert len(encodes) == 28  # nothing tokenized the second time
    assert "(tokenized examples from cache" in summary2
    assert train2.examples == train1.examples and eval2.examples == eval1.examples
    assert len(list(cache.glob("*.pt"))) == 1


@pytest.mark.parametrize(
    "change",
    [
        "data.template=plain",
        "data.max_tokens=400",
        "data.separator=|",
        "data.train_size=21",
        "data.filter=wizardlm-no-refusal",
        "file",
        "tokenizer",
    ],
)
def test_whatever_changes_the_examples_changes_the_key(add_data, tmp_path, cache, encodes, change):
    src = tmp_path / "d.jsonl"
    src.write_text(add_data.read_text())
    base = [f"data.train={src}", "data.train_size=20"]
    _build(_cfg(*base))
    n = len(encodes)
    tok = build_byte_tokenizer()
    if change == "file":  # same path, other content
        src.write_text(add_data.read_text().replace("Add", "Sum", 1))
    elif change == "tokenizer":
        tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    else:
        base.append(change)
    train, _, summary = _build(_cfg(*base), tok=tok)
    assert len(encodes) > n and "from cache" not in summary
    encodes.clear()
    _build(_cfg(*base), tok=tok)
    assert not encodes  # and that new result is cached in turn


def test_classification_and_seq2seq_examples_round_trip(tmp_path, cache, encodes):
    src = tmp_path / "cls.jsonl"
    src.write_text("".join(json.dumps({"sentence": f"s{i} " * (i + 1), "label": i % 3, "output": f"w{i}"}) + "\n"
                           for i in range(9)))
    for task, extra in (("seq-cls", ["model.num_labels=3"]), ("seq2seq", ["data.template=plain",
                                                                          "data.prompt_field=sentence"])):
        cfg = _cfg(f"data.train={src}", *extra)
        first, _, _ = _build(cfg, task)
        n = len(encodes)
        second, _, note = _build(cfg, task)
        assert len(encodes) == n and "from cache" in note
        assert second.examples == first.examples


def test_cache_off_and_damaged_cache(add_data, cache, encodes):
    cfg = _cfg(f"data.train={add_data}", "data.train_size=10", "data.cache=false")
    _build(cfg)
    _build(cfg)
    assert len(encodes) == 20 and not cache.exists()
    cfg = _cfg(f"data.train={add_data}", "data.train_size=10")
    first, _, _ = _build(cfg)
    (f,) = cache.glob("*.pt")
    f.write_bytes(f.read_bytes()[:100])
    again, _, note = _build(cfg)  # a damaged file is replaced, never an error
    assert again.examples == first.examples and "cached in" in note


def test_only_one_process_per_machine_writes(add_data, cache, encodes, monkeypatch):
    cfg = _cfg(f"data.train={add_data}", "data.train_size=10")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(data, "_CACHE_WAIT_S", 0.0)  # rank 0 never comes here: give up waiting at once
    _build(cfg)
    assert len(encodes) == 10 and not cache.exists()
    monkeypatch.setenv("LOCAL_RANK", "0")
    written, _, _ = _build(cfg)
    monkeypatch.setenv("LOCAL_RANK", "1")
    encodes.clear()
    read, _, note = _build(cfg)
    assert not encodes and "from cache" in note and read.examples == written.examples


def test_second_cli_run_does_not_tokenize(tmp_path, add_data, encodes, capsys):
    argv = ["train", f"data.train={add_data}", "train.max_steps=1", "train.global_batch_size=4", "data.train_size=12"]
    assert lorapro_main([*argv, f"output_dir={tmp_path / 'a'}"]) == 0
    assert len(encodes) == 12 and "(tokenized; cached in" in capsys.readouterr().out
    assert lorapro_main([*argv, f"output_dir={tmp_path / 'b'}"]) == 0
    assert len(encodes) == 12 and "(tokenized examples from cache" in capsys.readouterr().out


def test_the_other_processes_wait_for_the_writer(add_data, cache, encodes, monkeypatch, tmp_path):
    import shutil
    import threading
    import time

    cfg = _cfg(f"data.train={add_data}", "data.train_size=10")
    written, _, _ = _build(cfg)  # what the writer will produce
    (f,) = cache.glob("*.pt")
    shutil.move(f, tmp_path / "made.pt")
    marker = f.with_name(f.name + ".writing")
    marker.write_text("the writer is tokenizing")

    def writer_finishes():
        time.sleep(1.5)
        shutil.copy(tmp_path / "made.pt", f)
        marker.unlink()

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(data, "_CACHE_GRACE_S", 0.0)  # only the marker keeps this process waiting
    encodes.clear()
    threading.Thread(target=writer_finishes).start()
    read, _, note = _build(cfg)
    assert not encodes and "from cache" in note and read.examples == written.examples
    # a writer that could not write (no marker, no file): the others tokenize themselves after the grace period
    f.unlink()
    read, _, note = _build(cfg)
    assert len(encodes) == 10 and "cache" not in note and not f.exists()
