#!/usr/bin/env python3
"""moemesh vs llama.cpp: prompt and decode tokens/s on synthetic qwen3moe / qwen3next models.

    python3 bench/bench_vs_llama.py [--arch qwen3moe|qwen3next] [--threads N] [--reps R] [--keep-models DIR]
                                    [--types q8_0,q4_k] ...
    (bash bench/bench_vs_llama.sh passes its arguments here)

For each weight type: make (once, cached in --keep-models) a random-weight GGUF of the --arch's
shape (SHAPES below), then R times, alternating which goes first, run
  * `moemesh run --tokens <P ids> -n G --threads T --greedy --ignore-eos` (one process per rep), and
  * `node tests/ref/llama_ref.mjs bench --reps 1 ...` (node-llama-cpp; one process per rep, which
    does its own unmeasured warm-up pass before the measured one),
on the SAME GGUF, the SAME P prompt token ids (llama_ref's pseudo-random prompt, recomputed here),
the same G generated tokens and the same thread count. Medians, min and max over the R reps are
printed as a table with the moemesh/llama.cpp ratio, plus the decode "bandwidth view" (bytes of
weights touched per decoded token x tokens/s), and written as JSON to build/ (never committed).
Python 3 standard library only.
"""
import argparse
import datetime
import hashlib
import json
import os
import atexit
import glob
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# About 1.02 B parameters: 8 x (attention 10.5 M + router 0.13 M + 64 experts x 3 x 2048 x 256 = 100.7 M)
# + token_embd and output (2 x 32000 x 2048 = 131 M). Per decoded token: ~250 M parameters read
# (attention 84 M, output 66 M, routers, one embedding row, 8 of the 64 experts in each layer 101 M).
# Expert ff 256 keeps every row length a multiple of 256, as Q4_K needs.
# qwen3next: one Qwen3-Next-80B-A3B layer group at full width (hidden 2048, gated attention 16/2
# heads of 256 with 64 rotary dims, gated DeltaNet 16 k / 32 v heads of 128, conv 4, expert ff 512,
# shared expert 512, top-10), with 4 layers instead of 48 (3 DeltaNet + 1 attention, the real
# schedule), 128 experts instead of 512 and a 32000 vocabulary instead of 151936, so that the file
# (~2 B parameters) fits this machine. Decode reads the same bytes per layer as the real model:
# top-10 experts whatever E is. Per decoded token: ~4 x (34 M attention/DeltaNet + 3 M shared +
# 31 M routed) + 66 M output ≈ 340 M parameters.
SHAPES = {
    "qwen3moe": dict(layers=8, hidden=2048, heads=16, kv_heads=4, head_dim=128, experts=64, top_k=8,
                     expert_ff=256, vocab=32000, seed=1),
    "qwen3next": dict(layers=4, hidden=2048, heads=16, kv_heads=2, head_dim=256, experts=128, top_k=10,
                      expert_ff=512, vocab=32000, seed=1,
                      extra=["--shared-ff", "512", "--ssm-k-heads", "16", "--ssm-v-heads", "32",
                             "--ssm-head-dim", "128", "--conv-kernel", "4", "--rope-dim", "64"]),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def describe_binary(moemesh):
    """Which engine was measured (others may rebuild build/moemesh during a long run): logged, and
    kept in the results."""
    with open(moemesh, "rb") as f:
        binary = dict(path=moemesh, sha256=hashlib.sha256(f.read()).hexdigest(),
                      mtime=datetime.datetime.fromtimestamp(os.path.getmtime(moemesh)).isoformat())
    git = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True)
    binary["source_tree"] = git.stdout.strip() or None
    log(f"[bench] {moemesh}: built {binary['mtime']}, sha256 {binary['sha256'][:12]}, tree {binary['source_tree']}")
    return binary


def model_path(models_dir, arch, wtype):
    return os.path.join(models_dir, f"{arch}-bench-{wtype}.gguf")


# The i-quants make-model can only write with --fast-weights (tools/make_model.cpp).
IQ_LOWBIT_TYPES = {"iq3_s", "iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m"}


