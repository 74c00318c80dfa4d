"""One round of secure aggregation (Bonawitz et al. 2017; SecAgg+ graphs), emulated for real.

Only the network is simulated; every number the protocol computes is computed:

  0. setup (`begin_round`, once per round): each hospital's secrets from its key (a
     key-agreement secret sk_u, a self-mask seed b_u), public keys, the neighbour graph
     (graph.py), the Shamir shares of (sk_u, b_u) dealt to u and its neighbours (t of them
     reconstruct), and who drops: before sending its masked input (U2 minus U3) or after it
     (U3 minus U5), drawn from the round's generator. If a secret the server will need has
     fewer than t shares among the survivors, `SecureAggregationError` (never a wrong sum).
  1. hospitals (`chunk_sums`, inside the compiled block program, vmapped): clip the delta to
     the encoding range, weight it, rotate it (optional randomised Hadamard), quantise by
     stochastic rounding into Z_(2^b) (optionally adding a share of distributed DP noise,
     `distributed_noise`), mask: y_u = x_u + PRG(b_u) + sum_v s_uv PRG(k_uv) with
     s_uv = +1 if u < v else -1. A chunk returns the modular sum of its senders' y_u; chunk
     sums add modularly over blocks and devices, and a pair's masks cancel once both ends
     are in the sum, whichever chunks they were in.
  2. server (`unmask`, after the round): from t shares held by survivors it rebuilds b_u
     for every sender and sk_u for every hospital that dropped before sending (never both
     for one hospital), removes the self-masks and the dropped hospitals' pair masks,
     decodes the centred residues and rotates back. Weights are summed in the clear (in the
     protocol they would be one more coordinate of the secure sum).

Key agreement is emulated: pk_u = H(sk_u) and k_uv = H(min(pk_u, pk_v), max(pk_u, pk_v))
(H: threefry), computed by u from sk_u and pk_v as Diffie-Hellman would be, so the server
must rebuild sk_u to remove a dropped hospital's masks; unlike Diffie-Hellman it is not
secret from someone holding the public keys. The emulator also carries, for its report
only, the exact integer sum of the quantised plaintexts (overflow count) and their float
sum (quantisation error); the server's view is `SecureSums.masked`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from privacy import clipping
from privacy.secure_agg import encoding, graph, shamir

# Domains folded into a hospital's round key.
_SK, _SELF, _ROUNDING, _SHARES, _PUBLIC, _NOISE = 0, 1, 2, 3, 4, 5
NOISES = ("none", "gaussian", "skellam")
SKELLAM_MAX_STDDEV = 2.0**12  # the automatic scale keeps each noise share within this
_LIMBS = 4  # a threefry key is 2 uint32 words = 4 field limbs


class SecureAggregationError(RuntimeError):
  """A round cannot be unmasked: fewer than t shares of a needed secret survived."""


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static parameters of the encoding (hashable: a jit static argument)."""

  bits: int         # ring Z_(2^bits)
  scale: float      # quantisation levels per unit
  clip_norm: float  # L2 range each delta is clipped to before weighting
  rotate: bool      # randomised Hadamard rotation before quantisation
  size: int         # flat update length D
  noise: str = "none"       # each sender's distributed DP noise: NOISES
  noise_stddev: float = 0.0  # its standard deviation per coordinate, in quantisation steps

  @property
  def padded(self) -> int:
    """Length of the encoded vector: D, or the power of two the rotation works in."""
    return encoding.padded_size(self.size) if self.rotate else self.size


class ClientInputs(NamedTuple):
  """What hospital slot u holds when it masks (leading axis: slots)."""

  secret: jax.Array          # uint32 [2]: key data of u's round key (sk_u, b_u, rounding)
  slot: jax.Array            # int32: u's place in the cohort (orders the pair signs)
  neighbours: jax.Array      # int32 [K]: neighbour slots
  neighbour_keys: jax.Array  # uint32 [K, 2]: their public keys
  neighbour_ok: jax.Array    # bool [K]
  sent: jax.Array            # bool: u's masked input reaches the server
  rotation: jax.Array        # uint32 [2]: the round's rotation key (the same for all)


