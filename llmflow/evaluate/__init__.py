"""The evaluate stage's logic: the eval split, scoring with Ray Data, metrics, comparisons."""
