"""Model plumbing: which modules are quantized, BN folding, the simulated-quantization
state attached to layers, and running a model over calibration data.

Imports only :mod:`mixquant.core`.
"""
