"""The prepare stage's logic: read sources, normalise and split records, validate, store."""
