"""Training throughput: minilab's training step against transformers' and nanoGPT's, interleaved.

Each system trains the same shape (`tiny`: vocab 8192, d_model 256, 6 layers, 4 heads, seq_len 256,
batch 8; `small`: d_model 512, 8 layers, 8 heads) on the same random tokens with the same AdamW
settings (lr 1e-3, betas 0.9/0.95, weight decay 0.1, clip 1.0; each system's own AdamW build:
fused for minilab and for transformers as its Trainer defaults, nanoGPT's `configure_optimizers`,
fused on CUDA only), each in its own long-lived process (its own memory, so peak RSS is its own;
minilab's keeps freed memory for the next step as its training loops do, `minilab.host_memory`;
the peers run on glibc's defaults, as they ship). The processes take turns: round after round, every
system runs a few steps (bounded by steps and by seconds) while the others wait, the order rotating
each round, so a shared machine's slow moments fall on all of them. Medians over the rounds are
reported with their spread, the ratio ours / peer is taken round by round, and MFU is against a
matmul peak measured between the same rounds.

    .venv/bin/python benchmarks/train_throughput.py [--nanogpt-dir ../nanoGPT] [--shape tiny small]
    python benchmarks/train_throughput.py --device cuda --precision bf16 --batch 32 --seq-len 512

nanoGPT (a checkout given with `--nanogpt-dir`, its `model.py` imported as is; skipped with a
message when absent) is GPT-2's architecture at the same width, depth, heads, vocabulary and
sequence length: LayerNorm, GELU MLP of 4 x d_model, learned positions, no biases, no dropout.

bf16 on a CPU: a matmul probe times one bf16 product against fp32 first. Where torch has no native
bf16 GEMM (no AVX512-BF16 / AMX) its reference kernel is many times slower, so the peers' bf16 rows
are not run (they would take an hour) but reported as "no native bf16 (N x slower than fp32)";
minilab's own bf16 row still runs, through its fp32-kernel emulation (`minilab.bf16`), and the
benchmark says which precision a user of this CPU should pick.

Targets (issue 16): fp32 >= 1.1x both peers at `tiny`, >= 1.0x at `small`; bf16 >= 1.5x where the
CPU has a native bf16 GEMM. Prints a table and one JSON line per shape and precision.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "tiny": dict(vocab_size=8192, d_model=256, n_layer=6, n_head=4, head_dim=64, intermediate_size=768),
    "small": dict(vocab_size=8192, d_model=512, n_layer=8, n_head=8, head_dim=64, intermediate_size=1536),
}
SYSTEMS = ("minilab", "transformers", "nanogpt")
LR, BETAS, WEIGHT_DECAY, CLIP = 1e-3, (0.9, 0.95), 0.1, 1.0


def make_batch(seq_len: int, batch: int, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def flops_per_token(impl: str, shape: dict, seq_len: int) -> int:
    """Training matmul FLOPs per token (6 per weight of every matmul, the head included, plus
    attention's 12 * n_layer * T * d); nanoGPT's MLP is 2 matrices of 4 d^2, ours 3 of d * inter."""
    from minilab.model import ModelConfig, build_model

    if impl != "nanogpt":
        return build_model(ModelConfig(**shape, max_seq_len=seq_len), "meta").flops_per_token(seq_len)
    d, layers = shape["d_model"], shape["n_layer"]
    weights = layers * (4 * d * d + 8 * d * d) + shape["vocab_size"] * d
    return 3 * (2 * weights + 4 * layers * seq_len * d)


def build(impl: str, shape: dict, precision: str, seq_len: int, compile_model: bool, device_name: str,
          nanogpt_dir: str | None):
    """(callable doing one optimizer step on (x, y) and returning the loss as a float, n params)."""
    import torch

    from minilab.training import OptimConfig, accumulate_gradients, autocast_context, make_optimizer

    torch.manual_seed(0)
    device = torch.device(device_name)
    if impl == "minilab":
        from minilab.host_memory import keep_freed_memory
        from minilab.model import ModelConfig, build_model

        keep_freed_memory()  # as every minilab training loop (TrainingRun.fit) runs

        model = build_model(ModelConfig(**shape, max_seq_len=seq_len, tie_embeddings=True), device=device)
        opt = make_optimizer(model, OptimConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WEIGHT_DECAY),
                             device)
        fwd = torch.compile(model) if compile_model else model

        def step(x, y):
            loss, _ = accumulate_gradients(fwd, [(x, y)], precision, device)
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return step, model.num_params()

    if impl == "transformers":
        from transformers import LlamaForCausalLM

        from minilab.hf import to_hf_config
        from minilab.model import ModelConfig

        hf_cfg = to_hf_config(ModelConfig(**shape, max_seq_len=seq_len, tie_embeddings=True))
        hf_cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(hf_cfg).to(device)
        # fused, as transformers' Trainer defaults to (adamw_torch_fused) with torch >= 2.8, CPU too
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True)

        def forward(x, y):
            logits = model(input_ids=x).logits
            return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
    else:
        sys.path.insert(0, str(Path(nanogpt_dir).resolve()))
        from model import GPT, GPTConfig  # nanoGPT's model.py

        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # it prints its parameter counts
            model = GPT(GPTConfig(block_size=seq_len, vocab_size=shape["vocab_size"], n_layer=shape["n_layer"],
                                  n_head=shape["n_head"], n_embd=shape["d_model"], dropout=0.0, bias=False)).to(device)
            opt = model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, device.type)

        def forward(x, y):
            return model(x, y)[1]
    fwd = torch.compile(forward) if compile_model else forward

    def step(x, y):  # as nanoGPT's train.py: forward under autocast, backward, clip, step
        with autocast_context(precision, device):
            loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step, sum(p.numel() for p in model.parameters())


def worker(a: argparse.Namespace) -> None:
    """Build, warm up, say `ready`; then per line on stdin `run STEPS SECONDS` time up to STEPS
    steps (stopping after the step that passes SECONDS) and answer one JSON line; EOF ends it."""
    import torch

    impl, precision = a.worker
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    shape = SHAPES[a.shape[0]]
    step, params = build(impl, shape, precision, a.seq_len, a.compile, a.device, a.nanogpt_dir)
    x, y = (t.to(device) for t in make_batch(a.seq_len, a.batch, shape["vocab_size"]))
    t0 = time.perf_counter()
    for _ in range(a.warmup):
        loss = step(x, y)
    print(json.dumps({"ready": True, "params": params, "warmup_s": time.perf_counter() - t0, "loss": loss}),
          flush=True)
    for line in sys.stdin:
        _, steps, seconds = line.split()
        done, t0 = 0, time.perf_counter()
        while done < int(steps) and (done == 0 or time.perf_counter() - t0 < float(seconds)):
            loss = step(x, y)
            done += 1
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        mem = {"peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20} if cuda else {}
        print(json.dumps({"steps": done, "seconds": dt, "loss": loss, **mem,
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def bf16_probe(threads: int) -> dict:
    """One (2048 x d) @ (d x 3d)-like product in torch's native bf16 against fp32, best of 2 each."""
    import torch

    from minilab.bf16 import cpu_has_bf16_gemm

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 256), torch.randn(256, 768)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = a.to(dtype), b.to(dtype)
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            x @ w
            best = min(best, time.perf_counter() - t0)
        times[dtype] = best
    slower = times[torch.bfloat16] / times[torch.float32]
    return {"native_bf16_gemm": cpu_has_bf16_gemm(), "bf16_vs_fp32_time": slower}


