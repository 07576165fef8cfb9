"""Streaming calibration: fixed-size per-tensor observers and range-selection methods.

`observers.TensorStats` summarises every value a tensor takes without keeping any of them,
and merges exactly across shards; `methods.choose_range` turns one summary into the
(lo, hi) range a quantizer needs.
"""