def make_model(moemesh, path, arch, wtype):
    if os.path.exists(path):
        log(f"[bench] reusing {path}")
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    s = SHAPES[arch]
    cmd = [moemesh, "make-model", "--arch", arch, "--out", tmp,
           "--layers", str(s["layers"]), "--hidden", str(s["hidden"]), "--heads", str(s["heads"]),
           "--kv-heads", str(s["kv_heads"]), "--head-dim", str(s["head_dim"]),
           "--experts", str(s["experts"]), "--top-k", str(s["top_k"]), "--expert-ff", str(s["expert_ff"]),
           "--vocab", str(s["vocab"]), "--type", wtype, "--seed", str(s["seed"])] + s.get("extra", [])
    if wtype.lower() in IQ_LOWBIT_TYPES:
        cmd.append("--fast-weights")  # no quantizer for these in moemesh: random grid indices written directly
    log(f"[bench] generating {path} (Q4_K takes a few CPU-minutes): {' '.join(cmd)}")
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    os.replace(tmp, path)  # only a complete file is ever reused
    log(f"[bench] generated {path} in {time.time() - t0:.0f} s")


def inspect_model(moemesh, path):
    """Parameters, tensor bytes and bytes of weights touched per decoded token, from `moemesh inspect`."""
    out = subprocess.run([moemesh, "inspect", path], check=True, capture_output=True, text=True).stdout
    hp = re.search(r"vocab (\d+), hidden (\d+), layers (\d+).*experts (\d+) top-(\d+)", out)
    if not hp:
        raise RuntimeError(f"cannot parse hyper-parameters from `moemesh inspect {path}`")
    vocab, hidden, layers, n_exp, top_k = map(int, hp.groups())
    tensors = []
    for m in re.finditer(r"^\s+(\S+\.weight)\s+(\S+)\s+\{([\d, ]+)\}\s+(\d+)\s*$", out, re.M):
        shape = [int(x) for x in m.group(3).split(",")]
        n = 1
        for d in shape:
            n *= d
        tensors.append(dict(name=m.group(1), type=m.group(2), shape=shape, params=n, bytes=int(m.group(4))))
    if not tensors:
        raise RuntimeError(f"cannot parse the tensor list from `moemesh inspect {path}`")
    expert_bytes = sum(t["bytes"] for t in tensors if "_exps." in t["name"])
    embd_bytes = sum(t["bytes"] for t in tensors if t["name"] == "token_embd.weight")
    other_bytes = sum(t["bytes"] for t in tensors if "_exps." not in t["name"] and t["name"] != "token_embd.weight")
    # One decoded token reads: every non-expert weight except token_embd (attention, norms, router,
    # output), ONE row of token_embd, and top_k/E of each layer's expert weights (KV cache not counted).
    touched = other_bytes + embd_bytes / vocab + expert_bytes * top_k / n_exp
    types = sorted({t["type"] for t in tensors if t["name"].endswith("_exps.weight")})
    return dict(params=sum(t["params"] for t in tensors), tensor_bytes=sum(t["bytes"] for t in tensors),
                file_bytes=os.path.getsize(path), expert_bytes=expert_bytes, non_expert_bytes=other_bytes + embd_bytes,
                bytes_touched_per_token=touched, vocab=vocab, hidden=hidden, layers=layers, experts=n_exp,
                top_k=top_k, expert_types=types)


def llama_ref_prompt(n_tokens, n_vocab):
    """The pseudo-random prompt that tests/ref/llama_ref.mjs `bench` feeds llama.cpp."""
    state, ids = 12345, []
    for _ in range(n_tokens):
        state = (state * 1103515245 + 12345) % 2147483648
        ids.append(state % n_vocab)
    return ids


PERF_RE = re.compile(r"prompt:\s*(\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\)\s*\|\s*"
                     r"decode:\s*(\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\)")


# llama.cpp's CPU backend variant for each moemesh kernel set (--isa): the prebuilt ggml builds
# for the same instruction sets (haswell: AVX2 + FMA + F16C; alderlake: + AVX-VNNI).
LLAMA_CPU_FOR_ISA = {"avx2": "haswell", "avxvnni": "alderlake"}


