#!/usr/bin/env python3
"""moemesh serve --parallel (continuous batching) vs llama.cpp's batched sequences: aggregate tokens/s of P concurrent requests.

    python3 bench/bench_parallel.py [--parallel 1,2,4] [--reps 3] [--threads 2] [--prompt-tokens 32] [--gen 32]
                                    [--arch qwen3moe|qwen3next] [--type q8_0] [--keep-models DIR]

Makes (once, cached in --keep-models; the same files and names as bench/bench_vs_llama.py) a
random-weight GGUF of the --arch's shape (bench_vs_llama.SHAPES), then R times, for each P of
--parallel, alternating which engine goes first:
  * moemesh: `moemesh serve --serve 127.0.0.1:0 --parallel P --threads T --kv-type f16` (a fresh
    process each time), waits for GET /health, runs one unmeasured warm-up round, then two measured
    rounds: P threads POST /v1/completions at once, each {"prompt": [its own N token ids],
    "max_tokens": G, "temperature": 0, "ignore_eos": true}; checks every reply has G tokens and
    that /health's decode.max_batch reached P; stops the server (SIGTERM). Round 1 is timed end
    to end; in round 2 another thread polls GET /health (--poll-interval) for the decode phase.
  * llama.cpp: `node tests/ref/llama_ref.mjs parallel --sequences P ...` (node-llama-cpp: one
    context with P sequences, all sequences' calls of a step issued together so that they share one
    llama_decode; its own unmeasured warm-up round first).
Both get the SAME prompts (request/sequence s: llama_ref's parallelPrompt(s), recomputed here), the
same N, G, thread count and KV type f16. Before each run the script waits (--wait-idle) until the
CPUs are idle, and reruns (up to 3 tries) a run during which other processes took more than
--max-others of the CPUs (/proc/stat minus this script's and its children's CPU time): others'
builds on a shared box make llama.cpp's spinning thread pool collapse.

Two throughputs per run:
  * tok/s, end to end, prompt processing INCLUDED (both engines): P*G generated tokens / wall
    seconds from sending the P requests (issuing the P prompts) to the last reply (the last
    sequence's G-th token).
  * decode tok/s, prompt EXCLUDED, all P sequences decoding together. llama.cpp: P*(G-1) tokens
    from all P prompts done (they run as one batch; every sequence has its first token) to the
    end (the sequences run in lockstep). moemesh (prompts are admitted one at a time, in chunks
    between decode steps, so the first requests decode in smaller batches meanwhile): from the
    first decode step of batch P (it starts right after the last prompt) to the start of the last
    step that still had all P, tokens of the steps in between, from /health's decode counters
    polled during round 2 (the window's ends are known to within one poll interval).
Medians, min and max over the R reps, the moemesh/llama.cpp ratio and each engine's speedup over
its own P=1 are printed as tables and written as JSON to build/ (never committed).
Python 3 standard library only.
"""
import argparse
import datetime
import http.client
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.dont_write_bytecode = True  # no bench/__pycache__ in the tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_vs_llama as bvl  # noqa: E402  (model shapes, make_model, inspect_model)

ROOT = bvl.ROOT


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def parallel_prompt(s, n_tokens, n_vocab):
    """Request/sequence s's prompt: tests/ref/llama_ref.mjs parallelPrompt(s, ...)."""
    state, ids = 12345 + 7919 * s, []
    for _ in range(n_tokens):
        state = (state * 1103515245 + 12345) % 2147483648
        ids.append(state % n_vocab)
    return ids


def http_json(url, body=None, timeout=600):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


LISTEN_RE = re.compile(r"http: listening on http://([\d.]+):(\d+)")


