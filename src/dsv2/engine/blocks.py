"""KV block manager: which cache block belongs to which request, with automatic prefix caching.

Pure bookkeeping over block ids 0..num_blocks-1 (no tensors, no model): the engine asks it for
blocks, writes rows into them through `PagedCache`, and tells it which blocks hold computed tokens.
A block is in exactly one of three states: *referenced* (in >= 1 block tables; its refcount says how
many), *cached* (refcount 0 but it carries a prefix hash: findable, evictable) or *free* (neither).

**Allocation** is on demand: a request's table grows by one block when its token count crosses a
block boundary. A new block is, in order of preference: the block right after the request's last one
if it is free (sequences stay mostly contiguous, so decode reads runs of consecutive blocks in place),
else the longest-free block, else the least recently used cached block (evicted: it loses its hash).
A request that cannot get every block it asks for gets none: `allocate` / `admit` change nothing and
say so, and the scheduler decides (wait, or preempt someone). Cached blocks are reclaimed only when
no free block is left, so they survive as long as the space is not needed.

**Prefix hashes.** Full block i of a token sequence is named by the chain hash
h_i = H(h_{i-1}, the block's block_size token ids, cache_key), h_{-1} = a fixed root, H = 128-bit BLAKE2b.
The chain makes a block's name depend on every token before it (the same tokens under another parent
are another block); cache_key (the storage format, e.g. "bf16", "int4/g32") keeps formats apart; a
cryptographic digest rather than Python's 64-bit `hash()` because a collision would silently hand one
prompt another prompt's KV rows. A block gets its hash only when `cache_full_blocks` says it is full
and computed; only then can `lookup_prefix` / `admit` give it to another request, which takes a
reference and never writes it (it computes from the first token after the shared run, and a
request's partial last block is always its own). When a computed block's hash is already registered
(two identical prompts computed side by side), the first stays the cached copy; the duplicate stays
private and goes back to the free pool when freed.

**Eviction** is LRU over unreferenced cached blocks. When its last reference goes (`free`), a cached
block enters the back of the LRU queue and an uncached one the free pool. `free` walks a table
backwards, so a request's tail is queued (and evicted) before its prefix, the part most likely shared.
A hit on an unreferenced cached block takes it out of the queue again.

**Protocol** (what the scheduler calls): at admission `admit(rid, tokens, num_tokens, reserve)`
(hits + the first chunk's blocks, atomically, keeping `reserve` blocks as a watermark; `peek_prefix`
first to size the chunk) and compute from the returned token count on; before each step
`allocate(rid, num_computed + n)` for the n tokens scheduled (False: preempt someone and retry);
after each step `cache_full_blocks(rid, tokens, num_computed)`, num_computed counting only tokens whose
rows are in the cache for *every* layer; `free(rid)` on finish, abort and preemption. A preempted
request is re-admitted with `admit(rid, prompt + output)`: its own registered blocks come back as hits
unless they were evicted meanwhile.

Every operation costs O(blocks it touches): OrderedDicts for the free pool and the LRU queue, a dict
for hash -> block. Only `check_invariants` (a debugging aid for tests) scans every block.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

_ROOT = bytes(16)  # the parent hash of a sequence's first block


class UnknownRequestError(KeyError):
    """A request id the block manager does not hold (never admitted, or already freed)."""

    def __str__(self) -> str:  # KeyError would print the message's repr, quotes and all
        return str(self.args[0]) if self.args else "unknown request"


@dataclass
class BlockStats:
    """Prefix-cache counters since the manager was built (admissions that did not fit are not counted)."""

    lookups: int = 0  # admissions that consulted the cache
    query_blocks: int = 0  # full blocks those admissions could have hit (capped as lookup_prefix is)
    hit_blocks: int = 0
    query_tokens: int = 0  # tokens of the sequences looked up
    hit_tokens: int = 0  # tokens served from the cache: prefill the engine does not redo
    evictions: int = 0  # cached blocks reclaimed for new rows

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up tokens served from the cache."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    @property
    def tokens_saved(self) -> int:
        return self.hit_tokens


@dataclass
class _Seq:
    """One request's block table and the chain hashes of its leading full, computed blocks."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # hashes[i] names blocks[i]; len(hashes) <= len(blocks)


