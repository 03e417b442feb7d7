"""One module per fused op: custom-op registration, fake kernel, autograd, dispatch."""
