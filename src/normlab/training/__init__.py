"""Techniques that wrap a training or test-time loop, one file per method."""
