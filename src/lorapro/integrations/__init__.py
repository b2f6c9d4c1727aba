"""Glue between the torch-only core and other libraries (imported on demand; the core never imports these).

* :mod:`lorapro.integrations.transformers` — LoRA-Pro inside ``transformers.Trainer``.
"""
