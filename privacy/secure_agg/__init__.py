"""Secure aggregation (Bonawitz et al. 2017) emulated with real arithmetic, over hospitals.

Usable without fedsim. The server learns only the modular sum of the hospitals' encoded
updates; each piece of the protocol is a pure, jittable function over arrays:

* `encoding`: floats -> Z_(2^b) by fixed-point stochastic rounding (unbiased), back by a
  two's-complement decode, an exact overflow count, and an optional randomised Hadamard
  rotation that spreads a vector's energy so no coordinate dominates the range.
* `shamir`: t-of-n secret sharing over GF(2^31 - 1), with which the server recovers the
  seeds it needs to remove the masks of hospitals that dropped.
* `graph`: who masks with whom: the complete graph, or SecAgg+'s random k-regular graph.
* `protocol`: one round put together (setup, hospitals' masked inputs in chunks: pairwise
  masks that cancel in the sum plus a self-mask each; the server's unmasking from Shamir
  shares, dropouts, distributed DP noise and the noise that survived them), as the compiled
  round runs it (`fedsim.aggregation.SecureAggregation`, config section `secure_agg`).
"""
