#!/usr/bin/env python3
"""Tiny random-weight mixture-of-experts models, and llama.cpp's answers on them.

    bench/tiny_moe.py files     make the files
    bench/tiny_moe.py record    make them, then record llama.cpp's greedy
                                continuations on each into
                                model/tests/data/moe-llamacpp.json

Two architectures for testing mixture-of-experts support without a real MoE
checkpoint, about 26 MB each (13 MB as Q8_0), most of it the
49152-token embedding and lm head:

    tiny-qwen3moe.gguf   architecture `qwen3moe`, as Qwen3-30B-A3B
    tiny-mixtral.gguf    Mixtral as GGUF has it: architecture `llama` with
                         `llama.expert_count` / `llama.expert_used_count` and
                         3-D expert tensors

plus `*-Q8_0.gguf` variants of both made by llama.cpp's portable
llama-quantize (`bench/llamacpp.sh quantize`, as bench/quants.py does).

Both have 4 layers (pipeline parallel 2 splits them 2+2), 6 query heads over 3
KV heads of 16 (tensor parallel 3 divides the KV heads), n_embd 96, 6 experts
of which 2 are used per token (expert parallel 3 gives 2 experts per rank),
expert FFN width 192 (tensor parallel 3 without expert parallelism cuts
each expert in three, 64 columns, whole Q8_0 blocks; unlike n_embd, so a
swapped hidden size and expert width cannot pass), context 4096, and the tokenizer of the default model
(SmolLM2-135M-Instruct, 49152 tokens): every `tokenizer.*` key, chat template
included, copied byte for byte. token_embd and output (both files have
their own lm head) are F16, the other matrices and the norms F32. In the
Q8_0 files every matrix is Q8_0 (token_embd and output too) except
ffn_gate_inp, which llama-quantize never quantizes (src/llama-quant.cpp),
and the norms.

What llama.cpp computes (the llama.cpp vendored in llama-cpp-python 0.3.36):

  Hyperparameters: src/llama-model.cpp llama_model_base::load_hparams reads
  `{arch}.expert_count` and `{arch}.expert_used_count` for every
  architecture; qwen3moe reads `qwen3moe.expert_feed_forward_length` for the
  expert width (src/models/qwen3moe.cpp load_arch_hparams;
  `feed_forward_length` is not used by its graph), llama uses
  `llama.feed_forward_length` as the expert width. Neither architecture reads
  `expert_weights_scale`, `expert_weights_norm` or `expert_gating_func`
  (those keys exist in src/llama-arch.cpp but only other architectures load
  them), so the scale stays 0 (= none) and gating and normalisation are fixed
  in the graph code.

  Tensors (GGUF dimension order, ne0 first = the contiguous one), from
  load_arch_tensors in src/models/qwen3moe.cpp and src/models/llama.cpp:
    token_embd.weight          [n_embd, n_vocab]
    output_norm.weight         [n_embd]
    output.weight              [n_embd, n_vocab]   optional: tied if absent
    blk.N.attn_norm.weight     [n_embd]
    blk.N.attn_q.weight        [n_embd, n_head*head_dim]
    blk.N.attn_k.weight        [n_embd, n_head_kv*head_dim]
    blk.N.attn_v.weight        [n_embd, n_head_kv*head_dim]
    blk.N.attn_output.weight   [n_head*head_dim, n_embd]
    blk.N.attn_q_norm.weight   [head_dim]           qwen3moe only
    blk.N.attn_k_norm.weight   [head_dim]           qwen3moe only
    blk.N.ffn_norm.weight      [n_embd]
    blk.N.ffn_gate_inp.weight  [n_embd, n_expert]   the router
    blk.N.ffn_gate_exps.weight [n_embd, n_ff_exp, n_expert]
    blk.N.ffn_up_exps.weight   [n_embd, n_ff_exp, n_expert]
    blk.N.ffn_down_exps.weight [n_ff_exp, n_embd, n_expert]
  (numpy shapes are the reverse: ffn_gate_exps is [n_expert][n_ff_exp][n_embd],
  expert e's gate matrix the row-major [n_ff_exp, n_embd] block e.)

  Attention: qwen3moe RMS-normalises each head of Q and K with attn_q_norm /
  attn_k_norm (eps = layer_norm_rms_epsilon) before NEOX-style RoPE (rotating
  dims i and i + head_dim/2); llama uses normal RoPE (adjacent pairs) and no
  Q/K norm (src/llama-model.cpp llama_model_rope_type). Scale 1/sqrt(head_dim);
  query head h reads KV head h / (n_head / n_head_kv).

  MoE layer, both architectures: src/llama-graph.cpp
  llm_graph_context::build_moe_ffn, called from src/models/qwen3moe.cpp and
  src/models/llama.cpp with type_op LLM_FFN_SILU, norm_w = true,
  w_scale = hparams.expert_weights_scale (0: not applied) and
  LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX, no selection bias, no shared expert.
  For x = rms_norm(h) * ffn_norm:
    logits = ffn_gate_inp . x                      (n_expert values)
    p      = softmax(logits)                       over all experts
    S      = the n_expert_used largest p           (ggml_argsort_top_k)
    w_e    = p_e / sum_{j in S} p_j                (renormalised, norm_w;
                                                    the sum clamped >= 6.1e-5)
    out    = sum_{e in S} w_e * down_e(silu(gate_e . x) * (up_e . x))
  then h += out. So qwen3moe is always softmax, then top-k, then
  renormalise: llama.cpp hard-codes norm_w = true, as the released Qwen3-MoE
  checkpoints set norm_topk_prob (there is no GGUF key for it). For Mixtral
  this equals a softmax over the top-k logits (its Hugging Face definition).

  An f64 numpy evaluation of exactly the above reproduces llama.cpp's answers
  on the F32/F16 files: the same greedy token at all 160 recorded positions
  of each file, log-probabilities within 0.12 (llama.cpp keeps the KV cache
  in F16 and rounds activations to F16 for the F16 lm head). On the Q8_0
  files llama.cpp also quantizes activations to Q8_0: against exact
  arithmetic on the dequantized weights, 0 to 3 of the 32 teacher-forced
  positions of a prompt change their top token, nearly all of them where
  the top two logits are within 1.5, so compare Q8_0 answers with a
  tolerance (teacher-forced, skipping close calls).

The weights are uniform random (numpy's default_rng, seeded per tensor from
its name; uniform rather than normal so that no libm call is involved), with
scales chosen (ARCHS below) so llama.cpp's next-token distribution is
peaked: the top two logits are well apart along the greedy continuations
(`record` prints the gaps and keeps them in the JSON), and the router logits
vary enough that every expert of every layer is picked, and all 15 pairs.
The lm-head rows of the control tokens and of the tokens that are not whole
UTF-8 on their own are zero (see never_emitted). gguf and numpy are pinned and run in a venv of their own
(${TANDEM_HOME:-~/.cache/tandem}/gguf-venv, made on first use), so the files
come out byte-identical on any machine; the recorded JSON keeps each file's
SHA-256.

`record` needs llama-server (`bench/llamacpp.sh build`): for the prompts of
shared/reference/smollm2-llamacpp.json, /completion with temperature 0,
n_predict 32 and n_probs 5, it stores the greedy ids and, at each position,
the top 5 tokens with their log-probabilities (pre-sampling: a softmax over
all logits, so differences of logprobs are differences of logits), and
checks that every answer runs the full 32 tokens and is not one token over
and over; llama-server's log goes to FILE.server.log beside each file.

Environment: TANDEM_MOE_DIR (default ${TANDEM_HOME:-~/.cache/tandem}/moe),
TANDEM_TEST_MODEL (the default model's path, if not in the cache).
"""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

