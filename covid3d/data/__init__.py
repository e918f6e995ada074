"""Reading, cleaning, preprocessing CT scans; the synthetic phantom; folds; the input pipeline."""
