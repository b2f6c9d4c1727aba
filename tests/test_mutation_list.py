"""The mutant list of scripts/mutation_check.py stays in step with the code (the check itself runs on demand)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_mutated_line_still_exists_once(monkeypatch):
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    mc = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mc)  # dataclasses look their module up there
    spec.loader.exec_module(mc)
    assert len(mc.MUTANTS) >= 3
    assert mc.check_list() == []
    for m in mc.MUTANTS:
        assert all((ROOT / t).is_file() for t in m.test_files()), m.name
