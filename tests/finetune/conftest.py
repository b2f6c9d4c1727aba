import json
import random

import pytest


@pytest.fixture(scope="session")
def add_data(tmp_path_factory):
    """A small instruction dataset (JSONL): 'Add a and b.' -> 'a + b = c'."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "add.jsonl"
    rows = []
    for _ in range(48):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append(json.dumps({"instruction": f"Add {a} and {b}.", "output": f"{a} + {b} = {a + b}"}))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def capture_runs(monkeypatch):
    """Spy on lorapro.finetune.runner.run_training so a test driving the real CLI also gets the RunResult."""
    import lorapro.finetune.runner as runner

    results = []
    real = runner.run_training

    def spy(cfg, **kwargs):
        r = real(cfg, **kwargs)
        results.append(r)
        return r

    monkeypatch.setattr(runner, "run_training", spy)
    return results


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one intra-op thread is fastest, and with several processes sharing 2 cores a
    second OpenMP thread spin-waits and makes each step up to 100x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def _tokenized_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenized")


@pytest.fixture(autouse=True)
def tokenized_cache(monkeypatch, _tokenized_cache):
    """The tokenization cache of these tests lives in the session's temporary directory, not in ~/.cache."""
    import lorapro.finetune.data as data

    monkeypatch.setattr(data, "tokenized_cache_dir", lambda: _tokenized_cache)
    return _tokenized_cache
