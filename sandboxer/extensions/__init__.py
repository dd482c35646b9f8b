"""Backends. ``base`` holds the contract, ``registry`` decides what may load."""