def llama_ref_with_cpu_variant(variant):
    """node-llama-cpp loads the best libggml-cpu-*.so of its prebuilt directory. To measure another
    one, build a temporary tree of symlinks to tests/ref (llama_ref.mjs, node_modules) whose copy of
    that directory lists only libggml-cpu-<variant>.so, and run node with --preserve-symlinks so
    that packages resolve inside it. Nothing under tests/ref is changed. Returns the script path."""
    ref = os.path.join(ROOT, "tests", "ref")
    found = glob.glob(os.path.join(ref, "node_modules", "@node-llama-cpp", "*", "bins", "*", "libggml-cpu-*.so"))
    bins_dirs = sorted({os.path.dirname(f) for f in found})
    wanted = [d for d in bins_dirs if os.path.exists(os.path.join(d, f"libggml-cpu-{variant}.so"))]
    if not wanted:
        have = sorted({re.sub(r"^libggml-cpu-|\.so$", "", os.path.basename(f)) for f in found})
        sys.exit(f"--llama-cpu {variant}: no libggml-cpu-{variant}.so under {ref}/node_modules/@node-llama-cpp "
                 f"(available: {', '.join(have) or 'none: run npm install in tests/ref'})")
    bins = wanted[0]
    tmp = tempfile.mkdtemp(prefix="moemesh-llama-cpu-")
    atexit.register(shutil.rmtree, tmp, True)

    def mirror(src, dst, skip):
        """dst gets a symlink to every entry of src except the names in skip (made by the caller)."""
        os.makedirs(dst, exist_ok=True)
        for name in os.listdir(src):
            if name not in skip:
                os.symlink(os.path.join(src, name), os.path.join(dst, name))

    # Walk from tests/ref down to the bins directory, mirroring each level but the next one on the path.
    rel = os.path.relpath(bins, ref).split(os.sep)
    src, dst = ref, tmp
    for part in rel:
        mirror(src, dst, {part})
        src, dst = os.path.join(src, part), os.path.join(dst, part)
    os.makedirs(dst)
    for name in os.listdir(src):
        if name.startswith("libggml-cpu-") and name != f"libggml-cpu-{variant}.so":
            continue
        os.symlink(os.path.join(src, name), os.path.join(dst, name))
    return os.path.join(tmp, "llama_ref.mjs")


def run_moemesh(args, path, ids, n_gen, timeout):
    cmd = [args.moemesh, "run", "--model", path, "--tokens", ",".join(map(str, ids)), "-n", str(n_gen),
           "--threads", str(args.threads), "--kv-type", "f16", "--greedy", "--ignore-eos",
           "--ctx", str(max(256, len(ids) + n_gen + 1))]
    t0 = time.time()
    env = dict(os.environ)
    if args.isa:
        env["MOEMESH_CPU_ISA"] = args.isa
    # The generated text (random weights: arbitrary bytes, not always UTF-8) is not needed.
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
                       timeout=timeout, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"moemesh run failed (rc {p.returncode}): {p.stderr[-2000:]}")
    m = None
    for line in p.stderr.splitlines():
        m = PERF_RE.search(line) or m
    if not m:
        raise RuntimeError(f"no timing line in moemesh stderr: {p.stderr[-2000:]}")
    isa = re.search(r"\d+ threads \((\w+)\)", p.stderr)  # "loaded ... N threads (avx512vnni)"
    if args.isa and (not isa or isa.group(1) != args.isa):
        sys.exit(f"--isa {args.isa}: moemesh ran {isa.group(1) if isa else 'unknown'} kernels (does this CPU have "
                 f"{args.isa}?): {p.stderr[-500:]}")
    return dict(prompt_tokens=int(m.group(1)), prompt_tps=float(m.group(3)),
                decode_tokens=int(m.group(4)), decode_tps=float(m.group(6)), wall_s=time.time() - t0,
                cpu_isa=isa.group(1) if isa else None)


def run_llama(args, path, n_prompt, n_gen, timeout):
    node = [args.node] + (["--preserve-symlinks", "--preserve-symlinks-main", args.llama_ref]
                          if args.llama_cpu else [args.llama_ref])
    cmd = node + ["bench", "--model", path,
           "--threads", str(args.threads), "--prompt-tokens", str(n_prompt), "--gen", str(n_gen),
           "--reps", "1", "--kv-type", "f16"]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"llama_ref bench failed (rc {p.returncode}): {p.stderr[-2000:]}")
    d = json.loads(p.stdout.strip().splitlines()[-1])
    backend = d.get("config", {}).get("cpu_backend")
    if args.llama_cpu and backend != args.llama_cpu:
        sys.exit(f"--llama-cpu {args.llama_cpu}: llama.cpp loaded the {backend} CPU backend instead")
    return dict(prompt_tokens=d["prompt"]["tokens"], prompt_tps=d["prompt_tokens_per_s"],
                decode_tokens=d["decode"]["tokens"], decode_tps=d["decode_tokens_per_s"],
                source=d.get("source"), cpu_backend=d.get("config", {}).get("cpu_backend"),
                wall_s=time.time() - t0)