class BlockManager:
    """Block tables, refcounts, free pool, prefix-hash map and LRU of `num_blocks` blocks of `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True, cache_key: str = "") -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching, self.cache_key = prefix_caching, cache_key
        self._key = cache_key.encode()
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # chain hash -> the block holding those rows
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # uncached, unreferenced
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; front = evicted first
        self._seqs: dict[Hashable, _Seq] = {}
        self.stats = BlockStats()

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks allocatable right now: free ones plus unreferenced cached ones (evictable)."""
        return len(self._free) + len(self._lru)

    @property
    def num_cached(self) -> int:
        """Blocks carrying a prefix hash (referenced or not)."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._seqs

    def block_table(self, request_id: Hashable) -> list[int]:
        """The request's block ids in token order (a copy)."""
        return list(self._seq(request_id).blocks)

    def hash_blocks(self, token_ids: Sequence[int]) -> list[bytes]:
        """Chain hashes of every full block of token_ids under this manager's cache_key."""
        out, parent, bs = [], _ROOT, self.block_size
        for i in range(len(token_ids) // bs):
            parent = self._hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            out.append(parent)
        return out

    def peek_prefix(self, token_ids: Sequence[int]) -> int:
        """Tokens `lookup_prefix` would cover now, changing nothing (for planning a step's token budget)."""
        return len(self._match(token_ids)[0]) * self.block_size

    def can_allocate(self, request_id: Hashable, num_tokens: int, reserve: int = 0) -> bool:
        """Would `allocate(request_id, num_tokens)` succeed and leave >= reserve blocks allocatable?"""
        return self.num_free - self._need(request_id, num_tokens) >= reserve

    # ---- admission and growth ------------------------------------------------------------------
    def lookup_prefix(self, request_id: Hashable, token_ids: Sequence[int]) -> int:
        """Start the request's table with the longest run of cached blocks matching token_ids (taking a
        reference on each) and return the tokens covered: a multiple of block_size, at most
        (len(token_ids) - 1) // block_size blocks so at least one token is left to compute (the engine
        needs its logits); 0 when prefix caching is off. The request must hold no blocks yet."""
        self._check_new(request_id)
        blocks, hashes = self._match(token_ids)
        self._commit_hits(request_id, token_ids, blocks, hashes)
        return len(blocks) * self.block_size

    def admit(self, request_id: Hashable, token_ids: Sequence[int], num_tokens: int | None = None,
              reserve: int = 0) -> int | None:
        """`lookup_prefix` + `allocate(request_id, num_tokens)` as one step (num_tokens: total tokens the
        table must cover, default len(token_ids)), only if afterwards >= reserve blocks stay allocatable
        (the admission watermark). Returns the cached tokens, or None with nothing changed."""
        self._check_new(request_id)
        num_tokens = len(token_ids) if num_tokens is None else num_tokens
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        blocks, hashes = self._match(token_ids)
        revived = sum(1 for b in blocks if self._ref[b] == 0)  # hits that leave the LRU: no longer allocatable
        need = max(0, self.blocks_for(num_tokens) - len(blocks))
        if self.num_free - revived - need < reserve:
            return None
        self._commit_hits(request_id, token_ids, blocks, hashes)
        self.allocate(request_id, num_tokens)
        return len(blocks) * self.block_size

    def allocate(self, request_id: Hashable, num_tokens: int) -> bool:
        """Grow the request's table to cover num_tokens tokens in total (never shrinks it; creates the
        request if new). False, with nothing changed, if the blocks cannot all be had."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        need = self._need(request_id, num_tokens)
        if need > self.num_free:
            return False
        blocks = self._seqs.setdefault(request_id, _Seq()).blocks
        for _ in range(need):
            blocks.append(self._take_block(blocks[-1] + 1 if blocks else None))
        return True

    def cache_full_blocks(self, request_id: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        """Register every block of the request that is now full and computed (its first num_computed
        tokens are in the cache) and not yet registered, making it findable by later lookups.
        token_ids: the request's tokens so far (prompt + generated); only the first num_computed are read."""
        seq = self._seq(request_id)
        if not self.prefix_caching:
            return
        if num_computed > len(token_ids):
            raise ValueError(f"num_computed={num_computed} > the {len(token_ids)} token ids given "
                             f"for request {request_id!r}")
        if num_computed > len(seq.blocks) * self.block_size:
            raise ValueError(f"num_computed={num_computed} but request {request_id!r} holds only "
                             f"{len(seq.blocks)} blocks ({len(seq.blocks) * self.block_size} tokens)")
        bs, parent = self.block_size, seq.hashes[-1] if seq.hashes else _ROOT
        for i in range(len(seq.hashes), num_computed // bs):
            parent = self._hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            seq.hashes.append(parent)  # kept even for a duplicate: its successors chain from it
            if parent not in self._cached:
                b = seq.blocks[i]  # a block past the hashed run was never shared, so it carries no hash
                self._cached[parent], self._hash[b] = b, parent

    # ---- release -------------------------------------------------------------------------------
    def free(self, request_id: Hashable) -> None:
        """Drop all the request's references (finish, abort or preemption). Blocks still referenced by
        others stay; cached ones whose last reference goes join the LRU, tail first; the rest become free."""
        seq = self._seq(request_id)
        del self._seqs[request_id]
        released = []
        for b in reversed(seq.blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash[b] is None:
                    released.append(b)
                else:
                    self._lru[b] = None
        for b in reversed(released):  # in table order, so a later request gets them back as a run
            self._free[b] = None

    def reset_prefix_cache(self) -> None:
        """Forget every prefix hash (e.g. after new weights are loaded): unreferenced cached blocks become
        free; blocks in use stay with their requests but are no longer findable."""
        for b in self._cached.values():
            self._hash[b] = None
            if self._ref[b] == 0:
                del self._lru[b]
                self._free[b] = None
        self._cached.clear()

    # ---- checks --------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken invariant (scans everything: tests only)."""
        n, held = self.num_blocks, [0] * self.num_blocks
        for rid, seq in self._seqs.items():
            assert len(set(seq.blocks)) == len(seq.blocks), f"request {rid!r} holds a block twice: {seq.blocks}"
            assert len(seq.hashes) <= len(seq.blocks), (f"request {rid!r}: {len(seq.hashes)} hashes for "
                                                        f"{len(seq.blocks)} blocks")
            for b in seq.blocks:
                assert 0 <= b < n, f"request {rid!r} holds block {b}, outside 0..{n - 1}"
                held[b] += 1
        for b in range(n):
            assert self._ref[b] == held[b], f"block {b}: refcount {self._ref[b]} but held by {held[b]} tables"
            in_free, in_lru, h = b in self._free, b in self._lru, self._hash[b]
            if held[b]:
                assert not in_free and not in_lru, f"block {b} is referenced and also in the free pool or LRU"
            else:
                assert in_free or in_lru, f"block {b} leaked: unreferenced, yet neither free nor cached"
                assert not (in_free and in_lru), f"block {b} is both free and in the LRU"
            assert not (in_free and h is not None), f"block {b} is in the free pool but still has a hash"
            assert not (in_lru and h is None), f"block {b} is in the LRU without a hash"
            assert h is None or self._cached.get(h) == b, f"block {b}'s hash maps to block {self._cached.get(h)}"
        referenced = sum(1 for c in held if c)
        assert len(self._free) + len(self._lru) + referenced == n, (
            f"free {len(self._free)} + cached-unreferenced {len(self._lru)} + referenced {referenced} != {n}")
        for h, b in self._cached.items():
            assert self._hash[b] == h, f"hash map names block {b}, which carries another hash"
        for rid, seq in self._seqs.items():
            for i, b in enumerate(seq.blocks):
                if i < len(seq.hashes):  # a registered block must sit where its hash says it does
                    assert self._hash[b] in (None, seq.hashes[i]), f"request {rid!r} block {i} ({b}): wrong hash"
                else:  # not (yet) full and computed: must be the request's own
                    assert held[b] == 1, f"request {rid!r} shares block {b} (index {i}), not a computed full block"
                    assert self._hash[b] is None, f"request {rid!r} block {b} (index {i}) is hashed but not computed"

    # ---- internals -----------------------------------------------------------------------------
    def _seq(self, request_id: Hashable) -> _Seq:
        try:
            return self._seqs[request_id]
        except KeyError:
            raise UnknownRequestError(f"unknown request id {request_id!r}: never given blocks, "
                                      "or already freed") from None

    def _check_new(self, request_id: Hashable) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None and seq.blocks:
            raise ValueError(f"request {request_id!r} already holds {len(seq.blocks)} blocks: a prefix "
                             "lookup is for admission (free it first to re-admit)")

    def _need(self, request_id: Hashable, num_tokens: int) -> int:
        seq = self._seqs.get(request_id)
        return max(0, self.blocks_for(num_tokens) - (len(seq.blocks) if seq else 0))

    def _hash_block(self, parent: bytes, tokens: Sequence[int]) -> bytes:
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", tokens).tobytes())  # fixed width: a full block is always block_size * 8 bytes
        h.update(self._key)
        return h.digest()

    def _match(self, token_ids: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """The cached blocks (and their hashes) matching the start of token_ids, leaving >= 1 token."""
        blocks: list[int] = []
        hashes: list[bytes] = []
        if not self.prefix_caching:
            return blocks, hashes
        parent, bs = _ROOT, self.block_size
        for i in range((len(token_ids) - 1) // bs):
            parent = self._hash_block(parent, token_ids[i * bs:(i + 1) * bs])
            b = self._cached.get(parent)
            if b is None:
                break
            blocks.append(b)
            hashes.append(parent)
        return blocks, hashes

    def _commit_hits(self, request_id: Hashable, token_ids: Sequence[int], blocks: list[int],
                     hashes: list[bytes]) -> None:
        for b in blocks:
            if self._ref[b] == 0:
                del self._lru[b]  # in use again: not evictable
            self._ref[b] += 1
        seq = self._seqs.setdefault(request_id, _Seq())
        seq.blocks, seq.hashes = list(blocks), hashes
        if self.prefix_caching:
            st, cap = self.stats, max(0, (len(token_ids) - 1) // self.block_size)
            st.lookups += 1
            st.query_blocks += cap
            st.hit_blocks += len(blocks)
            st.query_tokens += len(token_ids)
            st.hit_tokens += len(blocks) * self.block_size

    def _take_block(self, after: int | None) -> int:
        """One block for a table whose last block is after - 1: `after` if free, else the longest-free
        block, else the LRU cached block (evicted). The caller has checked that one is allocatable."""
        if after is not None and after in self._free:
            del self._free[after]
            b = after
        elif self._free:
            b = self._free.popitem(last=False)[0]
        else:
            b = self._lru.popitem(last=False)[0]
            del self._cached[self._hash[b]]  # type: ignore[index]  # an LRU block always has a hash
            self._hash[b] = None  # its rows are about to be overwritten: no stale hit
            self.stats.evictions += 1
        self._ref[b] = 1
        return b
