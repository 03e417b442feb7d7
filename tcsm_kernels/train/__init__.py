"""Reference training loop: model, data, pre-training, evaluation, sampling, CLI."""
