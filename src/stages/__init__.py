"""The train_qat.py stages, one module each; src.pipeline runs them in order on one frozen RunContext."""
