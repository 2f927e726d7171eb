"""The benchmark's contenders; each runs as its own process (see bench/night.py)."""
