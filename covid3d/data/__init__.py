"""Reading, cleaning and preprocessing CT scans; the synthetic phantom; folds; the input pipeline."""
