"""Continuous batching: many requests through a fixed batch of R rows, each row refilled as its request ends.

    scheduler = Scheduler(model, variables, rows=8, bos_id=tok.bos_id, pad_id=tok.pad_id)
    requests = (Request(i, tok.encode(text), max_new_tokens=256, stop_tokens=(tok.eos_id,))
                for i, text in enumerate(texts))
    for event in scheduler.serve(requests):      # requests are pulled as rows free up
        print(event.id, event.tokens, event.finished, event.reason)

``model`` is any ``DecoderLM`` (or a ``decoding.Decoder`` whose state has the ``models.state`` protocol's
``put``). The host loop alternates two kinds of jitted programs over one batch of R rows:

* Admission: while requests wait and rows are free, the oldest waiting requests (as many as rows are free)
  are grouped by prompt bucket. Each group is framed ([BOS] + ids, padded to a power of two), prefilled
  (a RetNet: left-padded, as ``generate`` frames a batch, by the chunkwise form from an empty state; a
  Transformer: right-padded, by the model's own prefill, flash attention on a GPU), its first tokens
  drawn, and its state written into the free rows with ``state.put``. A RetNet row's state has a fixed
  size, so a new request just overwrites its row: no paging. A prefill call has a power-of-two number of
  rows (unused ones are dropped) and at most ``max_prefill_tokens`` tokens (rows × width), unless one
  prompt is longer.
* Decoding: one jitted while loop of up to ``block_size`` steps of all R rows: each row draws with its own
  settings (``sampling.PerRow``) and key, counts its tokens and ends at one of its stop tokens or at its
  ``max_new_tokens``. When requests wait, the loop returns as soon as ``refill_at`` rows are free, so a
  finished row takes a new request at once.

Each request's tokens stream out as ``Event``s (id, new tokens, finished, reason) after every program.
Token i of request r is drawn with the key ``fold_in(fold_in(key(seed), r), i)`` (``token_keys``), so
what a request generates does not depend on what else shares the batch: greedy, it is what ``generate``
gives for that request alone (to within the two programs' rounding).

``static=True`` serves the same requests in static batches, the baseline continuous batching is measured
against: R requests at a time, all prefilled at the batch's longest prompt bucket, the batch decoded until
its longest output ends, then the next R.

Programs are compiled ahead of time on first use (one per prefill shape, one for decoding), while the
device is idle, and shared by schedulers of the same model and shapes; ``stats.compile_s`` is the time
spent compiling (subtract it from a wall time to get the serving time).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax.inference import decoding, sampling
from retnet_jax.inference import prompts as prompts_lib
from retnet_jax.models import lm as lm_lib

__all__ = ["Event", "Request", "Scheduler", "Stats", "token_keys"]

# Request ids are folded into the PRNG key and stored as int32.
_MAX_ID = 2**31 - 1
# Compiled programs kept (shared by schedulers of one model and shape); the oldest is dropped beyond this.
_PROGRAM_CACHE_SIZE = 128


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request.

    Attributes:
        id: an integer in [0, 2³¹) naming the request in its events; also the key of its draws.
        prompt: token ids (any length; empty = start from BOS).
        max_new_tokens: >= 1; ids generated at most.
        temperature, top_k, top_p: as ``generate``'s (temperature 0 = greedy).
        stop_tokens: ids that end the request (included in its tokens).
    """

    id: int
    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: Sequence[int] = ()


class Event(NamedTuple):
    """New tokens of one request.

    Attributes:
        id: the request's id.
        tokens: the ids generated since its last event (a stop token that ended it included).
        finished: whether the request has ended (its row is free again).
        reason: when finished, "stop" (a stop token) or "length" (max_new_tokens); else None.
    """

    id: int
    tokens: list[int]
    finished: bool
    reason: str | None = None


