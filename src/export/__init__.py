"""Export of QAT models (ONNX QDQ, OpenVINO IR, TensorRT-ready ONNX) and their validation.

Entry points: ``src.export.pipeline.export_all`` (used by ``train_qat.py --export``) and
``src.export.validate.main`` (``validate_exports.py``). Submodules import their runtimes lazily.
"""
