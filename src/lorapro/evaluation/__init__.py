"""``lorapro eval`` / ``lorapro score`` / ``lorapro compare``: GSM8K, HumanEval, MT-Bench and GLUE.

Submodules are imported lazily so that scoring (``gsm8k``, ``humaneval``, ``sandbox``, ``glue`` metrics,
``mt_bench`` judging) works without torch or transformers; only generation needs them.

=================  ==========================================================================================
``config``         :class:`EvalConfig`, the typed config of ``lorapro eval`` (``--help`` lists every key)
``generation``     batched left-padded generation (HF ``generate`` or vLLM), sharded across ranks
``gsm8k``          the Alpaca prompt, robust answer extraction, accuracy
``humaneval``      the instruction prompt, post-processing, pass@k (unbiased estimator)
``sandbox``        running untrusted programs: own process, limits, no network, throw-away directory
``mt_bench``       FastChat answer files, single-answer grading through an OpenAI-compatible endpoint
``glue``           GLUE loaders, label words, accuracy / Matthews correlation / F1
``results``        JSON summary, readable table, side-by-side comparison
``runner``         ``run_eval(cfg)``: load the model, run one benchmark, write the files
``cli``            ``eval_main``, ``score_main``, ``compare_main``
=================  ==========================================================================================
"""
