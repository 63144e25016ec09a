"""Measuring models: per-domain loss and lm-eval (`upcycle eval`), routing analysis (`upcycle analyze`)."""