@dataclasses.dataclass
class Stats:
    """What a scheduler has done so far (summed over ``serve`` calls).

    Attributes:
        requests: requests admitted. generated: tokens generated (every request's, stop tokens included).
        prompt_tokens: framed prompt tokens (BOS included) prefilled. prefill_tokens: tokens the prefill
            calls ran, padding and unused rows included. prefill_calls: admission programs run.
        blocks: decoding programs run. steps: decoding steps (each over all R rows).
        row_steps: steps × R; ``(generated − requests) / row_steps`` is how busy the rows were (each
            request's first token comes from its prefill).
        compile_s: seconds spent compiling programs (a program is compiled once per shape and process).
    """

    requests: int = 0
    generated: int = 0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    prefill_calls: int = 0
    blocks: int = 0
    steps: int = 0
    row_steps: int = 0
    compile_s: float = 0.0


class _Rows(NamedTuple):
    """The batch on the device, carried (donated) from program to program. A free row is ``done``."""

    state: Any  # the decoder's state of R rows
    token: jax.Array  # [R] int32: each row's last token, not yet consumed by the state
    ids: jax.Array  # [R] int32: the row's request id
    emitted: jax.Array  # [R] int32: tokens the request has generated (the next token's index)
    limit: jax.Array  # [R] int32: its max_new_tokens
    done: jax.Array  # [R] bool: ended (or never filled)
    sampler: sampling.PerRow  # [R] settings
    stops: jax.Array  # [R, S] int32 stop ids, −1 where unused


class _New(NamedTuple):
    """The per-request inputs of an admission, one entry per prefill row."""

    ids: jax.Array  # [n] int32
    limit: jax.Array  # [n] int32
    sampler: sampling.PerRow  # [n]
    stops: jax.Array  # [n, S] int32


def token_keys(seed, ids, index):
    """The keys of token ``index`` [B] of requests ``ids`` [B]: fold_in(fold_in(key(seed), id), index).

    ``seed`` is an int or a typed PRNG key. Returns typed keys [B].
    """
    base = jax.random.key(seed) if isinstance(seed, int | np.integer) else seed
    ids, index = jnp.asarray(ids, jnp.int32), jnp.asarray(index, jnp.int32)
    return jax.vmap(lambda r, i: jax.random.fold_in(jax.random.fold_in(base, r), i))(ids, index)


def _stopped(tokens, stops):
    """[B] bool: tokens [B] is one of its row's stop ids stops [B, S]."""
    return jnp.any(tokens[:, None] == stops, axis=-1)


def _admit(decoder, max_length, whole, variables, rows: _Rows, base_key, slots, tokens, pads, new: _New):
    """Prefills the framed prompts tokens [n, W + 1] into rows ``slots`` [n] (>= R: unused) and draws each
    one's first token. Returns (rows, first tokens [n], finished [n]).

    ``whole`` (a DecoderLM with a KV cache): the prompts are right-padded, ``pads`` [n] holds their
    lengths, and the model's own stateless prefill runs them (cuDNN's flash attention on a GPU): the model
    is causal, so the pads after a prompt change nothing, and the cache's position is set back to the
    prompt's end (the pads' slots are then unused and overwritten). Otherwise the prompts are left-padded
    (``pads`` [n] pads each; they never enter the state) and the decoder prefills them from empty (a
    RetNet's chunkwise form).
    """
    if whole:
        lengths = pads
        logits, state = lm_lib.prefill(decoder.model, variables, tokens, max_length=max_length)
        logits = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [n, N]
        state = state._replace(position=lengths)
    else:
        state = decoder.init_state(pads, max_length)
        logits, state = decoder.prefill(variables, tokens, state)
    first = new.sampler(token_keys(base_key, new.ids, jnp.zeros_like(new.ids)), logits)
    finished = _stopped(first, new.stops) | (new.limit <= 1)

    def put(array, values):
        return array.at[slots].set(values, mode="drop")

    rows = _Rows(
        state=rows.state.put(slots, state),
        token=put(rows.token, first),
        ids=put(rows.ids, new.ids),
        emitted=put(rows.emitted, jnp.ones_like(new.ids)),
        limit=put(rows.limit, new.limit),
        done=put(rows.done, finished),
        sampler=jax.tree.map(put, rows.sampler, new.sampler),
        stops=put(rows.stops, new.stops),
    )
    return rows, first, finished


