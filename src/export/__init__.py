"""Export of QAT models (ONNX QDQ, OpenVINO IR, TensorRT-ready ONNX, int8 TFLite) and their validation.

Entry points: ``src.export.pipeline.export_all`` (used by ``train_qat.py --export``) and
``src.export.validate.main`` (``validate_exports.py``). Both iterate ``src.export.registry.FORMATS``; each format's
hooks live in its own module, imported on first use, and import their runtimes lazily.
"""
