"""Tests of sapiens2.losses (a package so its test_losses.py does not clash with tests/pretrain/test_losses.py)."""
