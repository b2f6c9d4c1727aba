"""The optimizer core must import with torch alone."""

import subprocess
import sys


def test_core_imports_without_transformers_or_peft():
    code = (
        "import sys\n"
        "for name in ('transformers', 'peft', 'accelerate', 'deepspeed', 'yaml'):\n"
        "    sys.modules[name] = None  # any import of these now raises ImportError\n"
        "import lorapro, lorapro.diagnostics, lorapro.reference\n"
        "from lorapro import LoRAProAdamW, LoRAProSGD, lora_pairs\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