# Paths, digests and llama-server's greedy answers, shared with the dense
# quantization files.
from quants import LLAMACPP, ROOT, base_model, greedy_on, home, server_and_prompts, sha256

RECORD = ROOT / "model" / "tests" / "data" / "moe-llamacpp.json"

# The writer and the random numbers: pinned, so the bytes never change.
GGUF_VERSION = "0.19.0"
NUMPY_VERSION = "2.2.6"

N_PREDICT = 32
N_PROBS = 5

# Shapes shared by both files.
N_LAYER = 4
N_EMBD = 96
N_HEAD = 6
N_HEAD_KV = 3
HEAD_DIM = 16
N_EXPERT = 6
N_EXPERT_USED = 2
N_FF_EXP = 192
N_CTX = 4096

# Per architecture: metadata as the real models have it, and the weight
# scales (standard deviations; the uniform draws are scaled to match).
# The token embedding (std 1) stays the largest part of the residual, each
# attention and MoE output adding about half of that, so the hidden state
# keeps the token and the network does not amplify rounding much (sharper
# attention, as qk_std 2 or q/k norm weights of 2, made the logits 3 times
# as sensitive to a relative change in the weights). output_norm's weights of
# about 20 make the logits' spread over the vocabulary about 30, for a
# median top-2 gap of about 4.
ARCHS = {
    "qwen3moe": {
        "seed": 3,
        "rope_theta": 1000000.0,  # Qwen3-30B-A3B
        "rms_eps": 1e-6,
        "embd_std": 1.0,
        "qk_std": 1.0,  # times 1/sqrt(fan_in) for Q and K
        "attn_std": 1.0,  # times 1/sqrt(fan_in) for V and the output
        "qk_norm": 1.0,  # attn_q_norm / attn_k_norm weights around this
        "router_std": 3.0,  # times 1/sqrt(n_embd)
        "ffn_std": 1.0,  # times 1/sqrt(fan_in) for gate, up and down
        "out_norm": 20.0,  # output_norm weights around this
        "out_std": 1.5,  # times 1/sqrt(n_embd), for output.weight
    },
    "mixtral": {
        "seed": 5,
        "rope_theta": 1000000.0,  # Mixtral-8x7B
        "rms_eps": 1e-5,
        "embd_std": 1.0,
        "qk_std": 1.0,
        "attn_std": 1.0,
        "qk_norm": None,
        "router_std": 3.0,
        "ffn_std": 1.0,
        "out_norm": 20.0,
        "out_std": 1.5,
    },
}


