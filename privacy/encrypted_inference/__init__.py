"""Encrypted inference: a trained model diagnoses an image that no party sees in the clear.

Two computing parties (party 0: the hospital that holds the image, party 1: the
model owner that holds the weights) and a dealer of correlated randomness, emulated
in one process with real ring arithmetic (docs/encrypted_inference.md):

  ring.py      fixed point in Z_2^64, sharing, local truncation, float64 limb products
  channels.py  every message counted (online bytes and rounds, dealer bytes)
  dealer.py    Beaver triples, binary AND triples, doubly shared bits, from two seeds
  protocol.py  linear layers, multiplication, comparison, ReLU, tanh, pooling, argmax
  group_norm.py  GroupNorm: group statistics and a secure inverse square root
  network.py   a trained model's params shared, its secure forward (small CNNs, ResNet-18)
  service.py   load a run, encrypt-infer its images, compare with plaintext
  __main__.py  `python -m privacy.encrypted_inference --workdir=runs/x`

All ring code runs under `jax.enable_x64(True)` (ring.x64); the project's default
(x64 off) is untouched outside it.
"""
