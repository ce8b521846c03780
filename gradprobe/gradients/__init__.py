"""The gradient stage: streaming per-task gradient reductions (hooks or torch.func) and their estimators."""

INTERVALS = {
    "exact": "a second pass takes each prompt's dot with its task gradient: exact jackknife intervals, "
             "about twice the cost of one pass",
    "sketch": "one pass that also keeps a count sketch of every unit's gradient: approximate row sums, "
              "intervals widened for the sketch's error, at a small cost over one pass",
    "none": "one pass (about one forward and backward): point estimates only, no intervals",
}
"""`--intervals`: how the gradient stage's uncertainty is obtained (docs/engine.md)."""

SKETCH_DIM = 1024
"""Buckets of the per-unit count sketch of `--intervals sketch`."""