def _empty_rows(decoder, max_length, batch: int, stop_slots: int, pad_id: int) -> _Rows:
    """R free rows."""
    return _Rows(
        state=decoder.init_state(jnp.zeros((batch,), jnp.int32), max_length),
        token=jnp.full((batch,), pad_id, jnp.int32),
        ids=jnp.zeros((batch,), jnp.int32),
        emitted=jnp.zeros((batch,), jnp.int32),
        limit=jnp.ones((batch,), jnp.int32),
        done=jnp.ones((batch,), bool),
        sampler=sampling.PerRow(
            jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32), jnp.ones((batch,), jnp.float32)
        ),
        stops=jnp.full((batch, stop_slots), -1, jnp.int32),
    )


def _decode(decoder, width, pad_id, variables, rows: _Rows, base_key, exit_free):
    """Up to ``width`` steps of every row; stops early once every row is done or ``exit_free`` rows are.

    Returns (rows, tokens [R, width] (row b's new tokens in its first columns, pad_id after), steps).
    """
    batch = rows.token.shape[0]
    variables = decoding.prepare(decoder, variables, batch)  # once, before the loop

    def cond(loop):
        step, rows, _ = loop
        return (step < width) & ~jnp.all(rows.done) & (jnp.sum(rows.done) < exit_free)

    def body(loop):
        step, rows, out = loop
        logits, state = decoder.step(variables, rows.token, rows.state)
        token = rows.sampler(token_keys(base_key, rows.ids, rows.emitted), logits)
        active = ~rows.done
        token = jnp.where(active, token, pad_id)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
        emitted = rows.emitted + active.astype(jnp.int32)
        finished = active & (_stopped(token, rows.stops) | (emitted >= rows.limit))
        rows = rows._replace(state=state, token=token, emitted=emitted, done=rows.done | finished)
        return step + 1, rows, out

    out = jnp.full((batch, width), pad_id, jnp.int32)
    step, rows, out = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), rows, out))
    return rows, out, step


_PROGRAMS: collections.OrderedDict = collections.OrderedDict()