class SecureSums(NamedTuple):
  """A chunk's (or a round's) sums; only `masked` is the server's view."""

  masked: jax.Array  # uint32 [padded]: sum of y_u (mod 2^32, read mod 2^bits)
  high: jax.Array    # int32 [padded]: exact sum parts of the quantised plaintexts
  low: jax.Array     # int32 [padded]
  plain: jax.Array   # float32 [size]: sum of the clipped, weighted plaintexts


def _wrap(words: jax.Array) -> jax.Array:
  return jax.random.wrap_key_data(words.astype(jnp.uint32))


def _derive(secret: jax.Array, domain: int) -> jax.Array:
  return jax.random.key_data(jax.random.fold_in(_wrap(secret), domain))


def public_key(sk: jax.Array) -> jax.Array:
  """pk = H(sk), uint32 [2]."""
  return _derive(sk, _PUBLIC)


def agreed_key(sk: jax.Array, other_pk: jax.Array) -> jax.Array:
  """k_uv from u's secret and v's public key; `agreed_key(sk_v, pk_u)` is the same key."""
  own = public_key(sk)
  less = (own[0] < other_pk[0]) | ((own[0] == other_pk[0]) & (own[1] < other_pk[1]))
  lo, hi = jnp.where(less, own, other_pk), jnp.where(less, other_pk, own)
  return jax.random.fold_in(jax.random.fold_in(_wrap(lo), hi[0]), hi[1])


def mask_from_seed(seed: jax.Array, d: int, bits: int) -> jax.Array:
  """PRG(seed): the mask a seed (key) expands to, uint32 `[d]` uniform on [0, 2^bits)."""
  return jax.random.bits(seed, (d,), jnp.uint32) & encoding.ring_mask(bits)


def _signed(mask: jax.Array, positive: jax.Array) -> jax.Array:
  return jnp.where(positive, mask, jnp.uint32(0) - mask)


def masked_input(spec: Spec, x: jax.Array, inp: ClientInputs) -> jax.Array:
  """y_u = x_u + PRG(b_u) + sum_v s_uv PRG(k_uv) mod 2^bits; x uint32 [padded] (one hospital)."""
  d = x.shape[0]
  sk = _derive(inp.secret, _SK)

  def add(total, neighbour):
    v, pk, ok = neighbour
    m = mask_from_seed(agreed_key(sk, pk), d, spec.bits)
    return total + jnp.where(ok, _signed(m, inp.slot < v), jnp.uint32(0)), None

  start = x + mask_from_seed(_wrap(_derive(inp.secret, _SELF)), d, spec.bits)
  total, _ = jax.lax.scan(add, start, (inp.neighbours, inp.neighbour_keys, inp.neighbour_ok))
  return total & encoding.ring_mask(spec.bits)


def flatten(tree, clients: int) -> jax.Array:
  """`[clients, ...]` leaves -> `[clients, D]` (leaf order of `jax.tree.leaves`)."""
  return jnp.concatenate([leaf.reshape(clients, -1).astype(jnp.float32)
                          for leaf in jax.tree.leaves(tree)], axis=1)


def chunk_sums(spec: Spec, deltas, weights: jax.Array, inputs: ClientInputs) -> SecureSums:
  """The hospitals of a chunk encode and mask; the sums of what the senders send.

  Args:
    spec: the encoding.
    deltas: pytree of `[c, ...]` client deltas.
    weights: float `[c]` aggregation weights (0: padding or dropped).
    inputs: `ClientInputs` with leading axis c.
  """
  flat = flatten(deltas, weights.shape[0])

  def client(x, w, inp):
    clipped, _ = clipping.clip_tree(x, spec.clip_norm)
    x = clipped * w
    z = encoding.rotate(_wrap(inp.rotation), x) if spec.rotate else x
    noise_key = jax.random.fold_in(_wrap(inp.secret), _NOISE)
    if spec.noise == "gaussian":  # continuous baseline, before rounding
      z = z + spec.noise_stddev / spec.scale * jax.random.normal(noise_key, z.shape)
    q = encoding.quantize(jax.random.fold_in(_wrap(inp.secret), _ROUNDING), z, scale=spec.scale)
    if spec.noise == "skellam":  # on the integer grid: Poisson(mu) - Poisson(mu), var 2 mu
      mu = spec.noise_stddev**2 / 2
      a, b = jax.random.split(noise_key)
      q = q + jax.random.poisson(a, mu, q.shape) - jax.random.poisson(b, mu, q.shape)
    return x, q, masked_input(spec, encoding.to_ring(q, bits=spec.bits), inp)

  x, q, y = jax.vmap(client)(flat, weights, inputs)
  sent = inputs.sent[:, None]
  q = jnp.where(sent, q, 0)
  high, low = encoding.exact_sum_parts(q)
  return SecureSums(jnp.sum(jnp.where(sent, y, jnp.uint32(0)), axis=0, dtype=jnp.uint32),
                    high, low, jnp.sum(jnp.where(sent, x, 0.0), axis=0))


