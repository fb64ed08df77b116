"""Evaluation: the phantom finding detector (``findings``, ``morphology``) and the metrics of
``python -m text2ct_engine.evaluate`` (``frechet``, ``intensity``, ``agreement``, ``alignment``,
``retrieval``), run over two sets of volumes by ``evaluation.evaluate``."""