def _signature(args) -> tuple:
    """What a compiled program is specialised to: the pytree structure, shapes and dtypes of its arguments."""
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((x.shape, x.dtype) for x in leaves)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class Scheduler:
    """Serves requests through a fixed batch of ``rows`` rows (continuous batching; see the module doc).

    Args:
        model: a ``DecoderLM`` (RetNet or Transformer) or a ``decoding.Decoder`` whose state has ``put``.
        variables: the model's variables.
        rows: R, the rows decoded together.
        bos_id, pad_id: the tokenizer's ids.
        max_length: the most tokens a row holds (BOS, prompt and generated ids): a KV cache's size, needed
            for a Transformer. A RetNet's state has no bound and ignores it.
        seed: the base of every request's key (``token_keys``).
        block_size: decoding steps per program at most (between two looks at the rows from the host).
        max_stop_tokens: stop ids a request may have at most (the width of the per-row stop table).
        max_prefill_tokens: rows × width of a prefill call at most (a longer prompt is prefilled alone).
        refill_at: when requests wait, a decoding program returns once this many rows are free.
        static: serve in static batches (the baseline; see the module doc).
        prefill_mode, chunk_size: the form that consumes a RetNet's prompts and its chunk size.
        state_dtype: None (the model's own decoding state) or "bfloat16" (a RetNet state stored in bf16:
            half the bytes per row; see ``generate``).

    Raises:
        ValueError: a bad argument, or a Transformer without ``max_length``.
    """

    def __init__(
        self,
        model,
        variables,
        *,
        rows: int,
        bos_id: int,
        pad_id: int,
        max_length: int | None = None,
        seed: int = 0,
        block_size: int = 16,
        max_stop_tokens: int = 8,
        max_prefill_tokens: int = 8192,
        refill_at: int = 1,
        static: bool = False,
        prefill_mode: str = "chunkwise",
        chunk_size: int | None = None,
        state_dtype: str | None = None,
    ):
        decoder = decoding.as_decoder(
            model,
            prefill_mode=prefill_mode,
            chunk_size=chunk_size,
            state_dtype=state_dtype,
            caller="Scheduler",
        )
        for name, value in (
            ("rows", rows),
            ("block_size", block_size),
            ("max_stop_tokens", max_stop_tokens),
            ("max_prefill_tokens", max_prefill_tokens),
            ("refill_at", refill_at),
        ):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"Scheduler: {name} must be an integer >= 1; got {value!r}.")
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int | np.integer) or max_length < 2
        ):
            raise ValueError(f"Scheduler: max_length must be an integer >= 2 or None; got {max_length!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ValueError(f"Scheduler: seed must be an integer; got {seed!r}.")
        self.decoder = decoder
        self.variables = variables
        self.rows = int(rows)
        self.vocab_size = decoder.vocab_size
        self.bos_id = prompts_lib.check_id("bos_id", bos_id, self.vocab_size)
        self.pad_id = prompts_lib.check_id("pad_id", pad_id, self.vocab_size)
        self.seed = int(seed)
        self.block_size = int(block_size)
        self.max_stop_tokens = int(max_stop_tokens)
        self.max_prefill_tokens = int(max_prefill_tokens)
        self.refill_at = int(refill_at)
        self.static = bool(static)
        self.capacity = self._capacity(max_length)  # None: a state without a length bound
        self.max_length = None if self.capacity is None else int(max_length)
        # A KV cache of a DecoderLM is filled by the model's own prefill of right-padded prompts.
        self._whole_prefill = self.capacity is not None and isinstance(decoder, decoding.LMDecoder)
        self.stats = Stats()
        self._variables_signature = _signature(variables)
        self._base_key = jax.random.key(self.seed)
        self._device: _Rows | None = None  # built at the first admission
        self._requests: list[Request | None] = [None] * self.rows  # the request in each row
        self._emitted = np.zeros(self.rows, np.int64)  # host mirror of _Rows.emitted
        self._queue: collections.deque[Request] = collections.deque()
        self._known_ids: set[int] = set()  # waiting or running

    # -- requests ------------------------------------------------------------------------------------

    def _capacity(self, max_length):
        """The state's length bound (a KV cache's slots) for ``max_length``, or None if it has none."""
        try:
            shape = jax.eval_shape(lambda: self.decoder.init_state(jnp.zeros((1,), jnp.int32), max_length))
        except ValueError as err:
            raise ValueError(
                f"Scheduler: this model's decoding state is a KV cache, which needs max_length (the most "
                f"tokens a row holds: BOS, prompt and generated ids); pass max_length=... ({err})"
            ) from None
        capacity = getattr(shape, "max_length", None)
        return None if capacity is None else int(capacity)

    def submit(self, request: Request) -> None:
        """Queues a request (checked now: ValueError names a bad field)."""
        self._queue.append(self._check(request))

    def _check(self, request: Request) -> Request:
        if not isinstance(request, Request):
            raise ValueError(f"Scheduler: requests must be Request objects; got {type(request).__name__}.")
        rid = request.id
        if isinstance(rid, bool) or not isinstance(rid, int | np.integer) or not 0 <= rid <= _MAX_ID:
            raise ValueError(f"Request id must be an integer in [0, 2**31); got {rid!r}.")
        if int(rid) in self._known_ids:
            raise ValueError(f"Request id {rid} is already waiting or running; ids must be unique.")
        where = f"request {rid}: "
        try:
            sampling.check_sampling(
                temperature=request.temperature,
                top_k=request.top_k,
                top_p=request.top_p,
                max_new_tokens=request.max_new_tokens,
            )
            (prompt,) = prompts_lib.check_prompts([request.prompt], self.vocab_size)
            stops = request.stop_tokens
            stops = (stops,) if isinstance(stops, int | np.integer) else tuple(stops)
            stops = tuple(sorted({prompts_lib.check_id("stop token", t, self.vocab_size) for t in stops}))
        except ValueError as err:
            raise ValueError(where + str(err).replace("prompts[0]", "the prompt")) from None
        if len(stops) > self.max_stop_tokens:
            raise ValueError(
                f"{where}{len(stops)} stop tokens, more than max_stop_tokens = {self.max_stop_tokens}; build "
                f"the Scheduler with a larger max_stop_tokens."
            )
        need = len(prompt) + int(request.max_new_tokens)  # BOS + prompt + generated − the last one
        if self.capacity is not None and need > self.capacity:
            raise ValueError(
                f"{where}BOS, its {len(prompt)} prompt tokens and max_new_tokens {request.max_new_tokens} "
                f"need {need} cache slots, more than max_length = {self.capacity}; raise max_length or "
                f"shorten the request."
            )
        self._known_ids.add(int(rid))
        return dataclasses.replace(
            request, id=int(rid), prompt=prompt, max_new_tokens=int(request.max_new_tokens), stop_tokens=stops
        )

    # -- serving -------------------------------------------------------------------------------------

    def serve(self, requests: Iterable[Request] = ()) -> Iterator[Event]:
        """Serves the submitted requests and ``requests`` (pulled one at a time as rows free up) until all
        have finished, yielding each request's new tokens as they come."""
        source = iter(requests)
        exhausted = False
        while True:
            free = self._free_rows()
            if not self.static or len(free) == self.rows:
                # One request beyond the free rows: whether more are waiting decides when decoding returns.
                while not exhausted and len(self._queue) <= len(free):
                    try:
                        self.submit(next(source))
                    except StopIteration:
                        exhausted = True
            if free and self._queue and (not self.static or len(free) == self.rows):
                yield from self._admit_waiting(free)
                continue
            if len(free) == self.rows:
                if not self._queue and exhausted:
                    return
                continue
            yield from self._decode_block(waiting=bool(self._queue) and not self.static)

    def _free_rows(self) -> list[int]:
        return [b for b, request in enumerate(self._requests) if request is None]

    def _ensure_device(self):
        if self._device is None:  # compiled like the others, so that its compile time is counted apart
            fn = functools.partial(
                _empty_rows, self.decoder, self.max_length, self.rows, self.max_stop_tokens, self.pad_id
            )
            self._device = self._program("init", fn, (), donate=())()

    def _width(self, prompt_length: int) -> int:
        """Prompt tokens a prefill call runs for a prompt of this length: its bucket (within the cache)."""
        width = prompts_lib.bucket(prompt_length)
        # BOS + the prompt fit the cache (checked per request), so the framed width may be cut to it.
        return width if self.capacity is None else min(width, self.capacity - 1)

    def _groups(self, batch: list[Request]) -> list[tuple[int, list[Request]]]:
        """(width, requests) prefill calls: grouped by width, each within max_prefill_tokens."""
        if self.static:  # one width for the whole batch: its longest prompt's
            by_width = {self._width(max(len(r.prompt) for r in batch)): batch}
        else:
            by_width = collections.defaultdict(list)
            for request in batch:
                by_width[self._width(len(request.prompt))].append(request)
        calls = []
        for width, group in sorted(by_width.items()):
            per_call = self._rows_per_call(width)
            calls += [(width, group[i : i + per_call]) for i in range(0, len(group), per_call)]
        return calls

    def _rows_per_call(self, width: int) -> int:
        return max(1, min(self.rows, self.max_prefill_tokens // width))

    def _admit_waiting(self, free: list[int]) -> Iterator[Event]:
        self._ensure_device()
        batch = [self._queue.popleft() for _ in range(min(len(free), len(self._queue)))]
        calls = []
        for width, group in self._groups(batch):
            slots = [free.pop(0) for _ in group]
            # A power of two of rows (or the most a call may have), so few programs serve every group.
            n = min(_pow2_at_least(len(group)), self._rows_per_call(width))
            args = (
                self.variables,
                self._device,
                self._base_key,
                *self._prefill_inputs(width, n, group, slots),
            )
            fn = functools.partial(_admit, self.decoder, self.max_length, self._whole_prefill)
            program = self._program("admit", fn, args)
            calls.append((program, args, group, slots, n * width))
        results = []
        for program, args, group, slots, tokens in calls:  # compiled first: nothing runs while compiling
            self._device, first, finished = program(self.variables, self._device, *args[2:])
            results.append((group, slots, first, finished))
            self.stats.requests += len(group)
            self.stats.prefill_calls += 1
            self.stats.prefill_tokens += tokens
        for group, slots, first, finished in results:
            first, finished = np.asarray(first), np.asarray(finished)
            for j, (request, slot) in enumerate(zip(group, slots, strict=True)):
                self._requests[slot], self._emitted[slot] = request, 1
                self.stats.generated += 1
                yield self._event(slot, [int(first[j])], bool(finished[j]))

    def _prefill_inputs(self, width: int, n: int, group: list[Request], slots: list[int]):
        """An admission's inputs: ``group`` into ``slots``, framed in n rows of width + 1 tokens (left-padded,
        with their pads; or right-padded, with their lengths, for the whole-prompt prefill)."""
        tokens = np.full((n, width + 1), self.pad_id, np.int32)
        ids, limit = np.zeros((n,), np.int32), np.ones((n,), np.int32)
        stops = np.full((n, self.max_stop_tokens), -1, np.int32)
        settings = [(0.0, 0, 1.0)] * n
        rows = np.full((n,), self.rows, np.int32)  # an index >= R is dropped
        framed = [[self.bos_id, *request.prompt] for request in group]
        framed += [[self.bos_id]] * (n - len(group))  # unused rows: BOS alone
        if self._whole_prefill:
            pads = np.asarray([len(f) for f in framed], np.int32)  # lengths
            for j, f in enumerate(framed):
                tokens[j, : len(f)] = f
        else:
            pads = np.asarray([width + 1 - len(f) for f in framed], np.int32)
            for j, f in enumerate(framed):
                tokens[j, pads[j] :] = f
        for j, (request, slot) in enumerate(zip(group, slots, strict=True)):
            ids[j], limit[j], rows[j] = request.id, request.max_new_tokens, slot
            stops[j, : len(request.stop_tokens)] = request.stop_tokens
            settings[j] = (request.temperature, request.top_k, request.top_p)
            self.stats.prompt_tokens += len(framed[j])
        new = _New(ids, limit, sampling.PerRow.of(settings, self.vocab_size), stops)
        return rows, tokens, pads, new

    def _decode_block(self, waiting: bool) -> Iterator[Event]:
        exit_free = np.int32(self.refill_at if waiting else self.rows + 1)
        args = (self.variables, self._device, self._base_key, exit_free)
        fn = functools.partial(_decode, self.decoder, self.block_size, self.pad_id)
        program = self._program("decode", fn, args)
        self._device, out, steps = program(*args)
        out, steps = np.asarray(out), int(steps)
        emitted, done = np.asarray(self._device.emitted), np.asarray(self._device.done)
        self.stats.blocks += 1
        self.stats.steps += steps
        self.stats.row_steps += steps * self.rows
        for slot, request in enumerate(self._requests):
            if request is None:
                continue
            count = int(emitted[slot] - self._emitted[slot])
            self._emitted[slot] = emitted[slot]
            self.stats.generated += count
            if count or done[slot]:
                yield self._event(slot, out[slot, :count].tolist(), bool(done[slot]))

    def _event(self, slot: int, tokens: list[int], finished: bool) -> Event:
        request = self._requests[slot]
        if not finished:
            return Event(request.id, tokens, False)
        self._requests[slot] = None
        self._known_ids.discard(request.id)
        last = tokens[-1] if tokens else None
        reason = "stop" if last in request.stop_tokens else "length"
        return Event(request.id, tokens, True, reason)

    # -- programs ------------------------------------------------------------------------------------

    def _program(self, kind: str, fn, args, donate=(1,)):
        """The compiled program of ``fn`` for these arguments' shapes (compiled now if new; shared by
        schedulers of the same decoder and settings); argument 1 (the rows) is donated."""
        # The variables' signature is computed once: they are the same arrays at every call.
        key = (kind, fn.func, fn.args, self._variables_signature, _signature(args[1:]) if args else ())
        program = _PROGRAMS.get(key)
        if program is None:
            # Compile while the device is idle, so that compile_s can be told apart from running time.
            jax.block_until_ready(self._device)
            start = time.perf_counter()
            program = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
            self.stats.compile_s += time.perf_counter() - start
            _PROGRAMS[key] = program
            while len(_PROGRAMS) > _PROGRAM_CACHE_SIZE:
                _PROGRAMS.popitem(last=False)
        else:
            _PROGRAMS.move_to_end(key)
        return program
