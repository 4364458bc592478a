"""`CollapseProbe`: samples (final hidden state, next token) pairs from a live causal LM.

Why hooks on the LM head's input: `model.get_output_embeddings()` exists on every Hugging Face
causal LM, and its input is exactly the state METRICS.md measures (after the final norm), so one
code path serves GPT-2, GPT-Neo(X), Llama, Qwen2 and the rest. During `generate()` the head only
sees the last position (`logits_to_keep`); the prompt's other positions are then read from the
decoder's output, but only after checking that the head's input is a slice of that very tensor.

Labels: the state at position t is paired with token t+1 when both positions are real (attention
mask 1). The last position of a forward call is held until its next token arrives: the next
decode step's input, or `generate()`'s returned sequences. A position is a *prompt* position when
its label is a prompt token and a *completion* position when its label was generated (so the last
prompt position, which predicts the first generated token, is a completion position). After an
end-of-sequence token, a finished row's padding is never counted. Beam search is skipped (and
counted): beams reorder the cache, so a row's next input is not its own continuation. With
`num_return_sequences > 1` each prompt is expanded into several rows, so its prompt positions
are counted once per returned sequence.

The request path never waits on the monitor and never synchronises the accelerator: sampling
decisions come from shapes on the CPU, rows are gathered with index tensors, copied to the host
with `non_blocking=True`, and a background `Shipper` sorts out validity and talks to the sink.
Errors inside hooks are counted and logged once per reason; they never reach the caller.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, cast

import torch

from monitor.capture.positions import (
    CallInputs,
    PendingStates,
    RequestState,
    alive_positions,
    find_decoder,
    head_states,
    last_hidden,
    mask_at,
    mask_column,
    output_head,
    past_length,
    take,
)
from monitor.capture.sampling import Clock, Sampler, SamplingPolicy
from monitor.capture.shipping import CaptureCounters, Chunk, ChunkTarget, Shipper
from monitor.capture.sinks import NC4Reference, Sink
from monitor.errors import InvalidInput
from monitor.stats import CollapseStats

log = logging.getLogger(__name__)

Positions = Literal["prompt", "completion", "both"]
_UNSET: Any = object()
_POSITIONS = ("prompt", "completion", "both")


class CollapseProbe:
    """Hooks on a causal LM that feed sampled (state, next token) rows to a `ChunkTarget`.

    Use `CollapseProbe.attach(model, sink, policy)` in a serving process; `detach()` removes
    every hook and restores `generate`. State is kept per thread, so concurrent requests on
    different threads are labelled independently.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        target: ChunkTarget,
        policy: SamplingPolicy,
        *,
        positions: Positions = "both",
        counters: CaptureCounters | None = None,
        clock: Clock = time.monotonic,
        shipper: Shipper | None = None,
    ) -> None:
        if positions not in _POSITIONS:
            raise InvalidInput(
                "invalid_positions", f"positions must be one of {_POSITIONS}, got {positions!r}"
            )
        if getattr(model, "_collapse_probe", None) is not None:
            raise InvalidInput("already_attached", "a CollapseProbe is already attached")
        self.model = model
        self.head = output_head(model)
        self.positions: Positions = positions
        self.sampler = Sampler(policy, clock)
        self.counters = counters or CaptureCounters()
        self.last_error: str | None = None
        self._target = target
        self._shipper = shipper
        self._reference: NC4Reference | None = None
        self._local = threading.local()
        self._logged: set[str] = set()
        self._eos_cache: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._decoder = find_decoder(model)
        self._handles.append(model.register_forward_pre_hook(self._on_model_pre, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._on_model_post))
        self._handles.append(self.head.register_forward_pre_hook(self._on_head_pre))
        if self._decoder is not None:
            self._handles.append(self._decoder.register_forward_hook(self._on_decoder_post))
        self._orig_generate: Callable[..., Any] | None = None
        if callable(getattr(model, "generate", None)):
            self._wrap_generate()
        model._collapse_probe = self  # type: ignore[assignment]

    # ------------------------------------------------------------ public API
    @classmethod
    def attach(
        cls,
        model: torch.nn.Module,
        sink: Sink,
        policy: SamplingPolicy | None = None,
        *,
        positions: Positions = "both",
        capacity_rows: int = 16384,
        batch_rows: int = 2048,
        flush_interval: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> CollapseProbe:
        """Hook `model` and ship sampled rows to `sink` from a background thread.

        Memory: at most `capacity_rows + batch_rows` rows of d values in the model's dtype are
        held (16k rows of d = 4096 in bf16 are 128 MiB); beyond that, rows are dropped and
        counted in `counters.dropped_full`. `flush_interval` bounds how long a row waits.
        """
        output_head(model)  # fail before starting a thread
        counters = CaptureCounters()
        holder: list[CollapseProbe] = []
        shipper = Shipper(
            sink,
            counters,
            lambda: holder[0]._reference if holder else None,
            capacity_rows=capacity_rows,
            batch_rows=batch_rows,
            flush_interval=flush_interval,
        )
        try:
            probe = cls(
                model,
                shipper,
                policy or SamplingPolicy(),
                positions=positions,
                counters=counters,
                clock=clock,
                shipper=shipper,
            )
        except Exception:
            shipper.close(timeout=1.0)
            raise
        holder.append(probe)
        return probe

    def detach(self, timeout: float = 10.0) -> None:
        """Remove every hook, restore `generate`, ship what is buffered and close the sink."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._orig_generate is not None and "generate" in self.model.__dict__:
            del self.model.__dict__["generate"]
        self._orig_generate = None
        if getattr(self.model, "_collapse_probe", None) is self:
            del self.model._collapse_probe
        # States still waiting for a next token (on any thread) will never get one now.
        self._local = threading.local()
        left = self.counters.pending
        self.counters.add("pending", -left)
        self.counters.add("unresolved", left)
        if self._shipper is not None:
            self._shipper.close(timeout)

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until every row buffered so far reached the sink (tests, shutdown)."""
        return self._shipper.flush(timeout) if self._shipper is not None else True

    def set_reference(self, class_ids: torch.Tensor, means: torch.Tensor) -> None:
        """Count NC4 hits from now on against these class means and the model's own head."""
        self._reference = NC4Reference.from_head(self.head, class_ids, means)

    def set_reference_from_stats(self, stats: CollapseStats, min_count: int = 2) -> None:
        """`set_reference` with the means of the classes of `stats` with `n_c >= min_count`."""
        rows = stats.classes(min_count)
        self._reference = (
            NC4Reference.from_head(self.head, rows.class_ids, rows.means())
            if rows.num_classes
            else None
        )

    @property
    def reference(self) -> NC4Reference | None:
        return self._reference

    def __enter__(self) -> CollapseProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ----------------------------------------------------------------- hooks
    def _on_model_pre(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        ids = ids if isinstance(ids, torch.Tensor) and ids.ndim == 2 else None
        mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        self._local.call = CallInputs(ids, mask, past_length(ids, mask, kwargs))

    def _on_decoder_post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        call: CallInputs | None = getattr(self._local, "call", None)
        if call is not None:
            call.decoder_out = last_hidden(output)

    def _on_head_pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        call: CallInputs | None = getattr(self._local, "call", None)
        if call is not None and args and isinstance(args[0], torch.Tensor):
            call.head_in = args[0]

    def _on_model_post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        call: CallInputs | None = getattr(self._local, "call", None)
        self._local.call = None
        if call is None:
            return
        try:
            with torch.no_grad():
                self._process(call)
        except InvalidInput as exc:
            self._fail(exc.reason, str(exc))
        except Exception as exc:  # the request path must never see a monitor failure
            self._fail(type(exc).__name__, repr(exc))

    def _fail(self, reason: str, message: str) -> None:
        self.counters.error(reason)
        self.last_error = message
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("collapse-monitor probe skipped a forward call (%s): %s", reason, message)

    # ------------------------------------------------------------ processing
    def _eos_ids(self, device: torch.device) -> torch.Tensor | None:
        ids = getattr(self._local, "eos", _UNSET)
        if ids is _UNSET:  # outside generate(), or generate() without an override
            config = getattr(self.model, "generation_config", None)
            ids = getattr(config, "eos_token_id", None)
        if ids is None:
            return None
        values = [int(i) for i in (ids if isinstance(ids, list | tuple) else [ids])]
        if not values:
            return None
        key = (torch.device(device), tuple(values))  # never read back from the device
        cached = self._eos_cache.get(key)
        if cached is None:
            cached = torch.tensor(values, dtype=torch.int64, device=key[0])
            self._eos_cache[key] = cached
        return cached

    def _process(self, call: CallInputs) -> None:
        if getattr(self._local, "skip", False):
            raise InvalidInput("beam_search", "beam search is not monitored (beams reorder)")
        ids = call.input_ids
        if ids is None:
            raise InvalidInput("no_input_ids", "forward called without input_ids (embeds only)")
        batch, length = int(ids.shape[0]), int(ids.shape[1])
        mask = call.mask
        if mask is None and batch > 1 and not getattr(self._local, "in_generate", False):
            # generate() drops an all-ones mask itself, so there no mask means no padding.
            raise InvalidInput(
                "missing_attention_mask",
                "batched forward without attention_mask: padding cannot be told from tokens; "
                "pass attention_mask to forward()/generate()",
            )
        if mask is not None and mask.shape[0] != batch:
            raise InvalidInput("wrong_shape", "attention_mask and input_ids disagree on batch")
        feats, offset = head_states(call, batch, length)
        past = call.past
        req: RequestState | None = getattr(self._local, "request", None)
        if req is not None and past > 0 and req.batch == batch and req.next_pos == past:
            self._resolve(req, ids[:, 0], mask_column(mask, past, past + length))
        else:
            self._drop_pending(req)
            req = RequestState(
                batch=batch,
                prompt_len=past + length,
                next_pos=0,
                rows_on=self.sampler.sample_requests(batch),
                alive=None,
            )
            self._local.request = req
        req.next_pos = past + length
        alive_at = alive_positions(req, ids, past, self._eos_ids(ids.device))

        # Which positions may be sampled: decided from shapes only.
        t = torch.arange(length)
        allowed = t >= offset
        is_prompt = (past + t + 1) < req.prompt_len
        if self.positions == "prompt":
            allowed &= is_prompt
        elif self.positions == "completion":
            allowed &= ~is_prompt
        rows, cols = self.sampler.sample_positions(req.rows_on[:, None] & allowed[None, :])
        n = int(rows.numel())
        if n == 0:
            return
        self.counters.add("sampled", n)
        if not self._target.has_room(n):
            self.counters.add("dropped_full", n)
            return
        device = feats.device
        last = cols == length - 1
        inner = ~last
        if bool(inner.any()):
            r, c = rows[inner], cols[inner]
            valid = mask_at(mask, r, past + c, past + length, device)
            valid = valid & mask_at(mask, r, past + c + 1, past + length, device)
            if alive_at is not None:
                valid = valid & take(alive_at, r, c)
            self._emit(take(feats, r, c - offset), take(ids, r, c + 1), valid)
        if bool(last.any()):
            r = rows[last]
            pos = past + length - 1
            valid = mask_at(mask, r, torch.full_like(r, pos), past + length, device)
            if alive_at is not None:
                valid = valid & take(alive_at, r, torch.full_like(r, length - 1))
            state = take(feats, r, torch.full_like(r, length - 1 - offset))
            req.pending = PendingStates(state, r.to(device, non_blocking=True), valid, pos)
            self.counters.add("pending", int(r.numel()))

    def _resolve(
        self, req: RequestState, next_tokens: torch.Tensor, next_mask: torch.Tensor | None
    ) -> None:
        pending, req.pending = req.pending, None
        if pending is None:
            return
        self.counters.add("pending", -int(pending.rows.numel()))
        valid = pending.valid
        if next_mask is not None:
            valid = valid & next_mask[pending.rows]
        self._emit(pending.features, next_tokens[pending.rows], valid)

    def _drop_pending(self, req: RequestState | None) -> None:
        if req is not None and req.pending is not None:
            rows = int(req.pending.rows.numel())
            self.counters.add("unresolved", rows)
            self.counters.add("pending", -rows)
            req.pending = None

    def _emit(self, feats: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> None:
        """Copy rows to the host without waiting (CUDA: pinned, non-blocking, with an event)."""
        feats, labels = feats.detach(), labels.to(torch.int64)  # convert before any copy
        event: torch.cuda.Event | None = None
        device = feats.device
        if device.type == "cuda":
            feats = feats.to("cpu", non_blocking=True)
            labels = labels.to("cpu", non_blocking=True)
            valid = valid.to("cpu", non_blocking=True)
            event_type: Any = torch.cuda.Event  # untyped constructor
            event = event_type()
            event.record(torch.cuda.current_stream(device))
        elif device.type != "cpu":
            feats, labels, valid = feats.cpu(), labels.cpu(), valid.cpu()
        self._target.offer(Chunk(feats, labels, valid, event))

    # -------------------------------------------------------------- generate
    def _wrap_generate(self) -> None:
        original = cast(Callable[..., Any], self.model.generate)
        self._orig_generate = original

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            self._drop_pending(getattr(self._local, "request", None))
            self._local.request = None
            config = kwargs.get("generation_config")
            if "eos_token_id" in kwargs:  # an explicit None means "no end-of-sequence token"
                self._local.eos = kwargs["eos_token_id"]
            elif config is not None:
                self._local.eos = getattr(config, "eos_token_id", None)
            effective = config or getattr(self.model, "generation_config", None)
            beams = kwargs.get("num_beams", getattr(effective, "num_beams", 1)) or 1
            # Beam search reorders the cache between steps: a row's next input is not its own
            # continuation, so labels cannot be paired; such calls are skipped and counted.
            self._local.skip = int(beams) > 1
            self._local.in_generate = True
            try:
                out = original(*args, **kwargs)
            finally:
                self._local.eos = _UNSET
                self._local.in_generate = False
                self._local.skip = False
            try:
                with torch.no_grad():
                    self._finish_generate(out)
            except Exception as exc:
                self._fail(type(exc).__name__, repr(exc))
            return out

        self.model.__dict__["generate"] = generate

    def _finish_generate(self, out: Any) -> None:
        """Label the last pending states with the final generated tokens."""
        req: RequestState | None = getattr(self._local, "request", None)
        self._local.request = None
        if req is None or req.pending is None:
            return
        seq = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
        pending = req.pending
        if (
            not isinstance(seq, torch.Tensor)
            or seq.ndim != 2
            or seq.shape[0] != req.batch
            or seq.shape[1] <= pending.pos + 1
        ):
            self._drop_pending(req)
            return
        req.pending = None
        self.counters.add("pending", -int(pending.rows.numel()))
        labels = seq[pending.rows, pending.pos + 1]
        self._emit(pending.features, labels, pending.valid)
