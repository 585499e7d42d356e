"""Limits: prices, pure budget and rate arithmetic, the state that holds counters, and the usage
journal that makes them survive restarts."""