class RoundPlan(NamedTuple):
  """The host's view of a round: who is in it, the graph, who dropped, the threshold."""

  n: int                  # hospitals in the cohort (slots 0..n-1)
  graph: graph.Graph      # [capacity, K]
  sent: np.ndarray        # bool [capacity]: U3
  alive: np.ndarray       # bool [capacity]: U5, still there to send shares when unmasking
  threshold: int

  def stats(self) -> dict:
    sent = int(self.sent.sum())
    return {"secagg_survivors": int(self.alive.sum()),
            "secagg_dropped_before": self.n - sent,
            "secagg_dropped_after": sent - int(self.alive.sum())}


def plan_round(rng: np.random.Generator, *, n: int, capacity: int, neighbours: int,
               threshold: int, dropout_before: float, dropout_after: float,
               round_index: int) -> RoundPlan:
  """Draws the round's graph and dropouts; raises `SecureAggregationError` if unrecoverable.

  Dropouts come first from `rng` (`draw_dropouts`, independent of `capacity`), then the
  graph. The server needs b_u for every sender and sk_u for every hospital that dropped
  before sending but has a sending neighbour, each from t shares held by survivors (u and
  its neighbours hold u's shares); and at least t inputs.
  """
  pad = lambda a: np.concatenate([a, np.zeros(capacity - n, bool)])
  sent, alive = (pad(a) for a in draw_dropouts(rng, n, dropout_before, dropout_after))
  g = graph.neighbour_graph(rng, n=n, capacity=capacity, k=neighbours)
  plan = RoundPlan(n, g, sent, alive, threshold)
  check_round(plan, round_index)
  return plan


def draw_dropouts(rng: np.random.Generator, n: int, before: float,
                  after: float) -> tuple[np.ndarray, np.ndarray]:
  """`(sent, alive)`, bool [n]: each hospital drops before sending with probability `before`,
  else after sending with probability `after`. Depends on n only (not on padding), so the
  senders of a round can be replayed from the config (`fedsim.aggregation.round_senders`).
  """
  u = rng.random((2, n))
  sent = u[0] >= before
  return sent, sent & (u[1] >= after)


def surviving_noise_multiplier(noise_multiplier: float, *, senders: int, threshold: int) -> float:
  """The noise multiplier the accountant charges a round of distributed noise with `senders`.

  Each share is sized so that t - 1 shares carry `noise_multiplier` (`distributed_noise`). A
  released sum that involves a given hospital has >= t senders, the others' shares at least
  max(senders - 1, t - 1) of them, whether the hospital was among the senders or not
  (docs/secure_aggregation.md): z sqrt(max(m - 1, t - 1) / (t - 1)).

  >>> surviving_noise_multiplier(1.0, senders=10, threshold=4)
  1.7320508075688772
  >>> surviving_noise_multiplier(1.0, senders=0, threshold=4)  # an empty cohort
  1.0
  """
  return float(noise_multiplier * np.sqrt(max(senders - 1, threshold - 1) / (threshold - 1)))


def check_round(plan: RoundPlan, round_index: int) -> None:
  """Raises `SecureAggregationError` unless the survivors of `plan` can unmask its sum."""
  g, sent, alive, threshold, n = plan.graph, plan.sent, plan.alive, plan.threshold, plan.n
  cohort = np.arange(sent.shape[0]) < n
  holders = alive.astype(np.int64) + (alive[g.neighbours] & g.valid).sum(1)
  needed = sent | (cohort & (sent[g.neighbours] & g.valid).any(1))
  short = needed & (holders < threshold)
  if n and (short.any() or sent.sum() < threshold):  # an empty cohort sends nothing
    s = plan.stats()
    raise SecureAggregationError(
        f"secure aggregation failed in round {round_index}: threshold t={threshold} not met "
        f"(cohort {n}, dropped before sending {s['secagg_dropped_before']}, after "
        f"sending {s['secagg_dropped_after']}, survivors {s['secagg_survivors']}; "
        f"{int(short.sum())} hospital(s) whose secret has fewer than t shares among survivors, "
        f"fewest {int(holders[needed].min()) if needed.any() else 0})")


