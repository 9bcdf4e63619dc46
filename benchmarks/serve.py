"""`dsv2 serve` under load: MLA vs an MHA baseline of the same dims, same KV budget, one run.

    python benchmarks/serve.py            # concurrency 1, 8, 32, 64; 2 requests per slot (>= 16) per level
    python benchmarks/serve.py --quick    # fewer requests, shorter prompts: a smoke run of a minute or two

For each attention type it writes a random-weight checkpoint (the demo's model dims, `--preset`-sized
overrides below; MHA uses the same heads and head dim), starts `python -m dsv2.serve` on 127.0.0.1 with
`--kv-memory`, and drives it with a bounded async load generator over a realistic mix: token-id prompts
of 32-512 tokens, `max_tokens` 512 (what the engine reserves blocks for), and each output stopped after
16-128 tokens by the client closing the stream (the server aborts the request and frees its blocks, as
a stop string would). Every request asks for `logprobs: 0`, so each SSE event is exactly one token.
Printed per level: requests/s, output tokens/s, time to first token p50/p99, inter-token latency
p50/p99, then MLA/MHA ratios. The mix is drawn from a fixed seed, identical for both models.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64,
             q_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=768,
             moe_intermediate_size=192, vocab_size=2048, max_position_embeddings=2048)


def make_checkpoint(folder: Path, attention: str) -> Path:
    from dsv2 import DeepseekV2, ModelConfig
    from dsv2.train.data import default_corpus, save_tokenizer, train_tokenizer

    cfg = ModelConfig.from_preset("small", **MODEL, attention_type=attention)
    torch.manual_seed(0)
    DeepseekV2(cfg).save_pretrained(folder)
    save_tokenizer(train_tokenizer(default_corpus()[:40], MODEL["vocab_size"]), folder)
    return folder


class ServerProcess:
    def __init__(self, folder: Path, args: list[str], log: Path) -> None:
        self.log_f = open(log, "w")  # noqa: SIM115 (closed in close)
        cmd = [sys.executable, "-m", "dsv2.serve", "--model", str(folder), "--host", "127.0.0.1", "--port", "0",
               "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log_f, text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.close()
            raise RuntimeError(f"server did not start: {line!r}; see {log}")
        self.port = int(m.group(1))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log_f.close()


@dataclass
class Sample:
    ttft: float
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0


async def one_request(port: int, model: str, prompt: list[int], stop_after: int) -> Sample:
    """Stream one completion; hang up after `stop_after` tokens (or at the end)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 512, "temperature": 0.8, "seed": 1,
                       "ignore_eos": True, "stream": True, "logprobs": 0}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    t0 = time.perf_counter()
    last, sample = None, None
    try:
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"HTTP error: {status!r} {await reader.read(500)!r}")
        while await reader.readline() not in (b"\r\n", b""):
            pass  # headers
        while True:  # chunked body: size line, data
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                break
            data = await reader.readexactly(size + 2)
            for ev in data.decode().split("\n\n"):
                if not ev.startswith("data: {"):
                    continue
                now = time.perf_counter()
                if sample is None:
                    sample = Sample(now - t0)
                else:
                    sample.gaps.append(now - last)
                last = now
                sample.tokens += 1
                if sample.tokens >= stop_after:
                    return sample
        return sample or Sample(time.perf_counter() - t0)
    finally:
        writer.close()


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def level(port: int, model: str, mix: list[tuple[list[int], int]], concurrency: int) -> dict[str, float]:
    sem = asyncio.Semaphore(concurrency)

    async def go(p: list[int], k: int) -> Sample:
        async with sem:
            return await asyncio.wait_for(one_request(port, model, p, k), 600)

    t0 = time.perf_counter()
    samples = await asyncio.gather(*[go(p, k) for p, k in mix])
    wall = time.perf_counter() - t0
    gaps = [g for s in samples for g in s.gaps]
    return {"req_s": len(samples) / wall, "tok_s": sum(s.tokens for s in samples) / wall,
            "ttft50": pct([s.ttft for s in samples], 0.5), "ttft99": pct([s.ttft for s in samples], 0.99),
            "itl50": pct(gaps, 0.5), "itl99": pct(gaps, 0.99), "wall": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer and shorter requests")
    ap.add_argument("--kv-memory", default="24MiB", help="KV budget of both servers (default 24MiB)")
    ap.add_argument("--levels", default="1,8,32,64")
    ap.add_argument("--threads", type=int, default=None, help="OMP threads of the servers (default: torch's)")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    rng = random.Random(0)
    lo, hi = (32, 128) if a.quick else (32, 512)
    per_slot = 1 if a.quick else 2

    def mix(c: int) -> list[tuple[list[int], int]]:
        n = max(8 if a.quick else 16, per_slot * c)
        return [([rng.randrange(3, MODEL["vocab_size"]) for _ in range(rng.randint(lo, hi))], rng.randint(16, 128))
                for _ in range(n)]

    mixes = {c: mix(c) for c in levels}
    env_threads = {"OMP_NUM_THREADS": str(a.threads)} if a.threads else {}
    os.environ.update(env_threads)
    print(f"dsv2 serve benchmark: {'quick, ' if a.quick else ''}prompts {lo}-{hi} tokens, max_tokens 512, outputs "
          f"stopped after 16-128 tokens, KV budget {a.kv_memory} per server, cpu_count {os.cpu_count()}; "
          f"the load generator shares the machine with the server")
    results: dict[str, dict[int, dict[str, float]]] = {"mla": {}, "mha": {}}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        try:
            for attn in results:  # both servers up at once (an idle one only waits on its queue) ...
                folder = make_checkpoint(Path(tmp) / attn, attn)
                servers[attn] = ServerProcess(folder, ["--kv-memory", a.kv_memory, "--max-batch", "64",
                                                       "--max-queue", "4096"], Path(tmp) / f"{attn}.log")
                asyncio.run(_wait_ready(servers[attn].port))
            for c in levels:  # ... so that each level runs MLA then MHA back to back, under the same load
                for attn, srv in servers.items():
                    r = results[attn][c] = asyncio.run(level(srv.port, attn, mixes[c], c))
                    print(f"  {attn.upper()} c={c:3d}: {r['req_s']:6.2f} req/s  {r['tok_s']:7.1f} tok/s  "
                          f"TTFT p50 {r['ttft50'] * 1e3:7.0f} ms p99 {r['ttft99'] * 1e3:7.0f} ms  "
                          f"ITL p50 {r['itl50'] * 1e3:6.1f} ms p99 {r['itl99'] * 1e3:7.1f} ms  ({r['wall']:.0f}s)",
                          flush=True)
        finally:
            for srv in servers.values():
                srv.close()
    print("\nMLA / MHA (same dims, same KV budget): throughput ratios > 1 and latency ratios < 1 favour MLA")
    print(f"{'c':>4} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}")
    for c in levels:
        m, h = results["mla"][c], results["mha"][c]
        r = {k: m[k] / h[k] if h[k] else float("nan") for k in m}
        print(f"{c:4d} {r['req_s']:7.2f} {r['tok_s']:7.2f} {r['ttft50']:9.2f} {r['ttft99']:9.2f} {r['itl50']:8.2f} "
              f"{r['itl99']:8.2f}")
    return 0


async def _wait_ready(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            ok = b" 200 " in await reader.readline()
            writer.close()
            if ok:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("server not ready")


if __name__ == "__main__":
    sys.exit(main())