class Worker:
    def __init__(self, impl: str, precision: str, a: argparse.Namespace, shape: str):
        cmd = [sys.executable, __file__, "--worker", impl, precision, "--shape", shape, "--warmup", str(a.warmup),
               "--seq-len", str(a.seq_len), "--batch", str(a.batch), "--device", a.device, "--threads", str(a.threads)]
        cmd += (["--compile"] if a.compile else []) + (["--nanogpt-dir", a.nanogpt_dir] if a.nanogpt_dir else [])
        self.impl = impl
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()
        self.rounds: list[dict] = []

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.impl} worker died (exit {self.proc.wait()}); its error is above")
        return json.loads(line)

    def run(self, steps: int, seconds: float) -> dict:
        self.proc.stdin.write(f"run {steps} {seconds}\n")
        self.proc.stdin.flush()
        r = self._reply()
        self.rounds.append(r)
        return r

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def measure(a: argparse.Namespace, shape_name: str, precision: str, systems: list[str]) -> dict:
    """Rounds of interleaved timed steps; per system the median tokens/s and its spread."""
    import torch

    from minilab.training import matmul_peak_flops

    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    tokens = a.batch * a.seq_len
    workers = []
    for impl in systems:  # one at a time: a building worker would slow a timed one
        workers.append(Worker(impl, precision, a, shape_name))
    peaks, ratios = [], {w.impl: [] for w in workers[1:]}
    for r in range(a.rounds):
        order = workers[r % len(workers):] + workers[:r % len(workers)]
        rates = {}
        for w in order:
            time.sleep(0.3)  # let the previous worker's threads stop spinning
            out = w.run(a.round_steps, a.round_seconds)
            rates[w.impl] = out["steps"] * tokens / out["seconds"]
        peaks.append(matmul_peak_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32))
        for impl in ratios:
            ratios[impl].append(rates["minilab"] / rates[impl])
        print(f"  round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in rates.items())
              + f"; matmul peak {peaks[-1] / 1e9:.0f} GFLOP/s", file=sys.stderr, flush=True)
    for w in workers:
        w.close()
    peak = statistics.median(peaks)
    rows = {}
    for w in workers:
        rates = [o["steps"] * tokens / o["seconds"] for o in w.rounds]
        med = statistics.median(rates)
        rows[w.impl] = {"tokens_per_s": med, "tokens_per_s_range": [min(rates), max(rates)],
                        "steps": sum(o["steps"] for o in w.rounds), "params": w.info["params"],
                        "mfu": med * flops_per_token(w.impl, SHAPES[shape_name], a.seq_len) / peak,
                        "peak_rss_mib": w.rounds[-1]["peak_rss_mib"], "last_loss": w.rounds[-1]["loss"],
                        **({"peak_mem_mib": w.rounds[-1]["peak_mem_mib"]} if "peak_mem_mib" in w.rounds[-1] else {})}
    return {"rows": rows, "matmul_peak_gflops": peak / 1e9,
            "matmul_peak_gflops_range": [min(peaks) / 1e9, max(peaks) / 1e9],
            "ratio": {impl: {"median": statistics.median(v), "range": [min(v), max(v)]} for impl, v in ratios.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["tiny"])
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians over them)")
    p.add_argument("--round-steps", type=int, default=4, help="at most this many timed steps per system and round")
    p.add_argument("--round-seconds", type=float, default=6.0,
                   help="a system's round ends after the step that passes this many seconds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    p.add_argument("--nanogpt-dir", help="a nanoGPT checkout (its model.py is imported); without it, no nanoGPT row")
    p.add_argument("--compile", action="store_true", help="torch.compile every system's step")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "PRECISION"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    systems = ["minilab", "transformers"]
    if a.nanogpt_dir and (Path(a.nanogpt_dir) / "model.py").is_file():
        systems.append("nanogpt")
    else:
        print("nanoGPT skipped: " + (f"no model.py in {a.nanogpt_dir}" if a.nanogpt_dir else "no --nanogpt-dir given"),
              file=sys.stderr)
    probe = bf16_probe(a.threads) if a.device == "cpu" and "bf16" in a.precision else None
    native = a.device != "cpu" or probe is None or probe["native_bf16_gemm"]
    if probe is not None:
        advice = ("bf16" if native and probe["bf16_vs_fp32_time"] < 1 else "fp32")
        print(f"bf16 probe: native bf16 GEMM {'yes' if probe['native_bf16_gemm'] else 'no'}, a bf16 product takes "
              f"{probe['bf16_vs_fp32_time']:.1f}x the fp32 time; on this CPU train in {advice}"
              + ("" if native else " (minilab's bf16 runs on fp32 kernels: bf16 numerics, fp32 speed, no gain)"),
              file=sys.stderr)
    for shape_name in a.shape:
        for precision in a.precision:
            run = systems if precision == "fp32" or native else ["minilab"]
            print(f"{shape_name} {precision}: {', '.join(run)}, {a.rounds} rounds of <= {a.round_steps} steps / "
                  f"{a.round_seconds:g} s, batch {a.batch} x {a.seq_len}, {a.threads} threads", file=sys.stderr)
            result = measure(a, shape_name, precision, run)
            skipped = {s: f"no native bf16 ({probe['bf16_vs_fp32_time']:.0f}x slower than fp32)"
                       for s in systems if s not in run}
            for impl, row in result["rows"].items():
                lo, hi = row["tokens_per_s_range"]
                ratio = result["ratio"].get(impl)
                vs = "" if ratio is None else f"   ours/{impl} {ratio['median']:.2f} ({ratio['range'][0]:.2f}-" \
                                              f"{ratio['range'][1]:.2f})"
                print(f"  {impl:<13} {row['tokens_per_s']:>8,.0f} tok/s ({lo:,.0f}-{hi:,.0f})  MFU "
                      f"{row['mfu']:.2f}  {row['params'] / 1e6:.1f}M params  RSS {row['peak_rss_mib']:,.0f} MiB{vs}",
                      file=sys.stderr)
            for impl, why in skipped.items():
                print(f"  {impl:<13} {why}", file=sys.stderr)
            print(json.dumps({"benchmark": "train_throughput", "device": a.device, "shape": shape_name,
                              "dims": SHAPES[shape_name], "precision": precision, "seq_len": a.seq_len,
                              "batch": a.batch, "threads": a.threads, "compile": a.compile, "rounds": a.rounds,
                              "bf16_probe": probe, "skipped": skipped, **result}), flush=True)


if __name__ == "__main__":
    main()