class RoundSecrets(NamedTuple):
  """Device side of the setup: secrets, public keys and dealt shares of every slot."""

  secret: jax.Array  # uint32 [capacity, 2]
  public: jax.Array  # uint32 [capacity, 2]
  shares: jax.Array  # uint32 [capacity, K + 1, 2 * _LIMBS]: u's shares, holder u then its
                     # neighbours (x = 1..K+1): limbs of sk_u, then of b_u


def _secret_limbs(secret: jax.Array) -> jax.Array:
  """Field limbs [2 * _LIMBS] of (sk_u, b_u)."""
  return jnp.concatenate([shamir.words_to_field(_derive(secret, _SK)),
                          shamir.words_to_field(_derive(secret, _SELF))])


@functools.partial(jax.jit, static_argnames="holders")
def deal(secrets: jax.Array, threshold: jax.Array, *, holders: int) -> RoundSecrets:
  """Public keys and Shamir shares (t of `holders`) of every slot's (sk_u, b_u).

  Args:
    secrets: uint32 [capacity, 2], key data of each slot's round key.
    threshold: t (traced: one compilation for every t).
    holders: K + 1 (u and its K neighbour slots).
  """
  def one(secret):
    shares = shamir.share_traced(jax.random.fold_in(_wrap(secret), _SHARES),
                                 _secret_limbs(secret), n=holders, t=threshold)
    return public_key(_derive(secret, _SK)), shares

  public, shares = jax.vmap(one)(secrets)
  return RoundSecrets(secrets, public, shares)


def client_inputs(spec: Spec, plan: RoundPlan, secrets: RoundSecrets,
                  rotation: jax.Array) -> ClientInputs:
  """Every slot's `ClientInputs` (slice a block's slots out of it)."""
  capacity = plan.sent.shape[0]
  neighbours = jnp.asarray(plan.graph.neighbours)
  return ClientInputs(
      secrets.secret, jnp.arange(capacity, dtype=jnp.int32), neighbours,
      secrets.public[neighbours], jnp.asarray(plan.graph.valid), jnp.asarray(plan.sent),
      jnp.broadcast_to(jax.random.key_data(rotation), (capacity, 2)))


@functools.partial(jax.jit, static_argnames="bits")
def unmask(bits: int, masked: jax.Array, secrets: RoundSecrets, neighbours: jax.Array,
           neighbour_ok: jax.Array, in_cohort: jax.Array, sent: jax.Array, alive: jax.Array,
           threshold: jax.Array) -> jax.Array:
  """The server's step: sum of the senders' x_u mod 2^bits, uint32 [padded].

  For each slot u it takes the first t shares held by survivors (u, then its neighbours),
  interpolates b_u if u sent, else sk_u, and removes PRG(b_u), or, for a hospital that
  dropped before sending, the pair masks s_vu PRG(k_uv) its sending neighbours v added.
  """
  d = masked.shape[0]

  def correction(u):
    holder_ok = jnp.concatenate([in_cohort[u][None], neighbour_ok[u]])
    holder_ok &= alive[jnp.concatenate([u[None], neighbours[u]])]
    first = holder_ok & (jnp.cumsum(holder_ok) <= threshold)
    shares = secrets.shares[u]
    limbs = jnp.where(sent[u], shares[:, _LIMBS:], shares[:, :_LIMBS])
    x = jnp.arange(1, shares.shape[0] + 1)
    secret = shamir.field_to_words(shamir.reconstruct_subset(x, limbs, first))
    self_mask = mask_from_seed(_wrap(secret), d, bits)

    def add(total, neighbour):
      v, ok = neighbour
      m = mask_from_seed(agreed_key(secret, secrets.public[v]), d, bits)
      # v's input holds s_vu m: +m if v < u.
      return total + jnp.where(ok & sent[v], _signed(m, v < u), jnp.uint32(0)), None

    pairs, _ = jax.lax.scan(add, jnp.zeros((d,), jnp.uint32), (neighbours[u], neighbour_ok[u]))
    return jnp.where(sent[u], self_mask, jnp.where(in_cohort[u], pairs, jnp.uint32(0)))

  slots = jnp.arange(in_cohort.shape[0])
  total = masked - jnp.sum(jax.vmap(correction)(slots), axis=0, dtype=jnp.uint32)
  return total & encoding.ring_mask(bits)


