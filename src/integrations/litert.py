"""LiteRT and ai-edge-quantizer internals this toolkit relies on (contract-tested in tests/test_integrations.py).

Pinned: ai-edge-litert 2.3.0 and ai-edge-quantizer 0.10.0 (requirements-tflite.txt).
"""

from __future__ import annotations


def recipe_manager(quantizer):
    """The recipe manager of an ``ai_edge_quantizer.quantizer.Quantizer`` (its recipe, as loaded and updated).

    ``Quantizer.calibrate`` cannot take a range-update rule; a ``calibrator.Calibrator`` built with one needs this
    object, which ``Quantizer.calibrate`` would pass it itself.
    """
    return quantizer._recipe_manager


def ops_details(interpreter) -> list[dict]:
    """Every op of a LiteRT ``Interpreter``'s graph in execution order: ``index``, ``op_name``, ``inputs``,
    ``outputs`` (tensor indices; -1 for an omitted optional input)."""
    return interpreter._get_ops_details()
