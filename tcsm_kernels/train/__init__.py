"""The reference training app (the `tcsm` command): model, data, pre-training, evaluation,
sampling, post-training (AR teacher, distillation, reward fine-tuning) and the CLI.

Imports run one way: this package uses the library (tcsm_kernels.*), nothing in the library
imports this package (tests/test_imports.py checks it, and that the modules here form no
import cycle).
"""
