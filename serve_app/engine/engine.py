"""The continuous-batching engine: one ``step()`` decodes every running sequence by one token.

Sequences join the running batch at the step after they arrive (their prompt is prefilled in
that step, in one bounded call, beside the decode of the running batch) and leave the moment
they finish or are aborted, freeing their rows of the KV cache. A prompt longer than one step's
prefill budget is prefilled alone, one chunk of at most ``max_prefill_tokens`` per step over its
own growing cache, while the running batch keeps decoding; it joins after its last chunk. A
structured sequence's grammar masks its logits at every step (``constrained.py``); its masks are
computed while the model runs. A fused-attention model (a ``SlotDecoder``) keeps each sequence's
cache in a row of its own, written in place (``kv_slots.py``): the same steps, no cache copies.
A prompt that starts with a prefix another prompt prefilled before (``prefix_cache.py``) gets
that prefix's KV copied in and prefills only the rest, like a long prompt's last chunks.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from serve_app.engine.config import EngineConfig
from serve_app.engine.constrained import ConstrainedDecoding, TokenMasks
from serve_app.engine.decoder import Decoder, SlotDecoder
from serve_app.engine.errors import EngineOverloadedError, InvalidRequestError
from serve_app.engine.kv_cache import BatchKVCache
from serve_app.engine.kv_slots import SlotBatch
from serve_app.engine.prefix_cache import BLOCK_TOKENS, PrefixCache, PrefixKV
from serve_app.engine.sampler import Sampler, prompt_logprobs
from serve_app.engine.sampling_params import SamplingParams
from serve_app.engine.scheduler import Scheduler
from serve_app.engine.sequence import FinishReason, Sequence, SequenceOutput, TokenLogprob
from serve_app.engine.stats import StepStats


@dataclass(eq=False)
class ChunkedPrefill:
    """A prompt prefilled over a past, part-way through its prefill: one longer than a step's
    prefill budget, or one whose prefix KV was reused."""

    sequence: Sequence
    started: float  # when its first chunk began (``time.monotonic()``)
    past: list[ort.OrtValue] | None = None  # its KV cache after the chunks so far (unless in a row)
    num_done: int = 0  # prompt tokens in ``past``
    prompt_logits: list[np.ndarray] = field(default_factory=list)  # per chunk, when scored


class LLMEngine:
    """Synchronous engine over an injected decoder; callers drive it with ``add_request``,
    ``abort`` and ``step``."""

    def __init__(self, config: EngineConfig, decoder: Decoder | SlotDecoder) -> None:
        self.config = config
        self.decoder = decoder
        # Set for a fused-attention model: the running batch's cache lives in its rows.
        self.slot_batch = SlotBatch(decoder) if isinstance(decoder, SlotDecoder) else None
        self.model_config = decoder.config
        self.scheduler = Scheduler(
            config.max_num_seqs, config.kv_cache_tokens, config.max_prefill_tokens
        )
        self.sampler = Sampler(self.model_config.vocab_size, self.model_config.eos_token_ids)
        self.constraints = ConstrainedDecoding.for_model(config.model_path, self.model_config)
        self.running: list[Sequence] = []
        self.cache: BatchKVCache | None = None
        self.prefilling: ChunkedPrefill | None = None
        # Per engine, so per model version; TensorRT's profiles hold no prefill over a past.
        reuse = config.prefix_cache_tokens >= BLOCK_TOKENS and config.prefills_in_chunks
        self.prefix_cache = PrefixCache(config.prefix_cache_tokens) if reuse else None
        self._seed_sequence = np.random.SeedSequence(config.seed)
        self._live_ids: set[str] = set()
        self._pending_aborts: set[str] = set()
        self.last_stats = StepStats(0, 0, 0.0, 0)

    @property
    def num_waiting(self) -> int:
        """Sequences queued for admission."""
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        """Sequences in the running batch, counting one part-way through a chunked prefill."""
        return len(self.running) + (self.prefilling is not None)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV-cache token budget the running batch occupies (of the KV rows,
        for a fused-attention model, where each row holds a whole context)."""
        if self.slot_batch is not None:
            return self.slot_batch.usage(prefilling=self.prefilling is not None)
        slots = self.cache.num_slots if self.cache else 0
        if self.prefilling is not None:
            slots += self.prefilling.num_done
        return slots / self.config.kv_cache_tokens

    def has_work(self) -> bool:
        """Whether a call to ``step`` would do anything."""
        prefilling = self.prefilling is not None
        return bool(self.running or prefilling or self.scheduler.waiting or self._pending_aborts)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Queue a request; raises ``InvalidRequestError`` or ``EngineOverloadedError``."""
        if request_id in self._live_ids:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        ahead = self.waiting_beyond_batch(self.num_waiting)
        sequence = self.new_sequence(request_id, prompt_token_ids, params, ahead=ahead)
        self.enqueue(sequence)

    def waiting_beyond_batch(self, waiting: int) -> int:
        """Of ``waiting`` sequences, how many the next step cannot admit for want of room in
        the running batch (negative: room to spare). A burst that arrives before a step has
        admitted it is not refused while the batch has room for it."""
        return waiting - (self.config.max_num_seqs - self.num_running)

    def new_sequence(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        ahead: int,
    ) -> Sequence:
        """The one place a request becomes a sequence, checked against the waiting-queue bound
        (``ahead`` sequences already wait beyond the running batch's room, as
        ``waiting_beyond_batch`` counts them), this model and the KV-cache budget.

        Raises ``EngineOverloadedError``, or ``InvalidRequestError`` naming the parameter at
        fault (``structured`` when its grammar does not compile against this model's
        tokenizer). The sequence is not queued: ``enqueue`` does that, on the engine's thread.
        """
        if ahead >= self.config.max_waiting_seqs:
            raise EngineOverloadedError(
                f"the engine's waiting queue is full ({self.config.max_waiting_seqs} sequences)"
            )
        max_length = self._checked_max_length(prompt_token_ids, params)
        sequence = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            max_length=max_length,
            rng=self._rng_for(params),
        )
        if not self.scheduler.fits_alone(sequence):
            raise InvalidRequestError(
                f"prompt plus max_tokens ({sequence.max_length} tokens) exceeds the KV-cache "
                f"budget of {self.config.kv_cache_tokens} tokens",
                "max_tokens",
            )
        if params.structured is not None:
            sequence.matcher = self.constraints.matcher(params.structured)
        return sequence

    def enqueue(self, sequence: Sequence) -> None:
        """Queue a sequence made by ``new_sequence`` for admission."""
        self.scheduler.add(sequence)
        self._live_ids.add(sequence.request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a sequence; its final output (reason ``abort``) comes from the next step."""
        if request_id in self._live_ids:
            self._pending_aborts.add(request_id)

    def step(self) -> list[SequenceOutput]:
        """Run one iteration: drop aborted sequences, decode the batch, admit and prefill (or
        prefill the next chunk of a long prompt, which admits nothing else meanwhile)."""
        outputs = self._drop_aborted()
        decoded = len(self.running)
        if self.running:
            outputs.extend(self._decode())
        newcomers = []
        if self.prefilling is None:
            newcomers = self.scheduler.admit(self.running, alone=self._reuses_prefix)
        now = time.monotonic()
        queried = sum(s.num_prompt_tokens for s in newcomers if self._reuse_limit(s))
        prefix = self._take_prefix(newcomers[0]) if newcomers else None
        if newcomers and (
            newcomers[0].num_prompt_tokens > self.config.max_prefill_tokens or prefix is not None
        ):
            # The scheduler admits a prompt over the budget, or one that reuses a prefix, alone.
            self.prefilling = ChunkedPrefill(newcomers[0], started=now)
            if prefix is not None:
                self._apply_prefix(self.prefilling, prefix)
        if self.prefilling is not None:
            outputs.extend(self._prefill_chunk(self.prefilling))
        elif newcomers:
            outputs.extend(self._prefill(newcomers))
        self.last_stats = StepStats(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_cache_usage=self.kv_cache_usage,
            decoded=decoded,
            queue_times_s=[now - s.arrival_time for s in newcomers],
            prefix_cache_queries=queried,
            prefix_cache_hits=0 if prefix is None else prefix.shape[2],
        )
        self._live_ids.difference_update(o.request_id for o in outputs if o.finished)
        return outputs

    def _checked_max_length(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Prompt plus the most tokens to generate; raises ``InvalidRequestError`` if the
        request does not fit this model and deployment."""
        context = self.model_config.context_length
        vocab = self.model_config.vocab_size
        num_prompt = len(prompt_token_ids)
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if params.max_tokens == 0 and params.prompt_logprobs is None:
            raise InvalidRequestError(
                "max_tokens may be 0 only when the prompt's logprobs are asked for", "max_tokens"
            )
        if num_prompt > context or (num_prompt == context and params.max_tokens > 0):
            raise InvalidRequestError(
                f"the prompt has {num_prompt} tokens; this model's context length is "
                f"{context}, which must also hold at least one generated token",
                "prompt",
            )
        if num_prompt > self.config.max_prefill_tokens and not self.config.prefills_in_chunks:
            raise InvalidRequestError(
                f"the prompt has {num_prompt} tokens; this deployment prefills at most "
                f"{self.config.max_prefill_tokens} (engine.max_prefill_tokens), and its "
                "TensorRT backend does not prefill in chunks",
                "prompt",
            )
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        if any(not 0 <= token_id < vocab for token_id in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")
        if num_prompt + params.max_tokens > context and not params.fit_to_context:
            raise InvalidRequestError(
                f"max_tokens ({params.max_tokens}) plus the prompt ({num_prompt} tokens) "
                f"exceeds this model's context length of {context} tokens",
                "max_tokens",
            )
        return min(num_prompt + params.max_tokens, context)

    def _reuse_limit(self, seq: Sequence) -> int:
        """The most prompt tokens ``seq`` may take from the prefix cache: all but the last, whose
        logits give its first token; none when it scores its prompt (that needs every
        position's logits) or there is no cache."""
        if self.prefix_cache is None or seq.params.prompt_logprobs is not None:
            return 0
        return seq.num_prompt_tokens - 1

    def _reuses_prefix(self, seq: Sequence, admitted: list[Sequence]) -> bool:
        """Whether ``seq`` will prefill over a reused prefix: one is cached, or a sequence
        admitted before it in this step starts with the same block and will store it (``seq``
        then waits a step for it rather than prefill it again)."""
        cache, limit = self.prefix_cache, self._reuse_limit(seq)
        if cache is None or limit < BLOCK_TOKENS:
            return False
        first = seq.prompt_token_ids[:BLOCK_TOKENS]
        return cache.match(seq.prompt_token_ids, limit) > 0 or any(
            s.prompt_token_ids[:BLOCK_TOKENS] == first for s in admitted
        )

    def _take_prefix(self, seq: Sequence) -> PrefixKV | None:
        """The K/V of ``seq``'s longest cached prefix, if any."""
        limit = self._reuse_limit(seq)
        if self.prefix_cache is None or limit < BLOCK_TOKENS:
            return None
        return self.prefix_cache.take(seq.prompt_token_ids, limit)

    def _apply_prefix(self, chunked: ChunkedPrefill, prefix: PrefixKV) -> None:
        """Start a chunked prefill from a reused prefix: the rest of the prompt is its chunks."""
        if self.slot_batch is not None:
            self.slot_batch.write_prefix(prefix)
        else:
            chunked.past = self._padded_decoder.ops.from_host([kv[None] for kv in prefix])
        chunked.num_done = prefix.shape[2]

    def _remember_prompt(self, seq: Sequence, read: Callable[[int, int], PrefixKV]) -> None:
        """Offer a prefilled prompt's K/V (``read(start, end)``) to the prefix cache."""
        if self.prefix_cache is not None:
            self.prefix_cache.insert(seq.prompt_token_ids, read)

    def _host_kv(
        self, values: list[ort.OrtValue], row: int, first: int, start: int, end: int
    ) -> PrefixKV:
        """Prompt tokens ``[start, end)`` of row ``row`` of a regrouped cache's tensors, whose
        prompt begins at column ``first``, on the host."""
        kept = self._padded_decoder.ops.select(values, [row], first + start)
        return np.stack([value.numpy()[0, :, : end - start] for value in kept])

    def _rng_for(self, params: SamplingParams) -> np.random.Generator:
        if params.seed is not None:
            return np.random.default_rng(params.seed)
        return np.random.default_rng(self._seed_sequence.spawn(1)[0])

    def _drop_aborted(self) -> list[SequenceOutput]:
        if not self._pending_aborts:
            return []
        aborted = []
        for request_id in self._pending_aborts:
            waiting = self.scheduler.remove(request_id)
            if waiting is not None:
                aborted.append(waiting)
        aborted.extend(s for s in self.running if s.request_id in self._pending_aborts)
        chunked = self.prefilling
        if chunked is not None and chunked.sequence.request_id in self._pending_aborts:
            aborted.append(chunked.sequence)
            self.prefilling = None  # drops its cache
        self._pending_aborts.clear()
        for sequence in aborted:
            sequence.finish_reason = FinishReason.ABORT
        self._release_finished()
        return [self._output(s, ()) for s in aborted]

    def _decode(self) -> list[SequenceOutput]:
        token_masks = self.constraints.start_masks(self.running)
        logits = self.slot_batch.decode() if self.slot_batch is not None else self._decode_padded()
        outputs = self._append_tokens(self.running, logits, token_masks)
        self._release_finished()
        return outputs

    def _decode_padded(self) -> np.ndarray:
        """One decode step over the regrouped cache (``kv_cache.py``); the next logits."""
        assert self.cache is not None  # a running batch always has a cache
        input_ids = np.array([[s.last_token_id] for s in self.running], dtype=np.int64)
        positions = np.array([[s.length - 1] for s in self.running], dtype=np.int64)
        mask = self.cache.decode_mask()
        result = self._padded_decoder.forward(input_ids, mask, positions, self.cache.values)
        self.cache.advance(result.present, mask)
        return result.logits

    def _prefill(self, newcomers: list[Sequence]) -> list[SequenceOutput]:
        started = time.monotonic()
        scoring = any(s.params.prompt_logprobs is not None for s in newcomers)
        token_masks = self.constraints.start_masks(_generating(newcomers))
        if self.slot_batch is not None:
            logits, all_logits = self.slot_batch.prefill(newcomers, all_positions=scoring)
            for seq in newcomers:
                self._remember_prompt(seq, functools.partial(self.slot_batch.prompt_kv, seq))
            outputs = self._prefill_outputs(newcomers, logits, all_logits, started, token_masks)
            self._join_rows()
            return outputs
        pad_to = max(s.num_prompt_tokens for s in newcomers)
        input_ids = np.full((len(newcomers), pad_to), self.model_config.pad_token_id, np.int64)
        mask = np.zeros((len(newcomers), pad_to), dtype=np.int64)
        for row, seq in enumerate(newcomers):
            input_ids[row, pad_to - seq.num_prompt_tokens :] = seq.prompt_token_ids
            mask[row, pad_to - seq.num_prompt_tokens :] = 1
        positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
        decoder = self._padded_decoder
        result = decoder.forward(
            input_ids, mask, positions, decoder.ops.empty(len(newcomers)), all_positions=scoring
        )
        for row, seq in enumerate(newcomers):
            first = pad_to - seq.num_prompt_tokens  # its prompt's column: rows are left-padded
            self._remember_prompt(seq, functools.partial(self._host_kv, result.present, row, first))
        outputs = self._prefill_outputs(
            newcomers, result.logits, result.all_logits, started, token_masks
        )
        self._join(newcomers, result.present, mask)
        return outputs

    def _prefill_chunk(self, chunked: ChunkedPrefill) -> list[SequenceOutput]:
        """Prefill the next chunk of a long prompt over its cache so far; after the last
        chunk, sample its first token and let it join the running batch."""
        seq = chunked.sequence
        start = chunked.num_done
        end = min(start + self.config.max_prefill_tokens, seq.num_prompt_tokens)
        last = end == seq.num_prompt_tokens
        mask = np.ones((1, end), dtype=np.int64)
        scoring = seq.params.prompt_logprobs is not None
        token_masks = self.constraints.start_masks(_generating([seq])) if last else None
        if self.slot_batch is not None:
            logits, chunk_logits = self.slot_batch.prefill_chunk(
                seq, start, end, all_positions=scoring
            )
        else:
            decoder = self._padded_decoder
            result = decoder.forward(
                np.array([seq.prompt_token_ids[start:end]], dtype=np.int64),
                mask,
                np.arange(start, end, dtype=np.int64)[None, :],
                chunked.past or decoder.ops.empty(1),
                all_positions=scoring,
            )
            chunked.past, logits, chunk_logits = result.present, result.logits, result.all_logits
        chunked.num_done = end
        if scoring:
            assert chunk_logits is not None, "the decoder ignored all_positions"
            chunked.prompt_logits.append(chunk_logits[0])
        if not last:
            return []
        self.prefilling = None
        all_logits = np.concatenate(chunked.prompt_logits)[None] if scoring else None
        outputs = self._prefill_outputs([seq], logits, all_logits, chunked.started, token_masks)
        if self.slot_batch is not None:
            self.slot_batch.join_chunked(seq)
            self._remember_prompt(seq, functools.partial(self.slot_batch.prompt_kv, seq))
            self._join_rows()
        else:
            assert chunked.past is not None
            self._remember_prompt(seq, functools.partial(self._host_kv, chunked.past, 0, 0))
            self._join([seq], chunked.past, mask)
        return outputs

    def _join(
        self, newcomers: list[Sequence], present: list[ort.OrtValue], mask: np.ndarray
    ) -> None:
        """Add prefilled sequences and their cache to the running batch."""
        joined = BatchKVCache(present, mask, self._padded_decoder.ops)
        self.cache = joined if self.cache is None else BatchKVCache.concat(self.cache, joined)
        self.running.extend(newcomers)
        self._release_finished()

    def _join_rows(self) -> None:
        """Take the sequences that now hold KV rows as the running batch, in row order."""
        assert self.slot_batch is not None
        self.running = self.slot_batch.sequences
        self._release_finished()

    @property
    def _padded_decoder(self) -> Decoder:
        """The decoder of a model whose cache the engine regroups (``kv_cache.py``)."""
        assert not isinstance(self.decoder, SlotDecoder)
        return self.decoder

    def _prefill_outputs(
        self,
        newcomers: list[Sequence],
        logits: np.ndarray,
        all_logits: np.ndarray | None,
        started: float,
        token_masks: Future[TokenMasks] | None,
    ) -> list[SequenceOutput]:
        """The first token of each newcomer, with its prompt's logprobs where asked; one that
        asked for no tokens (``max_tokens`` 0) only has its prompt scored and finishes.
        ``token_masks`` are those of the newcomers that generate, in order."""
        scored: list[tuple[TokenLogprob | None, ...] | None] = []
        for row, seq in enumerate(newcomers):
            n_top = seq.params.prompt_logprobs
            if n_top is None:
                scored.append(None)
                continue
            assert all_logits is not None, "the decoder ignored all_positions"
            prompt_logits = all_logits[row, all_logits.shape[1] - seq.num_prompt_tokens :]
            scored.append(prompt_logprobs(prompt_logits, seq.prompt_token_ids, n_top))
        generating = [row for row, s in enumerate(newcomers) if s.params.max_tokens > 0]
        sampled = iter(self._append_tokens(_generating(newcomers), logits[generating], token_masks))
        outputs = []
        for seq, prompt in zip(newcomers, scored, strict=True):
            if seq.params.max_tokens > 0:
                output = next(sampled)
            else:
                seq.finish_reason = FinishReason.LENGTH
                output = self._output(seq, ())
            outputs.append(
                dataclasses.replace(output, prompt_logprobs=prompt, prefill_started_at=started)
            )
        return outputs

    def _append_tokens(
        self,
        sequences: list[Sequence],
        logits: np.ndarray,
        token_masks: Future[TokenMasks] | None,
    ) -> list[SequenceOutput]:
        masks = None if token_masks is None else token_masks.result()
        sampled = self.sampler(logits, sequences, masks)
        outputs = []
        for seq, token_id, logprob in zip(
            sequences, sampled.token_ids.tolist(), sampled.logprobs, strict=True
        ):
            seq.output_token_ids.append(token_id)
            seq.finish_reason = self._finish_reason(seq, token_id)
            outputs.append(self._output(seq, (token_id,), None if logprob is None else (logprob,)))
        return outputs

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        if seq.matcher is not None and self.constraints.advance(seq.matcher, token_id):
            return FinishReason.STOP  # the grammar's end, whatever min_tokens or ignore_eos say
        params = seq.params
        stops = token_id in params.stop_token_ids or (
            not params.ignore_eos and token_id in self.model_config.eos_token_ids
        )
        if stops and len(seq.output_token_ids) >= params.min_tokens:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= params.max_tokens or seq.length >= seq.max_length:
            return FinishReason.LENGTH
        return None

    def _release_finished(self) -> None:
        """Remove finished sequences from the batch and their rows from the KV cache."""
        if self.slot_batch is not None:
            self.slot_batch.release_finished()
            self.running = self.slot_batch.sequences
            return
        keep = [row for row, s in enumerate(self.running) if not s.finished]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[row] for row in keep]
        assert self.cache is not None
        self.cache = self.cache.select(keep) if keep else None

    def _output(
        self,
        seq: Sequence,
        new_token_ids: tuple[int, ...],
        logprobs: tuple[TokenLogprob, ...] | None = None,
    ) -> SequenceOutput:
        return SequenceOutput(
            request_id=seq.request_id,
            new_token_ids=new_token_ids,
            logprobs=logprobs,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=len(seq.output_token_ids),
        )


def _generating(newcomers: list[Sequence]) -> list[Sequence]:
    """The newcomers that sample a first token (those with ``max_tokens`` 0 only score)."""
    return [s for s in newcomers if s.params.max_tokens > 0]