@functools.partial(jax.jit, static_argnames="spec")
def decode(spec: Spec, total: jax.Array, rotation: jax.Array) -> jax.Array:
  """The unmasked ring sum -> float32 [size]: centred residues / scale, rotated back."""
  z = encoding.decode(total, scale=spec.scale, bits=spec.bits)
  return encoding.unrotate(rotation, z, spec.size) if spec.rotate else z


@functools.partial(jax.jit, static_argnames="spec")
def report(spec: Spec, sums: SecureSums, decoded: jax.Array) -> dict:
  """Overflowed coordinates and relative quantisation error |decoded - plain| / |plain|."""
  err = jnp.linalg.norm(decoded - sums.plain) / jnp.maximum(jnp.linalg.norm(sums.plain), 1e-30)
  return {"secagg_overflows": encoding.overflow_from_parts(sums.high, sums.low, bits=spec.bits),
          "secagg_quantisation_error": err}


def distributed_noise(*, noise_multiplier: float, clip_norm: float, scale: float, padded: int,
                      threshold: int) -> float:
  """Each sender's noise std (quantisation steps) so that any t - 1 senders add N(0, (z D)^2).

  D = clip_norm * scale + sqrt(padded) bounds the L2 norm of a clipped update after
  stochastic rounding (each coordinate moves < 1 step), the sensitivity the accountant's
  noise multiplier z refers to. A round needs t senders, so besides the hospital whose
  presence the guarantee is about there are >= t - 1 of them (docs/secure_aggregation.md).
  """
  if threshold < 2:
    raise ValueError(f"secure_agg.threshold={threshold} must be >= 2 with distributed noise "
                     "(t - 1 other senders carry the noise)")
  sensitivity = clip_norm * scale + np.sqrt(padded)
  stddev = float(noise_multiplier * sensitivity / np.sqrt(threshold - 1))
  if stddev > 4 * SKELLAM_MAX_STDDEV:
    raise ValueError(f"secure_agg.scale={scale:g} gives each hospital a noise share of std "
                     f"{stddev:.3g} steps, > {4 * SKELLAM_MAX_STDDEV:g} (int32 Poisson draws); "
                     "use a smaller scale, or 0 to choose one")
  return stddev


def noise_scale_cap(*, noise_multiplier: float, clip_norm: float, padded: int,
                    threshold: int) -> float:
  """The scale at which a noise share's std is SKELLAM_MAX_STDDEV steps: a finer grid would
  only resolve the noise (and Poisson draws must stay in int32)."""
  cap = (SKELLAM_MAX_STDDEV * np.sqrt(threshold - 1) / noise_multiplier
         - np.sqrt(padded)) / clip_norm
  if not cap > 0:
    raise ValueError(f"secure_agg.distributed_noise needs secure_agg.threshold > "
                     f"{threshold} here: the rounding bound sqrt({padded}) of this model "
                     "leaves no room for a noise share within int32 draws")
  return float(cap)


def range_scale(*, bits: int, hospitals: int, weight: float, clip_norm: float, padded: int,
                noise_multiplier: float = 0.0, threshold: int = 2) -> float:
  """The largest scale at which `hospitals` updates of L2 norm <= weight * clip_norm, their
  rounding and (with `noise_multiplier`) 6 standard deviations of their summed distributed
  noise stay within [-2^(bits-1), 2^(bits-1)) in every coordinate.

  Raises ValueError (naming secure_agg.bits) when no scale fits.
  """
  g = 6 * np.sqrt(hospitals / max(threshold - 1, 1)) * noise_multiplier
  room = 2.0 ** (bits - 1) - 1 - hospitals - g * np.sqrt(padded)
  scale = room / (clip_norm * (hospitals * weight + g))
  if not scale > 0:
    raise ValueError(f"secure_agg.bits={bits} is too small for {hospitals} hospitals"
                     + (" and their distributed noise" if noise_multiplier else "")
                     + ": no quantisation scale fits the ring; raise it")
  return float(scale)
