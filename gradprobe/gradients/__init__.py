"""The gradient stage: streaming per-task gradient reductions (hooks or torch.func) and their estimators."""

INTERVALS = {
    "exact": "a second pass takes each prompt's dot with its task gradient: exact jackknife intervals, "
             "about twice the cost of one pass",
    "none": "one pass (about one forward and backward): point estimates only, no intervals",
}
"""`--intervals`: how the gradient stage's uncertainty is obtained (docs/engine.md)."""
