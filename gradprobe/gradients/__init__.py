"""The gradient stage: per-unit gradients with torch.func, and estimators over their Gram matrix."""
