"""The training loop: the one place that sequences an L3M optimizer step, and what keeps it reliable."""
