"""Evaluation: zero-shot classification, image-text retrieval, probes, captioning, compositionality, and
their registry.

`registry` holds the Evaluator plug-in contract and runs tasks "KIND:DATA"; `zeroshot`, `retrieval`,
`probes`, `attentional`, `captioner`, `compositional` (order, swaps, sugarcrepe) and `bow` are the built-in
evaluators (each protocol a pure function over callables, plus its Evaluator class), registered here; `data`
decodes evaluation sets once; `batching` runs encoders in batches; `templates` holds prompt sets. Evaluators
never see a model class, only the evaluation contract (`registry.EvalModel`).
"""
from vlpt.eval.batching import encode_batched
from vlpt.eval import zeroshot, retrieval, probes, attentional, captioner, compositional, bow  # noqa: E402,F401  registers the built-ins, in this order

__all__ = ["encode_batched"]
