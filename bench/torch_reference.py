#!/usr/bin/env python3
"""The PyTorch reference for `tandem bench engine --device cuda`.

Runs Hugging Face transformers on the same weights Tandem's GPU path
computes with (`tandem export-hf` writes them as bf16 safetensors) on the
same GPU: prefill tokens/s for the given prompt lengths, decode tokens/s
at each batch size (greedy `generate`, its prefill time subtracted), the
inter-token latency at batch 1, and, with --static, batch-1 decode with a
static KV cache compiled by torch.compile (CUDA graphs), when that works
in the installed versions. Prints one line per figure and writes JSON.
"""

import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

TEXT = (
    "The history of computing is a story of people who wanted to calculate faster than "
    "they could by hand. Early machines used gears and levers; later ones used relays, vacuum tubes, "
    "transistors and finally integrated circuits holding billions of switches. Each step made machines "
    "smaller, cheaper and more reliable, and each opened new uses that their inventors never imagined. "
)


def tokens(tok_ids, n):
    out = []
    while len(out) < n:
        out.extend(tok_ids)
    return out[:n]


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", default="512,2048")
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--static", action="store_true", help="also batch 1 with a static cache and torch.compile")
    ap.add_argument("--json")
    a = ap.parse_args()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    base = tok(TEXT, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).cuda().eval()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    report = {"prefill": [], "decode": []}
    with torch.inference_mode():
        for n in [int(x) for x in a.prompt_tokens.split(",")]:
            ids = torch.tensor([tokens(base, n)], device="cuda")
            secs = timed(lambda: model(ids, use_cache=False), a.repeats)
            report["prefill"].append([n, secs, n / secs])
            print(f"torch prefill {n:<5} {n / secs:10.1f} tok/s  ({secs * 1e3:.2f} ms)", flush=True)
        steps = a.decode_steps
        for b in [int(x) for x in a.batches.split(",")]:
            ids = torch.tensor([tokens(base, 128 + i)[i:] for i in range(b)], device="cuda")
            kw = dict(do_sample=False, pad_token_id=tok.eos_token_id or 0)

            def gen(k):
                return lambda: model.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)

            full = timed(gen(steps + 1), 1)
            first = timed(gen(1), 1)
            dec = max(full - first, 1e-9)
            report["decode"].append([b, b * steps / dec])
            extra = f"; ITL {dec / steps * 1e3:.3f} ms" if b == 1 else ""
            print(f"torch decode batch {b:<3} {b * steps / dec:10.1f} tok/s  (generate, dynamic cache{extra})", flush=True)
        if a.static:
            ids = torch.tensor([tokens(base, 128)], device="cuda")
            try:
                kw = dict(do_sample=False, cache_implementation="static", pad_token_id=tok.eos_token_id or 0)
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kw)
                torch.cuda.synchronize()
                warm = time.perf_counter() - t0
                full = timed(lambda: model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kw), 1)
                first = timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw), 1)
                dec = max(full - first, 1e-9)
                report["static_batch1"] = steps / dec
                print(f"torch decode batch 1   {steps / dec:10.1f} tok/s  (static cache, compiled; first run {warm:.0f} s; ITL {dec / steps * 1e3:.3f} ms)", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"torch static-cache decode did not run: {type(e).__name__}: {e}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
