"""Every private seam of a third-party library, one module per library, each pinned by a contract test.

No other module of ``src/`` imports a private name (``_x``) of Ultralytics, LiteRT / ai-edge-quantizer or torch.
"""