class Server:
    """One `moemesh serve` process on an ephemeral port; its stderr goes to a file (the request log)."""

    def __init__(self, args, path, parallel, ctx):
        self.log_file = tempfile.NamedTemporaryFile(prefix="bench_parallel_", suffix=".log", delete=False)
        cmd = [args.moemesh, "serve", "--model", path, "--serve", "127.0.0.1:0", "--parallel", str(parallel),
               "--threads", str(args.threads), "--kv-type", "f16", "--ctx", str(ctx)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log_file)
        deadline = time.time() + args.timeout
        self.base = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moemesh serve exited (rc {self.proc.returncode}): {self.stderr()[-2000:]}")
            m = LISTEN_RE.search(self.stderr())
            if m:
                self.base = f"http://{m.group(1)}:{m.group(2)}"
                try:
                    if http_json(self.base + "/health", timeout=5).get("status") == "ok":
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moemesh serve did not become healthy in {args.timeout} s: {self.stderr()[-2000:]}")

    def stderr(self):
        with open(self.log_file.name, "r", errors="replace") as f:
            return f.read()

    def health(self):
        return http_json(self.base + "/health", timeout=30)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        os.unlink(self.log_file.name)


def fire(base, prompts, n_gen, timeout):
    """P concurrent POST /v1/completions; returns (wall seconds send -> last reply, replies)."""
    n = len(prompts)
    barrier = threading.Barrier(n + 1)
    replies, errors, t_end = [None] * n, [], [0.0] * n

    def worker(i):
        body = {"prompt": prompts[i], "max_tokens": n_gen, "temperature": 0, "ignore_eos": True}
        barrier.wait()
        try:
            replies[i] = http_json(base + "/v1/completions", body, timeout=timeout)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(f"request {i}: {e}")
        t_end[i] = time.perf_counter()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return max(t_end) - t0, replies


def poll_health(base, stop, samples, interval):
    """Until stop is set: (time, decode steps, decode tokens) from GET /health every `interval` s,
    over one kept-alive connection (cheap: the poller shares the cores with the model)."""
    host, port = base[len("http://"):].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        while not stop.is_set():
            try:
                conn.request("GET", "/health")
                d = json.loads(conn.getresponse().read().decode())["decode"]
                samples.append((time.perf_counter(), d["steps"], d["tokens"]))
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
            stop.wait(interval)
    finally:
        conn.close()


def full_batch_rate(samples, p):
    """Decode tokens/s while all p requests decode together, from /health samples.

    The server counts a step (and its batch's tokens) when it starts it. An increase of the step
    counter with tokens == p x steps means only full-batch steps started in between; the first one
    runs right after the last prompt (same loop iteration), so from the first such change on the
    model thread only decodes. Window: that change .. the last change after which every step was
    still full; rate = tokens of the steps started in it / its seconds (step-start to step-start;
    each end known to within one poll interval)."""
    changes = [samples[0]] + [c for a, c in zip(samples, samples[1:]) if c[1] > a[1]]
    start = end = None
    for a, c in zip(changes, changes[1:]):
        full = c[2] - a[2] == p * (c[1] - a[1])
        if start is None:
            if full:
                start = end = c
        elif full:
            end = c
        else:
            break
    if start is None or end is start:
        return None, 0
    return (end[2] - start[2]) / (end[0] - start[0]), end[1] - start[1]


def run_moemesh(args, path, prompts, n_gen):
    p = len(prompts)
    srv = Server(args, path, p, max(256, len(prompts[0]) + n_gen + 1))
    try:
        fire(srv.base, prompts, n_gen, args.timeout)  # warm-up (page cache, first touches), not counted
        # Round 1, end to end: nothing else talks to the server.
        h0 = srv.health()["decode"]
        wall, replies = fire(srv.base, prompts, n_gen, args.timeout)
        h1 = srv.health()["decode"]
        for i, r in enumerate(replies):
            got = r.get("usage", {}).get("completion_tokens")
            if got != n_gen:
                raise RuntimeError(f"moemesh request {i}: {got} completion tokens, expected {n_gen}")
        # Round 2, decode phase: the same requests again with /health polled alongside.
        samples, stop = [], threading.Event()
        samples.append((time.perf_counter(), h1["steps"], h1["tokens"]))
        poller = threading.Thread(target=poll_health, args=(srv.base, stop, samples, args.poll_interval))
        poller.start()
        try:
            wall_polled, _ = fire(srv.base, prompts, n_gen, args.timeout)
        finally:
            stop.set()
            poller.join()
        decode_rate, decode_steps = full_batch_rate(samples, p)
    finally:
        srv.stop()
    steps, toks = h1["steps"] - h0["steps"], h1["tokens"] - h0["tokens"]
    return dict(wall_s=wall, tokens=p * n_gen, tok_per_s=p * n_gen / wall, decode_tok_per_s=decode_rate,
                decode_full_batch_steps=decode_steps, health_samples=len(samples),
                polled_round_tok_per_s=p * n_gen / wall_polled, decode_steps=steps,
                decode_tokens=toks, mean_batch=toks / steps if steps else None, max_batch=h1["max_batch"],
                batching_ok=h1["max_batch"] >= p)


