"""Reusable KV of completed prompt prefixes, in blocks of ``BLOCK_TOKENS``, evicted LRU.

A block is the K/V of 16 prompt tokens, keyed by its tokens and the block before it, so a
chain of blocks from the first is one exact prompt prefix: two prompts share a block only when
every token up to its end is the same. A prompt's blocks are stored once it is prefilled; a
later prompt that starts with a stored chain copies that KV in and prefills only the rest.
Blocks are host (numpy) copies, outside the running batch's cache, so a sequence that leaves
or is aborted never invalidates them. The store holds at most ``max_tokens`` tokens; past it
the least recently used block goes first, and since a block is touched after every block
after it in its chain, the least recently used block is always a leaf.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

BLOCK_TOKENS = 16  # vLLM's default block size: small enough to share a system prompt's tail
_ROOT = -1  # the parent id of a prompt's first block

# K/V of a run of tokens: [K/V tensors (layer by layer, key then value), kv heads, tokens,
# head dim], as the decoders' ``read_kv`` and the engine's cache slices produce it.
PrefixKV = np.ndarray
_TOKEN_AXIS = 2


@dataclass(eq=False)
class _Block:
    key: tuple[int, tuple[int, ...]]  # (the previous block's id or _ROOT, this block's tokens)
    id: int
    kv: PrefixKV
    parent: _Block | None
    children: int = 0


class PrefixCache:
    """Cached prompt prefixes of one engine (one model version), at most ``max_tokens``."""

    def __init__(self, max_tokens: int) -> None:
        self.max_blocks = max_tokens // BLOCK_TOKENS
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()
        self._ids = itertools.count()

    @property
    def num_tokens(self) -> int:
        """Tokens whose K/V the cache holds."""
        return len(self._blocks) * BLOCK_TOKENS

    @property
    def nbytes(self) -> int:
        """Host memory the cached K/V occupies."""
        return sum(block.kv.nbytes for block in self._blocks.values())

    def match(self, token_ids: Sequence[int], limit: int) -> int:
        """Tokens of the longest cached prefix of ``token_ids``, at most ``limit``."""
        return len(self._chain(token_ids, limit)) * BLOCK_TOKENS

    def take(self, token_ids: Sequence[int], limit: int) -> PrefixKV | None:
        """A copy of the K/V of the longest cached prefix of ``token_ids`` (at most ``limit``
        tokens), now the most recently used; ``None`` when not even one block matches."""
        chain = self._chain(token_ids, limit)
        if not chain:
            return None
        self._touch(chain)
        return np.concatenate([block.kv for block in chain], axis=_TOKEN_AXIS)

    def insert(self, token_ids: Sequence[int], read: Callable[[int, int], PrefixKV]) -> None:
        """Store the whole blocks of a prefilled prompt; ``read(start, end)`` gives the K/V of
        its tokens ``[start, end)``, called once, for the blocks not cached yet."""
        num_blocks = min(len(token_ids) // BLOCK_TOKENS, self.max_blocks)
        chain = self._chain(token_ids, num_blocks * BLOCK_TOKENS)
        self._touch(chain)  # so the eviction below never takes this prompt's own blocks
        if len(chain) == num_blocks:
            return
        self._evict(len(self._blocks) + num_blocks - len(chain) - self.max_blocks)
        start = len(chain) * BLOCK_TOKENS
        kv = read(start, num_blocks * BLOCK_TOKENS)
        parent = chain[-1] if chain else None
        for index in range(len(chain), num_blocks):
            offset = index * BLOCK_TOKENS - start
            block = _Block(
                key=(_ROOT if parent is None else parent.id, _block_tokens(token_ids, index)),
                id=next(self._ids),
                # A copy: a slice would keep the whole read alive after its neighbours' eviction.
                kv=kv[:, :, offset : offset + BLOCK_TOKENS].copy(),
                parent=parent,
            )
            if parent is not None:
                parent.children += 1
            self._blocks[block.key] = block
            chain.append(block)
            parent = block
        self._touch(chain)

    def _chain(self, token_ids: Sequence[int], limit: int) -> list[_Block]:
        """The cached blocks that spell ``token_ids``' first ``limit`` tokens, as far as they go."""
        chain: list[_Block] = []
        parent_id = _ROOT
        for index in range(min(limit, len(token_ids)) // BLOCK_TOKENS):
            block = self._blocks.get((parent_id, _block_tokens(token_ids, index)))
            if block is None:
                break
            chain.append(block)
            parent_id = block.id
        return chain

    def _touch(self, chain: list[_Block]) -> None:
        """Make ``chain`` the most recently used, each block after the blocks that follow it."""
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)

    def _evict(self, count: int) -> None:
        """Drop the ``count`` least recently used blocks (each a leaf when dropped)."""
        for _ in range(count):
            _key, block = self._blocks.popitem(last=False)
            assert block.children == 0, "a prefix block outlived its parent's eviction order"
            if block.parent is not None:
                block.parent.children -= 1


def _block_tokens(token_ids: Sequence[int], index: int) -> tuple[int, ...]:
    return tuple(token_ids[index * BLOCK_TOKENS : (index + 1) * BLOCK_TOKENS])