def summary(xs):
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs), n=len(xs))


def fmt_size(b):
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def fmt_tps(s):
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def print_table(results, args):
    cols = ["model", "type", "params", "file", "moemesh prompt t/s", "llama.cpp prompt t/s", "ratio",
            "moemesh decode t/s", "llama.cpp decode t/s", "ratio"]
    rows = []
    for r in results:
        m, l = r["moemesh"], r["llama_cpp"]
        rows.append([r["model"], r["type"], f"{r['info']['params'] / 1e9:.3f} B", fmt_size(r["info"]["file_bytes"]),
                     fmt_tps(m["prompt_tps"]), fmt_tps(l["prompt_tps"]), f"{r['ratio_prompt']:.2f}x",
                     fmt_tps(m["decode_tps"]), fmt_tps(l["decode_tps"]), f"{r['ratio_decode']:.2f}x"])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    print()
    print(f"moemesh vs llama.cpp (node-llama-cpp), {args.prompt_tokens}-token prompt, {args.gen} generated tokens, "
          f"{args.threads} thread(s), KV f16, median (min-max) of {args.reps} interleaved reps; ratio = moemesh / llama.cpp")
    isas = sorted({r0.get("cpu_isa") or "?" for r in results for r0 in r["runs"]["moemesh"]})
    backends = sorted({r0.get("cpu_backend") or "?" for r in results for r0 in r["runs"]["llama_cpp"]})
    print(f"moemesh CPU kernels: {', '.join(isas)} (--isa picks others); "
          f"llama.cpp CPU backend: {', '.join(backends)}")
    print(line(cols))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    print()
    print("Decode bandwidth view: bytes of weights touched per decoded token (non-expert weights but one "
          "token_embd row, plus top-k/E of the expert weights; KV cache not counted) x median decode tokens/s")
    bcols = ["model", "type", "MB touched/token", "moemesh GB/s", "llama.cpp GB/s"]
    brows = [[r["model"], r["type"], f"{r['info']['bytes_touched_per_token'] / 1e6:.1f}",
              f"{r['moemesh_decode_GBps']:.2f}", f"{r['llama_cpp_decode_GBps']:.2f}"] for r in results]
    bw = [max(len(c), *(len(row[i]) for row in brows)) for i, c in enumerate(bcols)]
    bline = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, bw)) + " |"
    print(bline(bcols))
    print("|" + "|".join("-" * (w + 2) for w in bw) + "|")
    for row in brows:
        print(bline(row))
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="qwen3moe", choices=sorted(SHAPES), help="model family (default qwen3moe)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both engines (default: nproc)")
    ap.add_argument("--reps", type=int, default=5, help="measured runs per engine and model (default 5)")
    ap.add_argument("--keep-models", default=os.path.join(ROOT, "build", "bench-models"),
                    help="directory where the synthetic models are cached (default build/bench-models)")
    ap.add_argument("--types", default="q8_0,q4_k", help="weight types, comma-separated (default q8_0,q4_k)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64, help="generated (decoded) tokens (default 64)")
    ap.add_argument("--moemesh", default=os.path.join(ROOT, "build", "moemesh"))
    ap.add_argument("--node", default="node")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds allowed for one run of one engine")
    ap.add_argument("--json", default=None, help="results file (default build/bench-vs-llama-<date>.json)")
    ap.add_argument("--isa", default=None, choices=["scalar", "avx2", "avxvnni", "avx512vnni"],
                    help="moemesh's CPU kernels (MOEMESH_CPU_ISA; default: the best this CPU has); avx2 and avxvnni "
                         "also pick llama.cpp's matching CPU backend (haswell, alderlake) unless --llama-cpu says otherwise")
    ap.add_argument("--llama-cpu", default=None, metavar="VARIANT",
                    help="llama.cpp's CPU backend (libggml-cpu-VARIANT.so of node-llama-cpp's prebuilt set, e.g. haswell, "
                         "alderlake, zen4, icelake; 'best': what it picks itself, the default without --isa)")
    args = ap.parse_args()
    if args.llama_cpu is None and args.isa in LLAMA_CPU_FOR_ISA:
        args.llama_cpu = LLAMA_CPU_FOR_ISA[args.isa]
    if args.llama_cpu == "best":
        args.llama_cpu = None
    args.llama_ref = (llama_ref_with_cpu_variant(args.llama_cpu) if args.llama_cpu
                      else os.path.join(ROOT, "tests", "ref", "llama_ref.mjs"))
    if args.reps < 1 or args.threads < 1:
        ap.error("--reps and --threads must be >= 1")
    if not os.access(args.moemesh, os.X_OK):
        sys.exit(f"{args.moemesh} not found: cmake --build build -j2 --target moemesh")
    if args.threads >= (os.cpu_count() or 1):
        log(f"[bench] warning: --threads {args.threads} on {os.cpu_count()} cores: llama.cpp's spinning workers plus "
            "node's main thread oversubscribe the CPU and its decode may collapse; --threads 1 is the safe choice")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.json or os.path.join(ROOT, "build", f"bench-vs-llama-{stamp}.json")

    binary = describe_binary(args.moemesh)
    results = []
    load_before = os.getloadavg()
    t_start = time.time()
    for wtype in [t.strip() for t in args.types.split(",") if t.strip()]:
        path = model_path(args.keep_models, args.arch, wtype)
        make_model(args.moemesh, path, args.arch, wtype)
        info = inspect_model(args.moemesh, path)
        ids = llama_ref_prompt(args.prompt_tokens, info["vocab"])
        log(f"[bench] {os.path.basename(path)}: {info['params'] / 1e9:.3f} B params, {fmt_size(info['file_bytes'])}, "
            f"{info['bytes_touched_per_token'] / 1e6:.1f} MB of weights per decoded token")
        # Warm the page cache and moemesh's first-touch costs; llama_ref warms up inside every process.
        run_moemesh(args, path, ids[:8], 2, args.timeout)
        runs = {"moemesh": [], "llama_cpp": []}
        for rep in range(args.reps):
            order = ["moemesh", "llama_cpp"] if rep % 2 == 0 else ["llama_cpp", "moemesh"]
            for eng in order:
                if eng == "moemesh":
                    r = run_moemesh(args, path, ids, args.gen, args.timeout)
                else:
                    r = run_llama(args, path, args.prompt_tokens, args.gen, args.timeout)
                r["load1"] = os.getloadavg()[0]
                runs[eng].append(r)
                log(f"[bench] {wtype} rep {rep + 1}/{args.reps} {eng:9s}: prompt {r['prompt_tps']:8.1f} t/s, "
                    f"decode {r['decode_tps']:7.2f} t/s (load {r['load1']:.1f})")
        m = {k: summary([r[k] for r in runs["moemesh"]]) for k in ("prompt_tps", "decode_tps")}
        l = {k: summary([r[k] for r in runs["llama_cpp"]]) for k in ("prompt_tps", "decode_tps")}
        results.append(dict(
            model=os.path.basename(path), type=wtype, path=path, info=info, moemesh=m, llama_cpp=l,
            ratio_prompt=m["prompt_tps"]["median"] / l["prompt_tps"]["median"],
            ratio_decode=m["decode_tps"]["median"] / l["decode_tps"]["median"],
            moemesh_decode_GBps=info["bytes_touched_per_token"] * m["decode_tps"]["median"] / 1e9,
            llama_cpp_decode_GBps=info["bytes_touched_per_token"] * l["decode_tps"]["median"] / 1e9,
            runs=runs))

    if datetime.datetime.fromtimestamp(os.path.getmtime(args.moemesh)).isoformat() != binary["mtime"]:
        binary["rebuilt_during_run"] = True
        log(f"[bench] warning: {args.moemesh} was rebuilt during the run: moemesh numbers mix two builds")
    print_table(results, args)
    for r in results:
        l = r["llama_cpp"]["decode_tps"]
        if l["max"] > 3 * l["min"] or r["ratio_decode"] > 4:
            print(f"note: llama.cpp decode on {r['type']} is erratic or collapsed (min {l['min']:.2f}, max {l['max']:.2f} t/s): "
                  "its spinning thread pool suffers on a loaded machine; try --threads 1 (see bench/README.md)")
    doc = dict(date=stamp, command=" ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
               threads=args.threads, reps=args.reps, prompt_tokens=args.prompt_tokens, gen=args.gen, kv_type="f16",
               nproc=os.cpu_count(), loadavg_before=load_before, loadavg_after=os.getloadavg(),
               elapsed_s=time.time() - t_start, moemesh_binary=binary, arch=args.arch, shape=SHAPES[args.arch],
               results=results)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"results: {json_path}")


if __name__ == "__main__":
    main()