def run_llama(args, path, p, n_prompt, n_gen):
    cmd = [args.node, os.path.join(ROOT, "tests", "ref", "llama_ref.mjs"), "parallel", "--model", path,
           "--threads", str(args.threads), "--sequences", str(p), "--prompt-tokens", str(n_prompt),
           "--gen", str(n_gen), "--kv-type", "f16"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if r.returncode != 0:
        raise RuntimeError(f"llama_ref parallel failed (rc {r.returncode}): {r.stderr[-2000:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    perf = d.get("perf_decode_phase", {})
    # With P > 1 and batching engaged, every decode-phase llama_decode has P tokens ("prompt eval"
    # in llama.cpp's counters; its single-token "runs" count prints as 1 when it is 0).
    batched = perf.get("batched_tokens") or 0
    return dict(wall_s=d["wall_s"], tokens=d["tokens"], tok_per_s=d["tok_per_s"],
                prompt_wall_s=d["prompt_wall_s"], decode_wall_s=d["decode_wall_s"],
                decode_tokens=d["decode_tokens"], decode_tok_per_s=d["decode_tok_per_s"], perf_decode_phase=perf,
                batching_ok=p == 1 or batched >= d["decode_tokens"], cpu_backend=d["config"].get("cpu_backend"),
                greedy_heads=d.get("greedy_heads"))


def cpu_times():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]  # total, idle + iowait


def wait_idle(max_wait, threshold=0.2):
    """Waits (up to max_wait s) until the CPUs were busy less than `threshold` of one second: others'
    builds and tests on a shared dev box collapse llama.cpp's spinning thread pool. Returns the last
    busy fraction seen."""
    deadline = time.time() + max_wait
    while True:
        t0, i0 = cpu_times()
        time.sleep(1.0)
        t1, i1 = cpu_times()
        busy = 1 - (i1 - i0) / max(1, t1 - t0)
        if busy < threshold or time.time() >= deadline:
            return busy
        log(f"[bench] CPUs {busy:.0%} busy (others' work): waiting")


def our_cpu_s():
    """CPU seconds of this script and of its children that have been waited for (servers, node)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def measured(fn, max_others, tries):
    """Runs fn() until others' processes used at most max_others of the machine's CPU time meanwhile
    (at most `tries` times); returns its result with "others_cpu" (that share) and "tries"."""
    hz = os.sysconf("SC_CLK_TCK")
    for attempt in range(1, tries + 1):
        (t0, i0), c0, w0 = cpu_times(), our_cpu_s(), time.time()
        r = fn()
        (t1, i1), c1, w1 = cpu_times(), our_cpu_s(), time.time()
        busy_s = ((t1 - t0) - (i1 - i0)) / hz
        r["others_cpu"] = max(0.0, (busy_s - (c1 - c0)) / ((w1 - w0) * (os.cpu_count() or 1)))
        r["tries"] = attempt
        if r["others_cpu"] <= max_others or attempt == tries:
            return r
        log(f"[bench] others used {r['others_cpu']:.0%} of the CPUs during that run: again")
        wait_idle(60)


def summary(xs):
    xs = [x for x in xs if x is not None]
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs), n=len(xs)) if xs else None


def fmt(s):
    return "-" if s is None else f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"


def table(title, cols, rows):
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    print(title)
    print(line(cols))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print()


def print_tables(results, args):
    base = results[0]
    print()
    print(f"moemesh serve --parallel P vs llama.cpp (node-llama-cpp, P sequences of one context): {args.arch} "
          f"{args.type}, P requests x ({args.prompt_tokens}-token prompt + {args.gen} generated tokens), "
          f"{args.threads} thread(s), KV f16, median [min-max] of {args.reps} interleaved reps; "
          "ratio = moemesh / llama.cpp; 'vs P=1' = the engine's own median over its median at the first P")
    print()
    for key, title in (("tok_per_s", "End to end, prompt included: P*G tokens / (send -> last reply)"),
                       ("decode_tok_per_s", "Decode phase only, all P sequences decoding (prompts excluded)")):
        rows = []
        for r in results:
            m, l = r["moemesh"][key], r["llama_cpp"][key]
            mb, lb = base["moemesh"][key], base["llama_cpp"][key]
            rows.append([str(r["parallel"]), fmt(m), fmt(l), f"{m['median'] / l['median']:.2f}x",
                         f"{m['median'] / mb['median']:.2f}x", f"{l['median'] / lb['median']:.2f}x",
                         "-" if r["moemesh"]["mean_batch"] is None else f"{r['moemesh']['mean_batch']['median']:.2f}"])
        table(title, ["P", "moemesh tok/s", "llama.cpp tok/s", "ratio", "moemesh vs P=1", "llama.cpp vs P=1",
                      "moemesh mean batch"], rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="qwen3moe", choices=sorted(bvl.SHAPES), help="model family (default qwen3moe)")
    ap.add_argument("--type", default="q8_0", help="weight type of the synthetic model (default q8_0)")
    ap.add_argument("--parallel", default="1,2,4", help="concurrent requests / sequences, comma-separated (default 1,2,4)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="measured runs per engine and P (default 3)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt tokens per request (default 32)")
    ap.add_argument("--gen", type=int, default=32, help="generated tokens per request (default 32)")
    ap.add_argument("--keep-models", default=os.path.join(ROOT, "build", "bench-models"),
                    help="directory where the synthetic model is cached (default build/bench-models)")
    ap.add_argument("--moemesh", default=os.path.join(ROOT, "build", "moemesh"))
    ap.add_argument("--node", default="node")
    ap.add_argument("--timeout", type=int, default=900, help="seconds allowed for one run of one engine")
    ap.add_argument("--poll-interval", type=float, default=0.02,
                    help="seconds between GET /health polls in moemesh's decode-phase round (default 0.02)")
    ap.add_argument("--wait-idle", type=float, default=120,
                    help="before each run, wait up to this many seconds for the CPUs to be <20%% busy (0: don't)")
    ap.add_argument("--max-others", type=float, default=0.1,
                    help="rerun (up to 3 tries) a run during which other processes used more than this share of "
                         "the CPUs (default 0.1)")
    ap.add_argument("--json", default=None, help="results file (default build/bench-parallel-<date>.json)")
    args = ap.parse_args()
    try:
        plist = [int(x) for x in args.parallel.split(",") if x.strip()]
    except ValueError:
        ap.error("--parallel must be comma-separated integers")
    if not plist or min(plist) < 1 or args.reps < 1 or args.threads < 1 or args.prompt_tokens < 1 or args.gen < 2:
        ap.error("--parallel, --reps, --threads, --prompt-tokens must be >= 1 and --gen >= 2")
    if not os.access(args.moemesh, os.X_OK):
        sys.exit(f"{args.moemesh} not found: cmake --build build -j2 --target moemesh")
    if args.threads >= (os.cpu_count() or 1):
        log(f"[bench] note: --threads {args.threads} on {os.cpu_count()} cores: the HTTP client, node's main thread "
            "and llama.cpp's spinning workers share the cores; expect noise")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.json or os.path.join(ROOT, "build", f"bench-parallel-{stamp}.json")
    binary = bvl.describe_binary(args.moemesh)

    path = bvl.model_path(args.keep_models, args.arch, args.type)
    bvl.make_model(args.moemesh, path, args.arch, args.type)
    info = bvl.inspect_model(args.moemesh, path)
    log(f"[bench] {os.path.basename(path)}: {info['params'] / 1e9:.3f} B params, {bvl.fmt_size(info['file_bytes'])}")
    prompts_all = [parallel_prompt(s, args.prompt_tokens, info["vocab"]) for s in range(max(plist))]

    runs = {p: {"moemesh": [], "llama_cpp": []} for p in plist}
    load_before = os.getloadavg()
    t_start = time.time()
    for rep in range(args.reps):
        for k, p in enumerate(plist):
            order = ["moemesh", "llama_cpp"] if (rep + k) % 2 == 0 else ["llama_cpp", "moemesh"]
            for eng in order:
                busy = wait_idle(args.wait_idle) if args.wait_idle > 0 else None
                if eng == "moemesh":
                    r = measured(lambda: run_moemesh(args, path, prompts_all[:p], args.gen), args.max_others, 3)
                    extra = f"mean batch {r['mean_batch']:.2f}, max_batch {r['max_batch']}"
                else:
                    r = measured(lambda: run_llama(args, path, p, args.prompt_tokens, args.gen), args.max_others, 3)
                    extra = f"decode-phase batched tokens {r['perf_decode_phase'].get('batched_tokens')}"
                extra += f", others {r['others_cpu']:.0%} of the CPUs"
                r["load1"] = os.getloadavg()[0]
                r["cpu_busy_before"] = busy
                runs[p][eng].append(r)
                dec = "-" if r["decode_tok_per_s"] is None else f"{r['decode_tok_per_s']:7.2f}"
                log(f"[bench] rep {rep + 1}/{args.reps} P={p} {eng:9s}: {r['tok_per_s']:7.2f} tok/s end to end, "
                    f"{dec} decode ({extra}; load {r['load1']:.1f})")
                if not r["batching_ok"]:
                    log(f"[bench] warning: {eng} did not batch P={p} sequences in this run")

    results = []
    for p in plist:
        m, l = runs[p]["moemesh"], runs[p]["llama_cpp"]
        results.append(dict(
            parallel=p,
            moemesh=dict(tok_per_s=summary([r["tok_per_s"] for r in m]),
                         decode_tok_per_s=summary([r["decode_tok_per_s"] for r in m]),
                         mean_batch=summary([r["mean_batch"] for r in m]), batching_ok=all(r["batching_ok"] for r in m)),
            llama_cpp=dict(tok_per_s=summary([r["tok_per_s"] for r in l]),
                           decode_tok_per_s=summary([r["decode_tok_per_s"] for r in l]),
                           batching_ok=all(r["batching_ok"] for r in l)),
            runs=runs[p]))
    if datetime.datetime.fromtimestamp(os.path.getmtime(args.moemesh)).isoformat() != binary["mtime"]:
        binary["rebuilt_during_run"] = True
        log(f"[bench] warning: {args.moemesh} was rebuilt during the run: moemesh numbers mix two builds")
    print_tables(results, args)
    for r in results:
        for eng in ("moemesh", "llama_cpp"):
            if not r[eng]["batching_ok"]:
                print(f"note: {eng} did not batch all P={r['parallel']} requests in some run (see the JSON)")
    doc = dict(date=stamp, command=" ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
               threads=args.threads, reps=args.reps, parallel=plist, prompt_tokens=args.prompt_tokens, gen=args.gen,
               kv_type="f16", arch=args.arch, type=args.type, model=path, info=info, nproc=os.cpu_count(),
               loadavg_before=load_before, loadavg_after=os.getloadavg(), elapsed_s=time.time() - t_start,
               moemesh_binary=binary, results=results)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"results: {json_path}")


if __name__ == "__main__":
    main()
