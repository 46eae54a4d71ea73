"""`megatronlite plan`: every legal layout of a config on N GPUs, its memory per GPU and its step time.

layout.py    the layouts (one legality rule: config.validate_layout) and a rank's mesh without processes
memory.py    bytes per GPU: weights, gradients and Adam states from the real model built on the meta
             device and the real DataParallel buckets; activations from a per-layer formula
hardware.py  GPU and network constants (with sources), the allowance, the calibration file
steptime.py  compute, collectives, pipeline bubble, DP overlap -> step time, tokens/s, MFU
cli.py       the command
"""
