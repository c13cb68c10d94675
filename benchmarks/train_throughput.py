"""Training throughput: minilab's training step against a transformers LlamaForCausalLM loop.

Both train the same architecture (the `tiny` shape by default: vocab 8192, d_model 256, 6 layers,
4 heads, seq_len 256, batch 8) on the same random tokens with the same AdamW settings, one after
the other, each in a fresh process so peak memory (ru_maxrss) is its own. Prints one JSON line
per precision with tokens/s, MFU against a matmul peak measured in the same run, peak RSS and the
ratio ours / transformers.

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--precision fp32 bf16] [--compile]
    python benchmarks/train_throughput.py --device cuda --precision bf16 --batch 32 --seq-len 512

Targets on a CPU (issue 4): >= 1.5x transformers in bf16, >= 1.0x in fp32. With `--device cuda`
the peak is `torch.cuda.max_memory_allocated` (peak_mem_mib) and timings are synchronised.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SHAPE = dict(vocab_size=8192, d_model=256, n_layer=6, n_head=4, head_dim=64, intermediate_size=768)


def make_batch(seq_len: int, batch: int, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def build(impl: str, precision: str, seq_len: int, compile_model: bool, device_name: str = "cpu"):
    """(callable doing one optimizer step on (x, y) and returning the loss, model)."""
    import torch

    from minilab.model import ModelConfig, build_model
    from minilab.training import OptimConfig, accumulate_gradients, autocast_context, make_optimizer

    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPE, max_seq_len=seq_len, tie_embeddings=True)
    device = torch.device(device_name)
    if impl == "minilab":
        model = build_model(cfg, device=device)
        opt = make_optimizer(model, OptimConfig(lr=1e-3), device)
        fwd = torch.compile(model) if compile_model else model

        def step(x, y):
            loss, _ = accumulate_gradients(fwd, [(x, y)], precision, device)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return step, model

    from transformers import LlamaForCausalLM

    from minilab.hf import to_hf_config

    hf_cfg = to_hf_config(cfg)
    hf_cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    fwd = torch.compile(model) if compile_model else model

    def step(x, y):
        with autocast_context(precision, device):
            out = fwd(input_ids=x, labels=None)
        loss = torch.nn.functional.cross_entropy(out.logits.float().view(-1, cfg.vocab_size), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step, model


def worker(impl: str, precision: str, steps: int, warmup: int, seq_len: int, batch: int, compile_model: bool,
           device_name: str = "cpu"):
    import torch

    from minilab.model import ModelConfig, build_model
    from minilab.training import matmul_peak_flops

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step, _model = build(impl, precision, seq_len, compile_model, device_name)
    x, y = (t.to(device) for t in make_batch(seq_len, batch, SHAPE["vocab_size"]))
    for _ in range(warmup):
        step(x, y)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses = [step(x, y) for _ in range(steps)]
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    flops_tok = build_model(ModelConfig(**SHAPE, max_seq_len=seq_len), "meta").flops_per_token(seq_len)
    peak = matmul_peak_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    tok_s = steps * batch * seq_len / dt
    mem = {"peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20} if cuda else {}
    print(json.dumps({"impl": impl, "precision": precision, "device": device_name, "tokens_per_s": tok_s,
                      "mfu": tok_s * flops_tok / peak, "matmul_peak_gflops": peak / 1e9, **mem,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
                      "last_loss": losses[-1]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "PRECISION"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(*a.worker, a.steps, a.warmup, a.seq_len, a.batch, a.compile, a.device)
        return
    for precision in a.precision:
        results = {}
        for impl in ("minilab", "transformers"):
            cmd = [sys.executable, __file__, "--worker", impl, precision, "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--seq-len", str(a.seq_len), "--batch", str(a.batch),
                   "--device", a.device]
            out = subprocess.run(cmd + (["--compile"] if a.compile else []), check=True, capture_output=True,
                                 text=True).stdout
            results[impl] = json.loads(out.strip().splitlines()[-1])
        ours, theirs = results["minilab"], results["transformers"]
        print(json.dumps({"benchmark": "train_throughput", "device": a.device, "precision": precision, "shape": SHAPE,
                          "seq_len": a.seq_len, "batch": a.batch, "compile": a.compile,
                          "minilab": ours, "transformers": theirs,
                          "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"]}))


if __name__ == "__main__":
    main()
