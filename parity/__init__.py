"""PyTorch reference models and the layer-by-layer parity harness."""
