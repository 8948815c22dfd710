"""The small core every layer may use: errors, atomic file writes, progress, the timing lock, the machine's CPU."""