def moe_dir() -> Path:
    return Path(os.environ.get("TANDEM_MOE_DIR", home() / "moe"))


def in_venv() -> bool:
    """True when this interpreter has the pinned gguf and numpy."""
    try:
        import gguf  # noqa: F401
        import numpy
        from importlib.metadata import version
    except ImportError:
        return False
    return version("gguf") == GGUF_VERSION and numpy.__version__ == NUMPY_VERSION


def reexec_in_venv() -> None:
    """Runs this script again under the venv's python, making the venv first."""
    venv = home() / "gguf-venv"
    py = venv / "bin" / "python"
    check = (
        "import gguf, numpy; from importlib.metadata import version; "
        f"assert version('gguf') == '{GGUF_VERSION}' and numpy.__version__ == '{NUMPY_VERSION}'"
    )
    if not py.exists() or subprocess.run([str(py), "-c", check], capture_output=True).returncode != 0:
        print(f"[tiny_moe] making {venv} (gguf=={GGUF_VERSION}, numpy=={NUMPY_VERSION})", file=sys.stderr)
        subprocess.run(["rm", "-rf", str(venv)], check=True)
        if subprocess.run([sys.executable, "-m", "venv", str(venv)]).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "python3-venv"], check=True,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet",
                        f"gguf=={GGUF_VERSION}", f"numpy=={NUMPY_VERSION}"], check=True)
    os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])


# --- the weights ---------------------------------------------------------


def uniform(arch: str, name: str, shape: tuple, std: float):
    """Uniform weights of the given standard deviation, from a generator
    seeded by the architecture and the tensor's name."""
    import numpy as np

    rng = np.random.default_rng([ARCHS[arch]["seed"], zlib.crc32(name.encode())])
    a = std * 3.0 ** 0.5
    return ((rng.random(shape) * 2.0 - 1.0) * a).astype(np.float32)


def around(arch: str, name: str, n: int, centre: float):
    """Norm weights: `centre` times 1 +- 20%."""
    import numpy as np

    rng = np.random.default_rng([ARCHS[arch]["seed"], zlib.crc32(name.encode())])
    return (centre * (1.0 + (rng.random(n) * 2.0 - 1.0) * 0.2)).astype(np.float32)


