"""Text generation with the training model: a jitted decode loop over the (sharded) parameters.

A batch of prompts is right-aligned in a static buffer (left padding; right-padded input is moved
first), so every row's next token goes to the same slot: positions count each row's own tokens and
its padding is segment 0, never attended to. Prefill runs the prompts once and writes every layer's
keys and values into a `KVCache` of prompt + `max_new_tokens` slots; each further token then runs
alone against it. `use_cache=False` instead runs the whole buffer through the model for every token:
the slow reference the cache is tested against. Shapes are static (one compile per batch size,
prompt bucket and `Sampling`), and the loop stops early once every row has emitted a stop token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jsft import sharding
from jsft.errors import JsftError
from jsft.models import Decoder, Layout, Params
from jsft.models.attention import KVCache

PROMPT_BUCKET = 32  # prompt buffers are padded to a multiple of this, so new lengths rarely recompile
CACHE_AXES = ("layers", "batch", "sequence", "kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How tokens are picked: greedy when `temperature` is 0, else temperature and nucleus (top-p)
    sampling. A row ends after emitting one of `stop_ids` (kept) and is filled with `pad_id` after."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    use_cache: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise JsftError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise JsftError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise JsftError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class Generated:
    """Per row: the new token ids up to and including the first stop token."""

    tokens: list[list[int]]
    stopped: list[bool]  # ended on a stop token (else on max_new_tokens)


def pad_prompts(prompts: Sequence[Sequence[int]], side: str = "left") -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [batch, length rounded up to PROMPT_BUCKET], padded on `side` ("left" or "right")."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise JsftError("every prompt needs at least one token")
    length = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
    ids = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        where = slice(length - len(prompt), length) if side == "left" else slice(0, len(prompt))
        ids[row, where], mask[row, where] = prompt, 1
    return ids, mask


# --- the decode loop (traced inside jit) -------------------------------------------------------------

Advance = Callable[[object, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, object]]


def _cached_advance(model: Decoder) -> Advance:
    """Runs new tokens against the cache (which knows their slot): the last token's logits, the cache."""

    def advance(cache: KVCache, tokens, positions, segment_ids, slot):
        hidden, cache = model.hidden_states(tokens, positions, segment_ids, cache)
        cache = dataclasses.replace(
            cache,
            keys=sharding.constrain(cache.keys, CACHE_AXES),
            values=sharding.constrain(cache.values, CACHE_AXES),
        )
        return model.logits_from_hidden(hidden[:, -1:])[:, 0], cache

    return advance


def _full_advance(model: Decoder) -> Advance:
    """Writes new tokens into the (ids, positions, segment ids) buffers at `slot` and runs all of them."""

    def advance(buffers, tokens, positions, segment_ids, slot):
        new = (tokens, positions, segment_ids)
        buffers = tuple(
            jax.lax.dynamic_update_slice(b, x, (0, slot)) for b, x in zip(buffers, new, strict=True)
        )
        hidden = model.hidden_states(*buffers)
        last = jax.lax.dynamic_slice_in_dim(hidden, slot + tokens.shape[1] - 1, 1, axis=1)
        return model.logits_from_hidden(last)[:, 0], buffers

    return advance


def _start(model: Decoder, batch: int, slots: int, use_cache: bool) -> tuple[Advance, object]:
    if use_cache:
        return _cached_advance(model), KVCache.empty(model.cfg, batch, slots)
    return _full_advance(model), tuple(jnp.zeros((batch, slots), jnp.int32) for _ in range(3))


