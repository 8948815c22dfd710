"""Statistics on predictions: metrics with group-bootstrap intervals, paired comparisons, thresholds."""
