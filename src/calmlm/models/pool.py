"""A pool of draws of the next chunk, decoded only as far as a temperature sampler needs (CPU decoding).

The batch approximation at T < 1 (paper Algorithm 2) chooses among N draws per position by how often each
chunk repeats in the pool, so it needs the equality pattern of the decoded chunks, not all their tokens:
two chunks that differ in their first token differ, whatever follows. The pool therefore decodes slot 0 of
every draw up front (in one large pass), and a later slot of a draw only when a comparison or the count
needs it, each at most once. ``sampling.temperature.lazy_batch_temperature_choice`` compares random tuples
of draws before counting, which in a pool of repeated chunks settles the choice without decoding the rest.
"""

from __future__ import annotations

import torch

from .autoencoder import Decoder


class DrawPool:
    """The N draws ``latents`` (P, N, l) at P positions; entry ``p * N + i`` is draw i of position p.

    Implements ``sampling.temperature.QueryPool``: ``same`` and ``keys`` for the sampler, ``chunks`` for the
    chosen entries' tokens. A token is the argmax of the decoder's logits (``Decoder.slot_tokens``), as in
    ``Autoencoder.decode_tokens``; the pool decodes a slot at a time and the rows it needs, so where two
    logits tie to within float rounding it may pick the other one, as a different batch size may."""

    def __init__(self, decoder: Decoder, latents: torch.Tensor, max_logits: int | None = None) -> None:
        self.decoder = decoder
        self.num_positions, self.pool_size = latents.shape[:2]
        self.device = latents.device
        entries = self.num_positions * self.pool_size
        # logits are made for this many rows at a time: cache-sized on CPU (see Autoencoder.decode_tokens)
        vocab = decoder.output_weight.shape[0]
        max_logits = max_logits or (2**23 if self.device.type == "cpu" else 2**28)
        self._rows_per_slice = max(1, max_logits // vocab)
        self.one_pass_rows = 64  # see _width
        with torch.no_grad():
            z = latents.reshape(entries, -1).to(decoder.expand_layer.weight.dtype)
            self._states = decoder.trunk(z)  # (entries, d): before the expansion into K slots
        self._tokens = torch.full((entries, decoder.chunk_size), -1, dtype=torch.long, device=self.device)
        self.tokens(torch.arange(entries, device=self.device), range(1))

    @torch.no_grad()
    def tokens(self, entries: torch.Tensor, slots: range) -> torch.Tensor:
        """(M,) entries -> (M, len(slots)) their tokens at ``slots``, decoding the missing ones. Each pass of the
        logits reads the whole V x d output matrix, so a few rows cost nearly as much as many: the missing
        tokens of all the slots asked are decoded in one pass (slices of ``max_logits`` on large requests)."""
        entries = entries.to(self.device)
        k = self.decoder.chunk_size
        cols = torch.arange(slots.start, slots.stop, device=self.device)
        missing = self._tokens[entries[:, None], cols] < 0
        if bool(missing.any()):
            row, col = missing.nonzero(as_tuple=True)
            flat = (entries[row] * k + cols[col]).unique()  # (entry, slot) pairs to decode, each once
            entry, slot = flat // k, flat % k
            vectors = self._states.new_empty(flat.numel(), self._states.shape[-1])
            for j in slot.unique().tolist():
                rows = (slot == j).nonzero().squeeze(1)
                vectors[rows] = self.decoder.expand_slot(self._states[entry[rows]], j)
            for start in range(0, flat.numel(), self._rows_per_slice):
                part = slice(start, start + self._rows_per_slice)
                self._tokens[entry[part], slot[part]] = self.decoder.slot_tokens(vectors[part])
        return self._tokens[entries[:, None], cols]

    def same(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(M,) bool: entry a[m] decodes to the same chunk as entry b[m]. Slot j is decoded only for the pairs
        equal on slots < j (all remaining slots at once when few pairs are left)."""
        a, b = a.to(self.device), b.to(self.device)
        k = self.decoder.chunk_size
        equal = torch.ones(a.shape, dtype=torch.bool, device=self.device)
        slot = 0
        while slot < k:
            pairs = equal.nonzero().squeeze(1)
            if not pairs.numel():
                break
            width = self._width(2 * pairs.numel(), k - slot)
            both = self.tokens(torch.cat([a[pairs], b[pairs]]), range(slot, slot + width))  # one pass for both
            equal[pairs] = (both[: pairs.numel()] == both[pairs.numel():]).all(1)
            slot += width
        return equal

    def keys(self, positions: torch.Tensor) -> torch.Tensor:
        """(P',) positions -> (P', N, K) rows whose equality pattern within each position's pool is exactly
        that of the decoded chunks. Slot j is decoded only for draws whose first j tokens are shared with
        another draw of the same pool: once a prefix is unique, so is the chunk, and its remaining slots
        hold a placeholder < 0 unique to that draw. Entries >= 0 are tokens."""
        n, k = self.pool_size, self.decoder.chunk_size
        vocab = self.decoder.output_weight.shape[0]
        positions = positions.to(self.device)
        entries = (positions[:, None] * n + torch.arange(n, device=self.device)).flatten()
        rows = torch.arange(entries.numel(), device=self.device)
        keys = -1 - rows[:, None].repeat(1, k)  # placeholders, unique per draw
        group = rows // n  # draws are compared within their own pool only
        active, slot = rows, 0
        while slot < k:
            width = self._width(active.numel(), k - slot)
            keys[active, slot:slot + width] = self.tokens(entries[active], range(slot, slot + width))
            if slot + width == k:
                break
            # Dense ids of (group, prefix) keep the key small whatever V and K are.
            _, group, counts = torch.unique(group * vocab + keys[active, slot], return_inverse=True,
                                            return_counts=True)
            shared = counts[group] > 1
            active, group, slot = active[shared], group[shared], slot + 1
            if not active.numel():
                break
        return keys.view(positions.numel(), n, k)

    def chunks(self, entries: torch.Tensor) -> torch.Tensor:
        """(M,) entries -> (M, K) their decoded chunks (the tokens ``same`` and ``keys`` compared)."""
        return self.tokens(entries, range(self.decoder.chunk_size))

    def _width(self, rows: int, left: int) -> int:
        """How many slots to decode in the next pass for ``rows`` draws with ``left`` slots to go: all of them
        while that is few logit rows (the pass costs about the same), else one (most pairs differ there)."""
        return left if rows * left <= self.one_pass_rows else 1
