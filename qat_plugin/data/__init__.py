"""Reading calibration and evaluation data; the Fashion-MNIST demo data."""