def gpt2_byte_of() -> dict:
    """GPT-2's byte-level BPE writes each byte as one printable character:
    the printable Latin-1 bytes as themselves, the others as U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            out[chr(256 + n)] = b
            n += 1
    return out


def never_emitted(tok: list) -> list:
    """Ids of the tokens whose lm-head row is zero: the control tokens
    (<|im_end|> and the like: a stop would cut the answer short) and the
    tokens whose bytes are not whole UTF-8 on their own (llama-server leaves
    such a token out of completion_probabilities, so the per-position top
    tokens would come one short). A zero row scores 0, far below the top
    logits, so greedy never picks them."""
    kv = {k: v for k, v, _, _ in tok}
    byte_of = gpt2_byte_of()
    ids = []
    for i, (text, kind) in enumerate(zip(kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"])):
        if kind != 1:  # not NORMAL
            ids.append(i)
            continue
        try:
            bytes(byte_of[ch] for ch in text.decode("utf-8")).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            ids.append(i)
    return ids


def tensors(arch: str, tok: list) -> dict:
    """Name -> numpy array (shape in numpy order, the reverse of GGUF's)."""
    import numpy as np

    c = ARCHS[arch]
    n_vocab = next(len(v) for k, v, _, _ in tok if k == "tokenizer.ggml.tokens")
    t = {}
    t["token_embd.weight"] = uniform(arch, "token_embd.weight", (n_vocab, N_EMBD), c["embd_std"]).astype(np.float16)
    q_dim, kv_dim = N_HEAD * HEAD_DIM, N_HEAD_KV * HEAD_DIM
    for i in range(N_LAYER):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = around(arch, p + "attn_norm.weight", N_EMBD, 1.0)
        t[p + "attn_q.weight"] = uniform(arch, p + "attn_q.weight", (q_dim, N_EMBD), c["qk_std"] / N_EMBD ** 0.5)
        t[p + "attn_k.weight"] = uniform(arch, p + "attn_k.weight", (kv_dim, N_EMBD), c["qk_std"] / N_EMBD ** 0.5)
        t[p + "attn_v.weight"] = uniform(arch, p + "attn_v.weight", (kv_dim, N_EMBD), c["attn_std"] / N_EMBD ** 0.5)
        t[p + "attn_output.weight"] = uniform(arch, p + "attn_output.weight", (N_EMBD, q_dim), c["attn_std"] / q_dim ** 0.5)
        if c["qk_norm"] is not None:
            t[p + "attn_q_norm.weight"] = around(arch, p + "attn_q_norm.weight", HEAD_DIM, c["qk_norm"])
            t[p + "attn_k_norm.weight"] = around(arch, p + "attn_k_norm.weight", HEAD_DIM, c["qk_norm"])
        t[p + "ffn_norm.weight"] = around(arch, p + "ffn_norm.weight", N_EMBD, 1.0)
        t[p + "ffn_gate_inp.weight"] = uniform(arch, p + "ffn_gate_inp.weight", (N_EXPERT, N_EMBD), c["router_std"] / N_EMBD ** 0.5)
        t[p + "ffn_gate_exps.weight"] = uniform(arch, p + "ffn_gate_exps.weight", (N_EXPERT, N_FF_EXP, N_EMBD), c["ffn_std"] / N_EMBD ** 0.5)
        t[p + "ffn_up_exps.weight"] = uniform(arch, p + "ffn_up_exps.weight", (N_EXPERT, N_FF_EXP, N_EMBD), c["ffn_std"] / N_EMBD ** 0.5)
        t[p + "ffn_down_exps.weight"] = uniform(arch, p + "ffn_down_exps.weight", (N_EXPERT, N_EMBD, N_FF_EXP), c["ffn_std"] / N_FF_EXP ** 0.5)
    t["output_norm.weight"] = around(arch, "output_norm.weight", N_EMBD, c["out_norm"])
    out = uniform(arch, "output.weight", (n_vocab, N_EMBD), c["out_std"] / N_EMBD ** 0.5)
    out[never_emitted(tok)] = 0.0
    t["output.weight"] = out.astype(np.float16)
    return t


# --- the files -----------------------------------------------------------


def tokenizer_kv(base: Path) -> list:
    """Every tokenizer.* key of the default model as (key, value, type,
    subtype), strings as their raw bytes."""
    import gguf

    r = gguf.GGUFReader(base)
    out = []
    for key, f in r.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            st = f.types[1]
            if st == gguf.GGUFValueType.STRING:
                val = [bytes(f.parts[i]) for i in f.data]
            else:
                val = [f.parts[i].tolist()[0] for i in f.data]
            out.append((key, val, vt, st))
        elif vt == gguf.GGUFValueType.STRING:
            out.append((key, bytes(f.parts[f.data[0]]), vt, None))
        else:
            out.append((key, f.parts[f.data[0]].tolist()[0], vt, None))
    return out


def write_model(arch: str, path: Path, tok: list) -> None:
    import gguf

    c = ARCHS[arch]
    gguf_arch = "llama" if arch == "mixtral" else arch
    w = gguf.GGUFWriter(None, gguf_arch)
    w.add_name(f"tiny-{arch}")
    w.add_type("model")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    if arch == "qwen3moe":
        # As the Hugging Face converter writes Qwen3-MoE: intermediate_size
        # (unused when every layer is MoE), moe_intermediate_size, and the
        # head size explicitly.
        w.add_feed_forward_length(4 * N_FF_EXP)
        w.add_expert_feed_forward_length(N_FF_EXP)
        w.add_key_length(HEAD_DIM)
        w.add_value_length(HEAD_DIM)
    else:
        # Mixtral: feed_forward_length is the expert width; head size n_embd/n_head.
        w.add_feed_forward_length(N_FF_EXP)
        w.add_vocab_size(len(next(v for k, v, _, _ in tok if k == "tokenizer.ggml.tokens")))
        w.add_rope_dimension_count(HEAD_DIM)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_eps"])
    w.add_expert_count(N_EXPERT)
    w.add_expert_used_count(N_EXPERT_USED)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, val, vt, st in tok:
        w.add_key_value(key, val, vt, sub_type=st)
    for name, arr in tensors(arch, tok).items():
        w.add_tensor(name, arr)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_files() -> dict:
    """Writes the files (a file already there with the same bytes is kept,
    and so is its Q8_0 variant); returns name -> path."""
    base = base_model()
    if not base.is_file():
        sys.exit(f"default model missing at {base}: run `tandem fetch-model`")
    out = moe_dir()
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_kv(base)
    subprocess.run([str(LLAMACPP), "build-quantize"], check=True, stdout=subprocess.DEVNULL)
    files = {}
    for arch in ARCHS:
        path = out / f"tiny-{arch}.gguf"
        q = out / f"tiny-{arch}-Q8_0.gguf"
        new = out / f"tiny-{arch}.gguf.new"
        write_model(arch, new, tok)
        if path.is_file() and sha256(path) == sha256(new):
            new.unlink()
        else:
            os.replace(new, path)
            q.unlink(missing_ok=True)
        if not q.is_file():
            print(f"[tiny_moe] {arch}: llama-quantize Q8_0", file=sys.stderr)
            subprocess.run([str(LLAMACPP), "quantize", str(path), str(q), "Q8_0"],
                           check=True, stderr=subprocess.DEVNULL)
        files[arch] = path
        files[f"{arch}-Q8_0"] = q
    return files


# --- llama.cpp's answers -------------------------------------------------


def check(name: str, greedy: list) -> dict:
    """Logit gaps (top-1 minus top-2) along the continuations; exits if an
    answer is degenerate (one token over and over)."""
    gaps = sorted(p[0]["logprob"] - p[1]["logprob"] for g in greedy for p in g["top"])
    for g in greedy:
        ids = g["greedy_ids"]
        if len(ids) < N_PREDICT:
            sys.exit(f"{name}: llama.cpp stopped after {len(ids)} tokens")
        if len(set(ids)) < len(ids) // 4:
            sys.exit(f"{name}: degenerate answer {ids}")
    stats = {
        "positions": len(gaps),
        "min": round(gaps[0], 3),
        "median": round(gaps[len(gaps) // 2], 3),
        "below_0.1": sum(x < 0.1 for x in gaps),
        "below_0.5": sum(x < 0.5 for x in gaps),
    }
    print(f"[tiny_moe] {name}: top-2 logit gap {stats}", file=sys.stderr)
    return stats


def record(files: dict) -> None:
    server, cases = server_and_prompts()
    result = {
        "source": "llama.cpp from llama-cpp-python 0.3.36: llama-server -t 2, /completion "
        f"with temperature 0, n_predict {N_PREDICT}, n_probs {N_PROBS} (top: the top tokens "
        "at each generated position with their pre-sampling log-probabilities); the Q8_0 "
        "files from the portable llama-quantize",
        "files": {},
    }
    for name, path in files.items():
        print(f"[tiny_moe] {name}: recording llama-server's greedy answers", file=sys.stderr)
        greedy = greedy_on(server, path, cases, N_PREDICT, N_PROBS)
        result["files"][name] = {
            "file": path.name,
            "architecture": "llama" if name.startswith("mixtral") else "qwen3moe",
            "sha256": sha256(path),
            "top2_logit_gap": check(name, greedy),
            "greedy": greedy,
        }
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[tiny_moe] wrote {RECORD}", file=sys.stderr)


def main() -> None:
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd not in ("files", "record"):
        sys.exit(__doc__)
    if not in_venv():
        reexec_in_venv()
    files = make_files()
    if cmd == "files":
        for name, path in files.items():
            print(f"{name}\t{path}\t{sha256(path)}")
    else:
        record(files)


if __name__ == "__main__":
    main()
