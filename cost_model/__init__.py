"""Analytic model of one MoE training step: time, memory and communication.

Pure functions over typed specs (see specs.py); hardware constants in data/*.json.
"""
