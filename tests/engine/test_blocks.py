"""BlockManager: on-demand allocation, prefix caching (hash chain, LRU eviction), free/preempt, invariants.

Hand-computed block tables for each policy, then a seeded fuzz checked every operation against an
independent model that names cached blocks by their whole token prefix (not a hash chain) and
counts blocks instead of tracking ids.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from dataclasses import dataclass

import pytest

from dsv2.engine.blocks import BlockManager, UnknownRequestError


def _prefill(m: BlockManager, rid: str, toks: list[int]) -> int | None:
    """Admit rid for all of toks and compute them (one whole prefill); the cached tokens it started from."""
    got = m.admit(rid, toks)
    if got is not None:
        m.cache_full_blocks(rid, toks, len(toks))
    return got


def test_on_demand_allocation_prefers_the_next_block() -> None:
    m = BlockManager(8, 4)
    assert m.allocate("a", 1) and m.block_table("a") == [0]
    assert m.allocate("a", 4) and m.block_table("a") == [0]  # still inside block 0
    assert m.allocate("a", 5) and m.block_table("a") == [0, 1]
    assert m.allocate("b", 4) and m.block_table("b") == [2]
    assert m.allocate("a", 9) and m.block_table("a") == [0, 1, 3]  # 2 is b's: the longest-free block
    m.free("b")  # free pool: 4 5 6 7 2
    assert m.allocate("a", 13) and m.block_table("a") == [0, 1, 3, 4]  # right after 3
    assert m.allocate("c", 8) and m.block_table("c") == [5, 6]
    assert m.allocate("d", 8) and m.block_table("d") == [7, 2]  # 8 does not exist: the pool's front
    assert m.num_free == 0 and not m.allocate("e", 1) and "e" not in m
    assert m.allocate("e", 0) and m.block_table("e") == []  # nothing needed: always fits
    m.check_invariants()


def test_failed_allocation_changes_nothing_then_evicts_lru_tail_first() -> None:
    m = BlockManager(4, 4)
    p = list(range(9))
    assert m.allocate("a", 9) and m.block_table("a") == [0, 1, 2]
    m.cache_full_blocks("a", p, 9)
    m.free("a")  # cached 0, 1 -> LRU (tail first: 1 then 0); 2 -> free pool (3, 2)
    assert m.num_free == 4 and m.num_cached == 2
    assert m.allocate("b", 4) and m.block_table("b") == [3]
    assert not m.allocate("b", 20) and m.block_table("b") == [3]  # 4 more needed, 3 allocatable
    assert not m.allocate("c", 16) and "c" not in m
    assert (m.num_free, m.num_cached, m.stats.evictions) == (3, 2, 0)
    assert m.can_allocate("b", 16) and not m.can_allocate("b", 16, reserve=1) and m.can_allocate("b", 12, reserve=1)
    assert m.allocate("b", 16) and m.block_table("b") == [3, 2, 1, 0]  # free 2, then evict 1 (a's tail), then 0
    assert (m.num_free, m.num_cached, m.stats.evictions) == (0, 0, 2)
    m.check_invariants()


def test_prefix_hit_shares_computed_full_blocks_only() -> None:
    m = BlockManager(16, 4)
    p = list(range(10))
    assert m.lookup_prefix("a", p) == 0 and m.allocate("a", 10) and m.block_table("a") == [0, 1, 2]
    assert m.peek_prefix(p) == 0  # allocated but not computed: nothing to share yet
    m.cache_full_blocks("a", p, 6)  # only block 0 is full and computed
    assert m.num_cached == 1 and m.peek_prefix(p) == 4
    m.cache_full_blocks("a", p, 10)
    assert m.num_cached == 2 and m.peek_prefix(p) == 8
    assert m.admit("c", p) == 8 and m.block_table("c") == [0, 1, 3]  # a's two full blocks + its own partial one
    m.cache_full_blocks("c", p, 10)  # nothing new: its full blocks are the shared ones
    assert m.num_cached == 2
    m.check_invariants()
    m.free("a")  # still held by c: neither free nor evictable
    assert m.num_free == 16 - 3
    m.check_invariants()
    m.free("c")
    assert m.num_free == 16 and m.num_cached == 2
    m.check_invariants()
    st = m.stats
    assert (st.lookups, st.query_blocks, st.hit_blocks, st.query_tokens, st.hit_tokens) == (2, 4, 2, 20, 8)
    assert st.tokens_saved == 8 and st.hit_rate == pytest.approx(0.4)


def test_never_the_whole_prompt() -> None:
    m = BlockManager(8, 4)
    p = list(range(8))
    assert m.allocate("a", 8)
    m.cache_full_blocks("a", p, 8)
    assert m.num_cached == 2
    assert m.lookup_prefix("b", p) == 4  # (8 - 1) // 4 = 1 block: the last token is computed for its logits
    assert m.block_table("b") == [0]
    assert m.lookup_prefix("c", p + [99]) == 8 and m.block_table("c") == [0, 1]
    assert m.lookup_prefix("d", p[:4]) == 0 and m.lookup_prefix("e", []) == 0
    m.check_invariants()


def test_same_prompt_admitted_in_the_same_step() -> None:
    m = BlockManager(16, 4)
    p = list(range(12))
    assert m.admit("a", p) == 0 and m.block_table("a") == [0, 1, 2]
    assert m.admit("b", p) == 0 and m.block_table("b") == [3, 4, 5]  # a's blocks are not computed yet
    m.cache_full_blocks("a", p, 12)
    m.cache_full_blocks("b", p, 12)  # same hashes: a's blocks stay the cached copy, b's stay private
    assert m.num_cached == 3
    m.check_invariants()
    m.free("a")
    m.free("b")
    assert m.num_cached == 3 and m.num_free == 16
    assert m.admit("c", p) == 8 and m.block_table("c")[:2] == [0, 1]
    m.check_invariants()


def test_evicted_block_loses_its_hash() -> None:
    m = BlockManager(4, 4)
    p, q = list(range(9)), list(range(100, 116))
    assert m.allocate("a", 9) and m.block_table("a") == [0, 1, 2]
    m.cache_full_blocks("a", p, 9)
    m.free("a")
    assert m.allocate("b", 16) and m.block_table("b") == [3, 2, 1, 0]  # reuses a's cached blocks
    assert m.stats.evictions == 2 and m.num_cached == 0
    assert m.peek_prefix(p) == 0  # no stale hit on blocks now holding q's rows
    m.cache_full_blocks("b", q, 16)
    m.free("b")
    assert m.peek_prefix(p) == 0 and m.peek_prefix(q) == 12
    assert m.admit("c", q + [7], num_tokens=16) == 16 and m.block_table("c") == [3, 2, 1, 0]
    m.check_invariants()


def test_lru_evicts_least_recent_request_and_its_tail_first() -> None:
    m = BlockManager(6, 2)
    x, y = [1, 2, 3, 4, 5], [7, 8, 9, 10, 11]
    for rid, toks in (("x", x), ("y", y)):
        assert _prefill(m, rid, toks) == 0
        m.free(rid)
    assert m.num_cached == 4 and m.num_free == 6  # LRU: x's 1 0, then y's 4 3
    assert m.allocate("z", 6) and m.block_table("z") == [2, 5, 1]  # two free blocks, then x's tail evicted
    assert m.peek_prefix(x) == 2 and m.peek_prefix(y) == 4
    assert m.admit("w", y) == 4 and m.block_table("w") == [3, 4, 0]  # y's blocks leave the LRU; x's head evicted
    assert m.peek_prefix(x) == 0 and m.stats.evictions == 2
    assert not m.allocate("z", 8)  # only referenced blocks left
    m.check_invariants()


def test_same_tokens_under_another_parent_do_not_match() -> None:
    m = BlockManager(16, 2)
    a = [1, 2, 3, 4, 9]
    assert _prefill(m, "a", a) == 0
    assert m.peek_prefix([5, 6, 3, 4, 9]) == 0  # block [3, 4] under another first block
    assert m.peek_prefix([1, 2, 3, 5, 9]) == 2
    assert m.peek_prefix([1, 2, 3, 4, 0, 0]) == 4
    assert _prefill(m, "b", [5, 6, 3, 4, 9]) == 0
    assert m.num_cached == 4  # b's [3, 4] is a block of its own
    h = m.hash_blocks([1, 2, 1, 2])
    assert len(h) == 2 and h[0] != h[1]  # same tokens, different parent
    m.check_invariants()


def test_cache_key_separates_formats_and_prefix_caching_off() -> None:
    p = list(range(12))
    bf16, int4, bf16_again = (BlockManager(8, 4, cache_key=k) for k in ("bf16", "int4/g32", "bf16"))
    assert bf16.hash_blocks(p) == bf16_again.hash_blocks(p)
    assert not set(bf16.hash_blocks(p)) & set(int4.hash_blocks(p))
    off = BlockManager(8, 4, prefix_caching=False)
    assert off.admit("a", p) == 0 and off.block_table("a") == [0, 1, 2]
    off.cache_full_blocks("a", p, 12)
    assert off.num_cached == 0
    off.free("a")
    assert off.lookup_prefix("b", p) == 0 and off.peek_prefix(p) == 0 and off.stats.lookups == 0
    assert off.allocate("b", 32) and off.block_table("b") == [3, 4, 5, 6, 7, 0, 1, 2]  # freed blocks: back, in order
    off.check_invariants()


def test_preempted_request_gets_its_blocks_back() -> None:
    m = BlockManager(16, 4)
    toks = [5, 1, 4, 1, 5, 9]
    assert _prefill(m, "r", toks) == 0
    for t in (2, 6, 5):  # decode: each sampled token is fed (allocated, computed, cached) the next step
        toks.append(t)
        assert m.allocate("r", len(toks))
        m.cache_full_blocks("r", toks, len(toks))
    toks.append(3)  # sampled, not yet fed
    assert m.allocate("r", len(toks)) and m.block_table("r") == [0, 1, 2]
    m.free("r")  # preempted: blocks 0 and 1 (tokens 0-7, computed) stay cached
    assert m.admit("r", toks) == 8 and m.block_table("r") == [0, 1, 2]  # recompute only token 8
    m.check_invariants()


def test_reset_prefix_cache() -> None:
    m = BlockManager(8, 2)
    p = [1, 2, 3, 4, 5]
    assert _prefill(m, "a", p) == 0
    assert m.admit("b", p) == 4
    m.free("a")
    m.free("b")
    assert m.admit("c", p) == 4 and _prefill(m, "d", [9, 9, 9]) == 0
    m.free("d")  # c holds the cached blocks 0, 1; d's block is cached and unreferenced
    m.reset_prefix_cache()
    assert m.num_cached == 0 and m.peek_prefix(p) == 0 and m.peek_prefix([9, 9, 9]) == 0 and m.num_free == 5
    m.check_invariants()
    m.free("c")
    assert m.num_free == 8 and m.num_cached == 0
    m.check_invariants()


def test_errors_name_the_problem() -> None:
    m = BlockManager(4, 4)
    with pytest.raises(UnknownRequestError, match="unknown request id 'zz'"):
        m.free("zz")
    assert m.allocate("a", 4)
    m.free("a")
    with pytest.raises(KeyError, match="already freed"):  # twice
        m.free("a")
    for call in (lambda: m.block_table("a"), lambda: m.cache_full_blocks("a", [1], 1)):
        with pytest.raises(UnknownRequestError):
            call()
    assert m.allocate("b", 4)
    with pytest.raises(ValueError, match="already holds 1 blocks"):
        m.lookup_prefix("b", [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="holds only 1 blocks"):
        m.cache_full_blocks("b", list(range(8)), 8)
    with pytest.raises(ValueError, match="num_computed=3 > the 2 token ids"):
        m.cache_full_blocks("b", [1, 2], 3)
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
        m.allocate("b", -1)
    for bad in ((0, 4), (4, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            BlockManager(*bad)


def test_admit_is_atomic_and_keeps_the_watermark() -> None:
    m = BlockManager(4, 4)
    p = list(range(9))
    assert _prefill(m, "a", p) == 0
    m.free("a")  # LRU 1 0, free 3 2
    assert m.admit("b", p, reserve=2) is None  # 2 hits leave the LRU + 1 new block: 1 left < 2
    assert "b" not in m and m.num_free == 4 and m.stats.lookups == 1  # a's miss only
    assert m.admit("b", p, reserve=1) == 8 and m.block_table("b") == [0, 1, 2]  # 2 is free and right after 1
    assert m.num_free == 1
    assert m.admit("c", [1] * 5, num_tokens=8) is None and "c" not in m
    assert m.admit("c", [1] * 5, num_tokens=4) == 0 and m.block_table("c") == [3]
    m.check_invariants()


@pytest.mark.parametrize("corrupt,message", [
    (lambda m: m._ref.__setitem__(0, 2), "refcount 2 but held by 1"),
    (lambda m: m._free.popitem(last=False), "leaked"),
    (lambda m: m._hash.__setitem__(5, b"x" * 16), "free pool but still has a hash"),
    (lambda m: m._seqs["a"].blocks.append(0), "holds a block twice"),
    (lambda m: m._lru.__setitem__(7, None), "both free and in the LRU"),
])
def test_check_invariants_names_what_broke(corrupt, message) -> None:
    m = BlockManager(8, 2)
    assert m.allocate("a", 4)
    m.check_invariants()
    corrupt(m)
    with pytest.raises(AssertionError, match=message):
        m.check_invariants()


def test_check_invariants_catches_a_shared_partial_block() -> None:
    m = BlockManager(8, 2)
    assert m.allocate("a", 3) and m.allocate("b", 2)
    m._seqs["b"].blocks.append(1)  # a's partial block slipped into b's table
    m._ref[1] += 1
    with pytest.raises(AssertionError, match="shares block 1"):
        m.check_invariants()


# ---- randomised: the manager against an independent model -------------------------------------------------

class _Blk:
    """A block as the model sees it: the token prefix it caches (None if uncached) and its refcount."""

    __slots__ = ("key", "ref", "bid")

    def __init__(self) -> None:
        self.key: tuple[int, ...] | None = None
        self.ref = 1
        self.bid: int | None = None  # the manager's id for it, learned the first time it appears in a table


class _Model:
    """Block counts plus an LRU of prefixes: what each request's table holds, which prefixes must hit."""

    def __init__(self, num_blocks: int, bs: int) -> None:
        self.bs, self.n_free, self.evictions = bs, num_blocks, 0
        self.seen: Counter[str] = Counter()  # which paths the fuzz reached
        self.entries: dict[tuple[int, ...], _Blk] = {}  # whole token prefix -> the block caching its last block
        self.lru: OrderedDict[_Blk, None] = OrderedDict()
        self.tables: dict[int, list[_Blk]] = {}
        self.hashed: dict[int, int] = {}  # leading blocks already named (hit or registered)

    @property
    def num_free(self) -> int:
        return self.n_free + len(self.lru)

    def match(self, toks: list[int]) -> list[_Blk]:
        out = []
        for i in range((len(toks) - 1) // self.bs):
            b = self.entries.get(tuple(toks[:(i + 1) * self.bs]))
            if b is None:
                break
            out.append(b)
        return out

    def admit(self, rid: int, toks: list[int], num_tokens: int, reserve: int) -> int | None:
        hits = self.match(toks)
        need = max(0, -(-num_tokens // self.bs) - len(hits))
        if self.num_free - sum(b.ref == 0 for b in hits) - need < reserve:
            return None
        for b in hits:
            self.seen["hit on an unreferenced block" if b.ref == 0 else "hit on a block in use"] += 1
            if b.ref == 0:
                del self.lru[b]
            b.ref += 1
        self.tables[rid], self.hashed[rid] = list(hits), len(hits)
        assert self.allocate(rid, num_tokens)
        return len(hits) * self.bs

    def allocate(self, rid: int, num_tokens: int) -> bool:
        table = self.tables.get(rid, [])
        need = -(-num_tokens // self.bs) - len(table)
        if need > self.num_free:
            return False
        for _ in range(max(0, need)):
            if self.n_free:
                self.n_free -= 1
            else:
                old, _ = self.lru.popitem(last=False)
                self.seen["eviction"] += 1
                del self.entries[old.key]
                self.evictions += 1
            table.append(_Blk())
        self.tables[rid] = table
        self.hashed.setdefault(rid, 0)
        return True

    def cache(self, rid: int, toks: list[int], computed: int) -> None:
        table = self.tables[rid]
        for i in range(self.hashed[rid], computed // self.bs):
            key = tuple(toks[:(i + 1) * self.bs])
            if key not in self.entries:
                self.entries[key], table[i].key = table[i], key
            else:
                self.seen["duplicate computed block"] += 1
        self.hashed[rid] = max(self.hashed[rid], computed // self.bs)

    def free(self, rid: int) -> None:
        for b in reversed(self.tables.pop(rid)):
            b.ref -= 1
            if b.ref == 0:
                if b.key is None:
                    self.n_free += 1
                else:
                    self.lru[b] = None
        del self.hashed[rid]

    def reset(self) -> None:
        for b in self.entries.values():
            b.key = None
            if b.ref == 0:
                del self.lru[b]
                self.n_free += 1
        self.entries.clear()


@dataclass
class _Req:
    toks: list[int]
    limit: int  # finishes once this many tokens are computed
    computed: int = 0


def _learn(m: BlockManager, model: _Model, rid: int) -> None:
    """Record the manager's ids for the model's new blocks now: they may be freed before the next compare."""
    for bid, b in zip(m.block_table(rid), model.tables[rid]):
        if b.bid is None:
            b.bid = bid


def _compare(m: BlockManager, model: _Model) -> None:
    m.check_invariants()
    assert m.num_free == model.num_free and m.num_cached == len(model.entries)
    assert m.stats.evictions == model.evictions
    live: dict[int, _Blk] = {}
    for rid, mtable in model.tables.items():
        table = m.block_table(rid)
        assert len(table) == len(mtable), f"request {rid}: {len(table)} blocks, model says {len(mtable)}"
        for bid, b in zip(table, mtable):
            if b.bid is None:
                b.bid = bid
            assert b.bid == bid, f"request {rid}: block {bid} where the model's shared block is {b.bid}"
            assert live.setdefault(bid, b) is b, f"block {bid} stands for two different model blocks"
    assert list(m._lru) == [b.bid for b in model.lru]  # same eviction order


@pytest.mark.parametrize("seed,bs,nb", [(0, 4, 40), (1, 4, 40), (2, 1, 120), (3, 2, 24)])
def test_fuzz_against_model(seed: int, bs: int, nb: int) -> None:
    rng = random.Random(seed)
    m, model = BlockManager(nb, bs, cache_key="bf16"), _Model(nb, bs)
    # a few shared prefixes; 'b' repeats a's second block under another parent; tiny vocab for the rest
    base = {"a": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], "b": [9, 9, 9, 9, 5, 6, 7, 8, 1, 2], "c": [3] * 13, "d": []}
    running: dict[int, _Req] = {}
    waiting: list[tuple[int, _Req]] = []
    order: list[int] = []  # admission order of running requests (the most recent is preempted)
    freed: list[int] = []
    next_id, hit_tokens = 0, 0
    for _ in range(2000):
        op = rng.random()
        if op < 0.2 and len(waiting) < 8:  # a new request
            prefix = base[rng.choice("abcd")]
            toks = prefix[:rng.randint(0, len(prefix))] + [rng.randrange(3) for _ in range(rng.randint(1, 6))]
            waiting.append((next_id, _Req(toks, len(toks) + rng.randint(0, 10))))
            next_id += 1
        elif op < 0.4 and waiting:  # admit the head of the queue (sometimes as lookup + allocate)
            rid, req = waiting[0]
            hits = len(model.match(req.toks)) * bs
            assert m.peek_prefix(req.toks) == hits
            num = min(len(req.toks), hits + rng.randint(1, 3 * bs))
            reserve = rng.choice([0, 0, 1, 3])
            if rng.random() < 0.7:
                got, want = m.admit(rid, req.toks, num, reserve), model.admit(rid, req.toks, num, reserve)
            else:  # the two-call protocol: undo the lookup with free when the rest does not fit
                got = m.lookup_prefix(rid, req.toks)
                want = model.admit(rid, req.toks, 0, 0)
                if not m.allocate(rid, num):
                    assert not model.allocate(rid, num)
                    m.free(rid)  # the lookup's hits were counted all the same
                    model.free(rid)
                    hit_tokens += got
                    got = want = None
                else:
                    assert model.allocate(rid, num)
            assert got == want, f"admit {rid}: {got} cached tokens, model says {want}"
            if got is not None:
                _learn(m, model, rid)
                hit_tokens += got
                req.computed = got
                running[rid] = req
                order.append(rid)
                waiting.pop(0)
        elif op < 0.85 and running:  # one step of one request: compute a chunk, feed a sampled token
            rid = rng.choice(list(running))
            req = running[rid]
            target = min(len(req.toks), req.computed + rng.randint(1, 2 * bs))
            ok = m.allocate(rid, target)
            assert ok == model.allocate(rid, target)
            if ok:
                _learn(m, model, rid)
                written = m.block_table(rid)[req.computed // bs:-(-target // bs)]
                assert all(m._ref[b] == 1 for b in written), f"request {rid} would write a shared block"
                req.computed = target
                if rng.random() < 0.8:  # sometimes late: the next call must catch up
                    m.cache_full_blocks(rid, req.toks, req.computed)
                    model.cache(rid, req.toks, req.computed)
                if req.computed == len(req.toks):
                    if req.computed >= req.limit:
                        m.free(rid)
                        model.free(rid)
                        del running[rid]
                        order.remove(rid)
                        freed.append(rid)
                    else:
                        req.toks.append(rng.randrange(3))
            else:  # preempt the most recently admitted: its tokens so far are recomputed on readmission
                model.seen["preemption"] += 1
                victim = order.pop()
                m.free(victim)
                model.free(victim)
                running[victim].computed = 0
                waiting.insert(0, (victim, running.pop(victim)))
        elif op < 0.95 and running:  # abort
            rid = rng.choice(list(running))
            m.free(rid)
            model.free(rid)
            del running[rid]
            order.remove(rid)
            freed.append(rid)
        elif op < 0.97 and freed:  # freeing twice is an error, and changes nothing
            with pytest.raises(UnknownRequestError):
                m.free(rng.choice(freed))
        elif op < 0.975:
            m.reset_prefix_cache()
            model.reset()
        _compare(m, model)
    assert m.stats.hit_tokens == hit_tokens
    assert all(model.seen[k] >= 10 for k in ("hit on an unreferenced block", "hit on a block in use",
                                             "duplicate computed block", "eviction", "preemption")), model.seen
    for rid in list(running):
        m.free(rid)
        model.free(rid)
    _compare(m, model)
    assert m.num_free == nb
