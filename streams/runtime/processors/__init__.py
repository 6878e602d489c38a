"""The worker's processors, one file each: what a micro-batch goes through.

ingest.py decodes, validates and de-duplicates (before any stage); then the batch stages of
``Pipeline.stages`` (stage.py says what a stage is): scorer.py, labeler.py, embedder.py,
verifiers.py; router.py decides where each pair goes. What they use lives beside this package:
curation rules in ``streams/runtime/curation/``, the retrieval index in ``streams/runtime/retrieval/``,
the code verifier's sandbox in ``streams/runtime/sandbox/``, record isolation and output encoding in
``streams/runtime/isolation.py`` and ``streams/runtime/outputs.py``.
"""
