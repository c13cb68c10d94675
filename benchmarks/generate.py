"""Benchmark generation: our KV-cache decoding vs transformers' `generate`, and the server under load.

    python benchmarks/generate.py [--shapes micro tiny small] [--new-tokens 128] [--threads N] [--clients 1 8 32]

For each architecture preset: build it with random weights, export it with `save_hf_dir`, load the
export both with minilab and with `transformers.AutoModelForCausalLM`, then, in `--repeats` rounds
of one run each, alternating in this process, time batch-1 greedy decoding of a 16-token prompt for
`--new-tokens` tokens (min and max new tokens forced equal, so both produce exactly the same number;
the token ids are compared too). Then `--batch` prompts of different lengths (4 to 46 tokens)
decoded together (left padding) against the same prompts one by one and against transformers'
batched `generate` (left padding, attention mask). Threads: the process's torch threads (the cores,
or `--threads`) are the most either side may use; ours takes as many as each step's work calls for
(`minilab.decode_threads.StepThreads`: one for a one-row step of micro), transformers runs once on all of
them and once on one in every round, and each round's ratio is taken against its faster run (its
8-row steps gain from a second core, its one-row steps lose). Then `minilab serve`'s app runs on
loopback and 1, 8 and 32 concurrent streaming clients each send `--requests-per-client` chat
requests: throughput in tokens/s and requests/s, and p50/p99 of request latency and of time to
first token. One JSON line
per measurement on stdout, a summary with the ratios at the end: each ratio taken round by round
(the two sides ran back to back), its median and range, so a shared machine's slow moment shows as
spread, not as a ratio. Our model is loaded as `Engine.load` prepares it (`use_decode_layout`): a
large head is then also held as an int8 screen that greedy steps read (`ScreenedHead`); the same
model with the fp32 head, as every sampled step reads it, runs in the same rounds ("full head").
Random weights: decoding speed does not depend on what was learned, save the screen's work: on
random weights nearly every row leaves it one candidate, on trained ones a third of the rows several
(1.4-1.6 a row on the demo's models), so the first steps of each row count time the screen against
the fp32 head and keep the faster (`ScreenedHead.tokens`; on these weights the screen wins wherever
it is tried).

A roofline line per shape: the bytes of weights one batch-1 step reads, times tokens/s, against the
read bandwidth this process measures itself in every round (sums over a 512 MiB tensor, same
threads; the memory a VM gets drifts with its neighbours): the distance to the physical limit of
decoding from memory (above 1: the weights fit in cache).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _rounds(fns: dict, repeats: int, probe=None) -> dict:
    """Seconds of each function per round, the runs interleaved so that a load change on a shared
    machine falls on both sides of a ratio rather than on one, and their order rotated each round (a,
    b, c, then b, c, a, ...): whatever runs first in a round (after the probe, or after the previous
    round's last run) is not always the same side; `probe()` (the memory bandwidth) is measured in
    every round too, under "probe"."""
    times: dict = {name: [] for name in fns}
    if probe is not None:
        times["probe"] = []
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        if probe is not None:
            times["probe"].append(probe())
    return times


def peer_runs(fn) -> dict:
    """The peer's run on all of the process's torch threads and, where that is more than one, on one
    (the number the peer is fastest with depends on the shape and the rows): `_rounds` entries."""
    n = torch.get_num_threads()
    if n == 1:
        return {"peer": fn}

    def on_one():
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(n)

    return {"peer": fn, "peer_1_thread": on_one}


def peer_best(t: dict) -> list[float]:
    """Each round's faster peer run (see `peer_runs`)."""
    return [min(times) for times in zip(t["peer"], t.get("peer_1_thread", t["peer"]), strict=True)]


def peer_threads(t: dict, tokens: int) -> dict:
    """The peer's tokens/s on all threads and on one (median over the rounds), for the JSON line."""
    return {f"transformers_{k}_tok_s": round(tokens / statistics.median(t[name]), 1)
            for k, name in (("all_threads", "peer"), ("one_thread", "peer_1_thread")) if name in t}


def paired_ratio(slow: list[float], fast: list[float]) -> tuple[float, list[float]]:
    """slow / fast taken round by round (the two ran back to back): median and [min, max]."""
    r = [a / b for a, b in zip(slow, fast, strict=True)]
    return round(statistics.median(r), 2), [round(min(r), 2), round(max(r), 2)]


_PROBE: list[torch.Tensor] = []


def memory_bandwidth(mib: int = 512, tries: int = 5) -> float:
    """Bytes/s this process reads from memory: the best of `tries` sums over a `mib` MiB fp32 tensor
    (far larger than any cache), with the torch threads the decoding runs with. The tensor is made
    once and kept: allocating and freeing 512 MiB every round slowed the run that followed it
    (measured: micro decoding 125 ms after it, 98 after a sum over a kept tensor)."""
    if not _PROBE or _PROBE[0].numel() != mib * 2**20 // 4:
        _PROBE[:] = [torch.ones(mib * 2**20 // 4)]
    x = _PROBE[0]
    x.sum()
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one greedy decoding step reads at batch 1: every matrix of the blocks, the
    norms and the head (vocab x d: the embedding table itself when tied), or in its place the int8
    screen where the model has one (`ScreenedHead`; its few fp32 columns left out); one embedding
    row, not the table."""
    from minilab.screened_head import screened_head_bytes

    g, cfg = model.param_groups(), model.config
    itemsize = next(model.parameters()).element_size()
    head = itemsize * cfg.vocab_size * cfg.d_model
    if reads_screen_at_one_row(model):
        head = screened_head_bytes(cfg.vocab_size, cfg.d_model)
    return itemsize * (g["attention"] + g["mlp"] + g["norms"]) + head


def reads_screen_at_one_row(model) -> bool:
    """Whether a one-row greedy step reads the model's int8 screen: it has one, taken from one row on
    (`min_rows`; micro's from 4), and it ran faster than the fp32 head there (`pays`, timed in the
    first steps; assumed until they ran)."""
    screen = getattr(model, "decode_screen", None)
    return screen is not None and screen.min_rows == 1 and screen.pays.get(1, True)


def roofline(per_token: int, tok_s: list[float], bandwidth: list[float]) -> dict:
    """Weight bytes streamed per second against the read bandwidth measured in the same rounds (the
    fraction taken round by round): how far batch-1 decoding is from the physical limit (above 1:
    the weights fit in cache)."""
    bw = statistics.median(bandwidth)
    fraction = statistics.median(per_token * t / b for t, b in zip(tok_s, bandwidth, strict=True))
    return {"memory_read_gb_s": round(bw / 1e9, 2), "roofline_tok_s": round(bw / per_token, 1),
            "fraction_of_roofline": round(fraction, 2)}


def bench_decode(shape: str, new_tokens: int, repeats: int, root: Path, threads: int | None) -> dict:
    from transformers import AutoModelForCausalLM

    from minilab.arch import load_architecture
    from minilab.decode_layout import use_decode_layout
    from minilab.decode_threads import set_threads
    from minilab.generate import generate
    from minilab.hf import save_hf_dir
    from minilab.loading import load_model_for_inference
    from minilab.model import build_model

    cfg = load_architecture(shape)
    torch.manual_seed(0)
    save_hf_dir(build_model(cfg), root / shape)
    # as `Engine.load` (minilab generate / chat / serve) prepares it: weights stored (in, out), and
    # the int8 screen of a large head, which greedy steps read; `full` reads the fp32 head, as every
    # sampled step does
    ours = use_decode_layout(load_model_for_inference(str(root / shape), dtype="float32"))
    full = use_decode_layout(load_model_for_inference(str(root / shape), dtype="float32"), screen=False)
    hf = AutoModelForCausalLM.from_pretrained(root / shape, dtype=torch.float32).eval()
    set_threads(threads)  # the most threads a step may use, as in minilab generate / chat / serve
    prompt = torch.randint(10, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))

    def run_ours():
        return generate(ours, prompt, max_new_tokens=new_tokens)[0]

    def run_full():
        return generate(full, prompt, max_new_tokens=new_tokens)[0]

    def run_hf():
        with torch.no_grad():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        return out[0, 16:].tolist()

    peer = peer_runs(run_hf)
    same = run_ours() == run_hf() == run_full()  # also a warm-up of each
    t = _rounds({"ours": run_ours, **peer, "full": run_full}, repeats, probe=lambda: memory_bandwidth(tries=2))
    t["hf"] = peer_best(t)
    ratio, spread = paired_ratio(t["hf"], t["ours"])
    ratio_full, spread_full = paired_ratio(t["hf"], t["full"])
    per_token, full_per_token = weight_bytes_per_token(ours), weight_bytes_per_token(full)
    ours_tok_s, hf_tok_s, full_tok_s = (new_tokens / statistics.median(t[k]) for k in ("ours", "hf", "full"))
    return {"bench": "decode_batch1", "shape": shape, "params": ours.num_params(), "prompt": 16,
            "new_tokens": new_tokens, "threads": torch.get_num_threads(), **peer_threads(t, new_tokens),
            "rounds": repeats, "same_tokens": same,
            "screened_head": reads_screen_at_one_row(ours),
            "minilab_tok_s": round(ours_tok_s, 1), "transformers_tok_s": round(hf_tok_s, 1),
            "ratio": ratio, "ratio_range": spread, "weight_bytes_per_token": per_token,
            "minilab_weight_gb_s": round(per_token * ours_tok_s / 1e9, 2),
            "transformers_weight_gb_s": round(full_per_token * hf_tok_s / 1e9, 2),
            "minilab_full_head_tok_s": round(full_tok_s, 1), "ratio_full_head": ratio_full,
            "ratio_full_head_range": spread_full, "full_head_weight_bytes_per_token": full_per_token,
            **roofline(per_token, [new_tokens / x for x in t["ours"]], t["probe"]),
            "full_head_fraction_of_roofline": roofline(full_per_token, [new_tokens / x for x in t["full"]],
                                                        t["probe"])["fraction_of_roofline"]}


def bench_batched(shape: str, new_tokens: int, batch: int, repeats: int, root: Path, threads: int | None) -> dict:
    """Several prompts of different lengths at once (the export of `bench_decode` is reused)."""
    from transformers import AutoModelForCausalLM

    from minilab.arch import load_architecture
    from minilab.decode_layout import use_decode_layout
    from minilab.decode_threads import set_threads
    from minilab.generate import generate
    from minilab.loading import load_model_for_inference

    cfg = load_architecture(shape)
    ours = use_decode_layout(load_model_for_inference(str(root / shape), dtype="float32"))
    full = use_decode_layout(load_model_for_inference(str(root / shape), dtype="float32"), screen=False)
    hf = AutoModelForCausalLM.from_pretrained(root / shape, dtype=torch.float32).eval()
    set_threads(threads)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(10, cfg.vocab_size, (4 + 6 * (i % 8),), generator=g).tolist() for i in range(batch)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run_hf():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=0)
        return out[:, width:].tolist()

    together = generate(ours, prompts, max_new_tokens=new_tokens, batch_size=batch)
    same = together == generate(ours, prompts, max_new_tokens=new_tokens, batch_size=1)
    same_hf = together == run_hf() == generate(full, prompts, max_new_tokens=new_tokens, batch_size=batch)
    t = _rounds({"batched": lambda: generate(ours, prompts, max_new_tokens=new_tokens, batch_size=batch),
                 "one_by_one": lambda: generate(ours, prompts, max_new_tokens=new_tokens, batch_size=1),
                 **peer_runs(run_hf),
                 "full_head": lambda: generate(full, prompts, max_new_tokens=new_tokens, batch_size=batch)}, repeats)
    t["transformers"] = peer_best(t)
    times = {name: statistics.median(ts) for name, ts in t.items()}
    ratio, spread = paired_ratio(t["transformers"], t["batched"])
    n = batch * new_tokens
    return {"bench": "decode_batched", "shape": shape, "batch": batch, "prompt_lengths": [len(p) for p in prompts],
            "new_tokens": new_tokens, "threads": torch.get_num_threads(), **peer_threads(t, n),
            "batched_equals_one_by_one": same,
            "same_tokens_as_transformers": same_hf, "minilab_batched_tok_s": round(n / times["batched"], 1),
            "minilab_one_by_one_tok_s": round(n / times["one_by_one"], 1),
            "transformers_batched_tok_s": round(n / times["transformers"], 1),
            "ratio_vs_transformers": ratio, "ratio_range": spread,
            "minilab_batched_full_head_tok_s": round(n / times["full_head"], 1),
            "ratio_full_head": paired_ratio(t["transformers"], t["full_head"])[0]}


async def _client_load(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    import httpx

    latencies, ttft, tokens = [], [], 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        async def one_client(c: int) -> None:
            nonlocal tokens
            for i in range(per_client):
                body = {"model": model, "messages": [{"role": "user", "content": f"story {c} {i}"}],
                        "max_tokens": max_tokens, "temperature": 0.8, "seed": c * 1000 + i, "stream": True,
                        "stream_options": {"include_usage": True}}
                t0 = time.perf_counter()
                first = None
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - t0
                        if chunk.get("usage"):
                            tokens += chunk["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - t0)
                ttft.append(first if first is not None else latencies[-1])

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - t0

    def pct(xs: list[float], q: int) -> float:
        return round(statistics.quantiles(xs, n=100)[q - 1] * 1000, 1) if len(xs) > 1 else round(xs[0] * 1000, 1)

    return {"requests": len(latencies), "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 1),
            "req_s": round(len(latencies) / wall, 2), "latency_p50_ms": pct(latencies, 50),
            "latency_p99_ms": pct(latencies, 99), "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99)}


def bench_server(root: Path, clients_list: list[int], per_client: int, max_tokens: int, concurrency: int) -> list:
    from inference_fixtures import make_model_dir

    from minilab.inference import Engine
    from minilab.serve.app import create_app, running_server

    engine = Engine.load(str(make_model_dir(root / "served", max_seq_len=256)))
    rows = []
    for clients in clients_list:
        app = create_app(engine, max_concurrency=concurrency, max_queue=max(64, clients))
        with running_server(app) as url:
            res = asyncio.run(_client_load(url, engine.name, clients, per_client, max_tokens))
        rows.append({"bench": "server_stream", "clients": clients, "max_concurrency": concurrency,
                     "max_tokens": max_tokens, **res})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["micro", "tiny", "small"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5,
                    help="rounds: each side timed once a round, interleaved; medians, ratios per round")
    ap.add_argument("--threads", type=int, default=None,
                    help="the most torch threads either side uses (default: torch's, the cores)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--server-max-tokens", type=int, default=32)
    ap.add_argument("--max-concurrency", type=int, default=8, help="as minilab serve's (its default)")
    ap.add_argument("--batch", type=int, default=8, help="prompts decoded together in the batched row (0 skips it)")
    ap.add_argument("--skip-server", action="store_true")
    args = ap.parse_args()
    all_threads = torch.get_num_threads()
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            torch.set_num_threads(all_threads)
            row = bench_decode(shape, args.new_tokens, args.repeats, Path(tmp), args.threads)
            print(json.dumps(row), flush=True)
            print(f"roofline {shape}: {row['weight_bytes_per_token'] / 2**20:.1f} MiB of weights per greedy token"
                  f"{' (the head as its int8 screen)' if row['screened_head'] else ''}; this process reads memory "
                  f"at {row['memory_read_gb_s']} GB/s, so at most {row['roofline_tok_s']:,.0f} tok/s from memory; "
                  f"minilab streams {row['minilab_weight_gb_s']} GB/s ({row['fraction_of_roofline']:.2f} of it), "
                  f"{row['full_head_fraction_of_roofline']:.2f} with the fp32 head (as sampling reads it); "
                  f"transformers {row['transformers_weight_gb_s']} GB/s", file=sys.stderr, flush=True)
            summary[f"{shape}_ratio_vs_transformers"] = row["ratio"]
            summary[f"{shape}_ratio_range"] = row["ratio_range"]
            summary[f"{shape}_full_head_ratio"] = row["ratio_full_head"]
            summary[f"{shape}_full_head_ratio_range"] = row["ratio_full_head_range"]
            summary[f"{shape}_fraction_of_roofline"] = row["fraction_of_roofline"]
            if args.batch > 0:
                torch.set_num_threads(all_threads)
                row = bench_batched(shape, args.new_tokens, args.batch, args.repeats, Path(tmp), args.threads)
                print(json.dumps(row), flush=True)
                summary[f"{shape}_batched_ratio_vs_transformers"] = row["ratio_vs_transformers"]
                summary[f"{shape}_batched_ratio_range"] = row["ratio_range"]
                summary[f"{shape}_batched_full_head_ratio"] = row["ratio_full_head"]
        if not args.skip_server:
            for row in bench_server(Path(tmp), args.clients, args.requests_per_client, args.server_max_tokens,
                                    args.max_concurrency):
                print(json.dumps(row), flush=True)
    print(json.dumps({"bench": "summary", **summary}))
    for shape in args.shapes:
        lo, hi = summary[f"{shape}_ratio_range"]
        flo, fhi = summary[f"{shape}_full_head_ratio_range"]
        line = (f"{shape}: minilab is {summary[f'{shape}_ratio_vs_transformers']}x ({lo}-{hi}) transformers' "
                f"batch-1 tokens/s ({summary[f'{shape}_full_head_ratio']}x ({flo}-{fhi}) with the fp32 head)")
        if f"{shape}_batched_ratio_range" in summary:
            lo, hi = summary[f"{shape}_batched_ratio_range"]
            line += (f", {summary[f'{shape}_batched_ratio_vs_transformers']}x ({lo}-{hi}) its batched generate "
                     f"({summary[f'{shape}_batched_full_head_ratio']}x with the fp32 head)")
        print(line, file=sys.stderr)


if __name__ == "__main__":
    main()