def pick(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token ids [batch] from logits [batch, vocab]: argmax, or a draw from the tempered
    distribution cut to the smallest set of tokens whose probability reaches `top_p`."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
        kept = jnp.sum(before < sampling.top_p, axis=-1, keepdims=True)  # at least 1
        cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _is_stop(tokens: jax.Array, sampling: Sampling) -> jax.Array:
    return jnp.isin(tokens, jnp.asarray(sampling.stop_ids or (-1,), jnp.int32))


def _right_aligned(ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(ids, positions, segment ids, lengths) with each row's tokens moved to the end of the buffer."""
    width = ids.shape[1]
    lengths = jnp.sum(mask, axis=1).astype(jnp.int32)
    first = jnp.argmax(mask, axis=1).astype(jnp.int32)  # a row's first token (left or right padded)
    slot = jnp.arange(width, dtype=jnp.int32)[None]
    offset = (width - lengths)[:, None]  # the slot of each row's first token once aligned
    inside = slot >= offset
    source = jnp.clip(slot - offset + first[:, None], 0, width - 1)
    aligned = jnp.where(inside, jnp.take_along_axis(ids, source, axis=1), 0)
    positions = jnp.where(inside, slot - offset, 0)
    return aligned, positions, inside.astype(jnp.int32), lengths


def prefill(model: Decoder, ids: jax.Array, mask: jax.Array, key: jax.Array, sampling: Sampling):
    """Runs the prompts: (first new tokens, decode state, prompt lengths)."""
    batch, width = ids.shape
    advance, state = _start(model, batch, width + sampling.max_new_tokens, sampling.use_cache)
    aligned, positions, segment_ids, lengths = _right_aligned(ids, mask)
    logits, state = advance(state, aligned, positions, segment_ids, jnp.int32(0))
    return pick(logits, key, sampling), state, lengths


def decode_step(model: Decoder, state, previous: jax.Array, i: jax.Array, lengths, width: int, key, sampling):
    """Feeds the tokens of step i - 1 (at slot width + i - 1) and picks those of step i."""
    advance = _cached_advance(model) if sampling.use_cache else _full_advance(model)
    ones = jnp.ones_like(previous)[:, None]
    logits, state = advance(state, previous[:, None], (lengths + i - 1)[:, None], ones, width + i - 1)
    return pick(logits, key, sampling), state


def decode(model: Decoder, ids: jax.Array, mask: jax.Array, key: jax.Array, sampling: Sampling):
    """New tokens [batch, max_new_tokens] (pad_id after a row's stop token) for prompts (ids, mask)."""
    batch, width = ids.shape
    key, sub = jax.random.split(key)
    first, state, lengths = prefill(model, ids, mask, sub, sampling)
    out = jnp.full((batch, sampling.max_new_tokens), sampling.pad_id, jnp.int32).at[:, 0].set(first)

    def body(carry):
        i, state, out, done, key = carry
        key, sub = jax.random.split(key)
        previous = jax.lax.dynamic_index_in_dim(out, i - 1, axis=1, keepdims=False)
        token, state = decode_step(model, state, previous, i, lengths, width, sub, sampling)
        token = jnp.where(done, sampling.pad_id, token)
        out = jax.lax.dynamic_update_index_in_dim(out, token, i, axis=1)
        return i + 1, state, out, done | _is_stop(token, sampling), key

    def more(carry) -> jax.Array:
        return (carry[0] < sampling.max_new_tokens) & ~jnp.all(carry[3])

    carry = (jnp.int32(1), state, out, _is_stop(first, sampling), key)
    return jax.lax.while_loop(more, body, carry)[2]


# --- the compiled entry points ------------------------------------------------------------------------


class Generator:
    """Generation for one model layout on one mesh. Parameters stay where they are (sharded as in
    training, their shardings taken from the arrays); prompts and results are replicated. A LoRA
    run's trained `params` and frozen `base` are joined as in the train step (the layout knows the
    factors)."""

    def __init__(self, layout: Layout, mesh: Mesh):
        self.layout, self.mesh = layout, mesh
        self._compiled: dict[tuple, Callable] = {}

    def _model(self, params: Params, base: Params | None) -> Decoder:
        return self.layout.merge(params if base is None else {**base, **params})

    def _jit(
        self, name: str, fn: Callable, sampling: Sampling, args: str, weights: tuple, static: tuple = ()
    ) -> Callable:
        """`fn(model, *args, *static)` compiled once per (name, sampling, static), under the mesh.

        `weights` (params, base) give the parameter shardings. `args` has one letter per argument after
        them: "r" replicated (host inputs), "s" a decode state, left where the model's constraints put
        it. Outputs are replicated for "decode".
        """
        key = (name, sampling, static)
        if key not in self._compiled:

            def traced(params, base, *args):
                with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
                    return fn(self._model(params, base), *args, *static)

            replicated = sharding.replicated(self.mesh)
            self._compiled[key] = jax.jit(
                traced,
                in_shardings=(
                    *jax.tree.map(lambda a: a.sharding, weights),
                    *[replicated if a == "r" else None for a in args],
                ),
                out_shardings=replicated if name == "decode" else None,
            )
        return self._compiled[key]

    def generate(
        self,
        params: Params,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling,
        *,
        base: Params | None = None,
        seed: int = 0,
    ) -> Generated:
        """New tokens for each prompt (token id lists of any lengths), in one compiled loop."""
        ids, mask = pad_prompts(prompts)
        tokens = self.generate_padded(params, ids, mask, sampling, base=base, seed=seed)
        return _trimmed(tokens, sampling)

    def generate_padded(
        self,
        params: Params,
        ids: np.ndarray,
        mask: np.ndarray,
        sampling: Sampling,
        *,
        base: Params | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        """New tokens [batch, max_new_tokens] for prompts padded on either side (mask 1 = token)."""
        weights = (params, base)
        run = self._jit(
            "decode", lambda m, i, k, key: decode(m, i, k, key, sampling), sampling, "rrr", weights
        )
        return np.asarray(jax.device_get(run(params, base, ids, mask, jax.random.key(seed))))

    def stream(
        self,
        params: Params,
        prompt: Sequence[int],
        sampling: Sampling,
        *,
        base: Params | None = None,
        seed: int = 0,
    ) -> Iterator[int]:
        """One prompt's new tokens as they are made (one compiled step per token, the state on device)."""
        ids, mask = pad_prompts([prompt])
        width = ids.shape[1]
        key, sub = jax.random.split(jax.random.key(seed))
        weights = (params, base)
        first = self._jit(
            "prefill", lambda m, i, k, key: prefill(m, i, k, key, sampling), sampling, "rrr", weights
        )
        token, state, lengths = first(params, base, ids, mask, sub)
        step = self._jit("step", _step_fn(sampling), sampling, "srrrr", weights, static=(width,))
        for i in range(sampling.max_new_tokens):
            if i:
                key, sub = jax.random.split(key)
                token, state = step(params, base, state, token, jnp.int32(i), lengths, sub)
            value = int(jax.device_get(token)[0])
            yield value
            if value in sampling.stop_ids:
                return


def _step_fn(sampling: Sampling) -> Callable:
    def step(model, state, previous, i, lengths, key, width):
        return decode_step(model, state, previous, i, lengths, width, key, sampling)

    return step


def _trimmed(tokens: np.ndarray, sampling: Sampling) -> Generated:
    rows, stopped = [], []
    for row in tokens.tolist():
        end = next((i for i, t in enumerate(row) if t in sampling.stop_ids), None)
        rows.append(row if end is None else row[: end + 1])
        stopped.append(end is not None)
    return Generated(rows, stopped)
