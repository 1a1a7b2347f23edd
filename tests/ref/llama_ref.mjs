#!/usr/bin/env node
// llama.cpp reference harness (node-llama-cpp, prebuilt CPU build): next-token probabilities,
// greedy continuation, timings and llama.cpp's view of a GGUF file, as ONE JSON object on stdout.
// Everything else (llama.cpp logs, progress) goes to stderr. Any failure: message on stderr, exit 1.
//
//   node tests/ref/llama_ref.mjs probs --model F.gguf (--tokens 1,2,3 | --ids-file F) [--top 20] [-n 32]
//        [--threads N] [--with-logits] [--kv-type f32|f16] [--flash-attn on|off|auto] [--batch N] [--verbose]
//        [--normalizer full|llama]
//     → {"positions":[{"pos":0,"top":[[id,prob],...]},...],"greedy":[id,...],"n_vocab":V,"config":{...}}
//       top: the --top most likely next tokens after input position pos, probabilities from the FULL
//       softmax at temperature 1 over llama.cpp's raw logits (computed here in double precision);
//       with --with-logits each entry is [id, prob, logit]. greedy: -n tokens of greedy (argmax)
//       continuation after the whole input, chosen by llama.cpp's greedy sampler. The normaliser is
//       summed here over all logits when vocab × positions ≤ 4M (or --normalizer full), otherwise
//       it is node-llama-cpp's totalLogitWeight (float sum over the whole vocabulary, same softmax).
//   node tests/ref/llama_ref.mjs bench --model F.gguf [--threads N] [--prompt-tokens 128] [--gen 64] [--reps 3]
//        [--kv-type f16|f32] [--flash-attn auto|on|off] [--batch N]
//     → {"prompt_tokens_per_s":..,"decode_tokens_per_s":..,"prompt":{..},"decode":{..},"config":{..}}
//       medians over reps; llama.cpp's own perf counters (llama_perf_context) when it reports them,
//       wall-clock around the evaluation calls otherwise (both are in the output).
//   node tests/ref/llama_ref.mjs parallel --model F.gguf [--threads N] [--sequences P] [--prompt-tokens 32] [--gen 32]
//        [--kv-type f16|f32] [--flash-attn auto|on|off] [--batch N]
//     → {"wall_s":..,"tokens":P*G,"tok_per_s":..,"decode_wall_s":..,"decode_tok_per_s":..,"prompt_wall_s":..,..}
//       P sequences of ONE context (createContext({sequences: P})) generate concurrently: each gets its
//       own pseudo-random prompt of --prompt-tokens ids (parallelPrompt(s), seed 12345 + 7919 s), then
//       exactly --gen greedy tokens (EOS not checked), one controlledEvaluate per token per sequence,
//       in lockstep: every sequence's call of a step issued in the same tick, so that node-llama-cpp's
//       batching puts them in one llama_decode. One unmeasured warm-up round first (same prompts and
//       sequences, history cleared). wall_s / tok_per_s: from issuing the prompts to the last sequence's G-th
//       token, prompt processing INCLUDED (tokens = P*G generated tokens). decode_*: from all
//       prompts done (first token of every sequence known) to the end, P*(G-1) tokens.
//       perf: llama.cpp's counters over the decode phase (single-token llama_decode calls count as
//       "eval runs", batches of more than one token as "prompt eval tokens": with batching engaged
//       and P > 1 the decode phase is all "prompt eval"; llama.cpp prints 0 runs as 1).
//   node tests/ref/llama_ref.mjs grammar --model F.gguf (--tokens 1,2,3 | --ids-file F | --prompt-tokens 32)
//        [--grammar-file F.gbnf] [--gen 64] [--threads N] [--temp 0] [--seed S] [--top-k 40] [--top-p 0.95]
//        [--min-p 0.05] [--ignore-eos] [--warmup-gen 8] [--kv-type f16|f32] [--flash-attn auto|on|off] [--batch N]
//     → {"tokens":N,"decode_s":..,"text":"..","decode_evals":..,"decode_tok_per_s":..,"ended":"eos"|"limit",..}
//       Generation under a GBNF grammar (llama.cpp's own grammar sampler, through node-llama-cpp's
//       LlamaGrammar + LlamaGrammarEvaluationState and a sequence's evaluate(); without
//       --grammar-file the same code path runs unconstrained, the baseline). --temp 0 (default):
//       greedy (llama.cpp's greedy sampler); --temp T > 0: seeded sampling (--seed, default 0) with
//       the chain top-k, top-p, min-p, temperature. node-llama-cpp samples first and checks the one
//       token against the grammar; only when it is refused does it mask the whole vocabulary with
//       the grammar and sample again. Stops at an
//       end-of-generation token (which the grammar allows only where its text is complete; not
//       counted in tokens) or after --gen tokens; --ignore-eos (only without a grammar) feeds EOG
//       tokens back and goes on. Prompt: the ids given, or llama_ref's pseudo-random prompt
//       (bench's) of --prompt-tokens ids. One unmeasured warm-up first (the prompt and
//       --warmup-gen unconstrained tokens, then the history is cleared).
//       decode_s: from the first generated token (prompt evaluated and that token sampled) to the
//       end of the last evaluation: the --gen-th token, or the one that produced EOG.
//       decode_evals: evaluations (forward pass + sampling) in that window, tokens-1 when --gen
//       ended it, tokens when EOG did; decode_tok_per_s = decode_evals / decode_s. text: the
//       generated tokens detokenized (EOG not included); ids: the tokens. decode_page_faults:
//       this process's minor/major page faults in the window (the weights are mmapped).
//   node tests/ref/llama_ref.mjs info --model F.gguf
//     → {"n_vocab":..,"n_params":..,"size":..,"train_ctx":..,"n_embd":..,"architecture":..,...}
import fs from "node:fs";
import path from "node:path";
import process from "node:process";

// Nothing but the final JSON may reach stdout.
console.log = console.error;
console.info = console.error;

// stdout may be a pipe: wait until the JSON is flushed before anyone calls process.exit.
function emit(obj) {
    return new Promise((resolve, reject) =>
        process.stdout.write(JSON.stringify(obj) + "\n", (err) => (err ? reject(err) : resolve())));
}

function fail(msg) {
    process.stderr.write(`llama_ref: ${msg}\n`);
    process.exit(1);
}

function parseArgs(argv) {
    const cmd = argv[0];
    const flags = {};
    const booleans = new Set(["with-logits", "verbose", "ignore-eos"]);
    for (let i = 1; i < argv.length; i++) {
        const a = argv[i];
        if (!a.startsWith("-")) fail(`unexpected argument '${a}'`);
        const key = a.replace(/^--?/, "");
        if (booleans.has(key)) {
            flags[key] = true;
            continue;
        }
        if (i + 1 >= argv.length) fail(`flag ${a} needs a value`);
        flags[key] = argv[++i];
    }
    return { cmd, flags };
}

function intFlag(flags, name, def, { min = 0 } = {}) {
    if (flags[name] === undefined) return def;
    const v = Number(flags[name]);
    if (!Number.isInteger(v) || v < min) fail(`--${name} must be an integer >= ${min}, got '${flags[name]}'`);
    return v;
}

function parseIds(text, where) {
    const ids = text.split(/[\s,]+/).filter((s) => s.length > 0).map((s) => {
        const v = Number(s);
        if (!Number.isInteger(v) || v < 0) fail(`${where}: '${s}' is not a token id`);
        return v;
    });
    if (ids.length === 0) fail(`${where}: no token ids`);
    return ids;
}

function kvTypeOption(flags, def) {
    const t = (flags["kv-type"] ?? def).toUpperCase();
    if (!["F32", "F16", "BF16", "Q8_0"].includes(t)) fail(`--kv-type must be f32, f16, bf16 or q8_0, got '${flags["kv-type"]}'`);
    return t;
}

function flashAttnOption(flags, def) {
    const v = flags["flash-attn"] ?? def;
    if (v === "auto") return "auto";
    if (v === "on" || v === "true") return true;
    if (v === "off" || v === "false") return false;
    fail(`--flash-attn must be auto, on or off, got '${v}'`);
}

function median(xs) {
    const s = [...xs].sort((a, b) => a - b);
    const m = s.length >> 1;
    return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

// Loads node-llama-cpp with llama.cpp's log lines captured (stderr, and kept for perf parsing).
async function loadLlama(flags) {
    let getLlama, LlamaLogLevel;
    try {
        ({ getLlama, LlamaLogLevel } = await import("node-llama-cpp"));
    } catch (e) {
        fail(`cannot import node-llama-cpp (run npm ci in tests/ref): ${e.message}`);
    }
    const logLines = [];
    const verbose = !!flags.verbose;
    const llama = await getLlama({
        gpu: false,
        build: "never",
        usePrebuiltBinaries: true,
        progressLogs: false,
        maxThreads: 0,  // no cap: contexts use exactly the threads they ask for
        logLevel: LlamaLogLevel.debug,
        logger: (level, message) => {
            // Keep only what is parsed later (the CPU variant, perf counters); debug is needed for the former.
            if (/loaded CPU backend|eval time/.test(message)) logLines.push(message);
            if (verbose || level === LlamaLogLevel.error || level === LlamaLogLevel.fatal || level === LlamaLogLevel.warn)
                process.stderr.write(`[llama.cpp ${level}] ${message}${message.endsWith("\n") ? "" : "\n"}`);
        },
    });
    return { llama, logLines };
}

async function loadModel(llama, flags) {
    const modelPath = flags.model;
    if (!modelPath) fail("--model is required");
    if (!fs.existsSync(modelPath)) fail(`${modelPath}: no such file`);
    try {
        return await llama.loadModel({ modelPath: path.resolve(modelPath), gpuLayers: 0, useMmap: true });
    } catch (e) {
        fail(`llama.cpp could not load ${modelPath}: ${e.message}`);
    }
}

// llama.cpp's n_vocab is the length of tokenizer.ggml.tokens (node-llama-cpp exposes no getter);
// token_embd's second dimension is the fallback.
function vocabSize(model) {
    const toks = model.fileInfo.metadata?.tokenizer?.ggml?.tokens;
    if (Array.isArray(toks) && toks.length > 0) return toks.length;
    const embd = (model.fileInfo.fullTensorInfo ?? []).find((t) => t.name === "token_embd.weight");
    if (embd) return Number(embd.dimensions[1]);
    fail("cannot tell the vocabulary size");
}

// Which ggml CPU variant the prebuilt build picked for this CPU (haswell, skylakex, zen4, ...).
function cpuBackend(logLines) {
    for (const l of logLines) {
        const m = l.match(/loaded CPU backend from \S*libggml-cpu-([\w-]+)\.so/);
        if (m) return m[1];
    }
    return null;
}

function threadsOf(flags, llama) {
    return intFlag(flags, "threads", llama.cpuMathCores, { min: 1 });
}

async function makeContext(model, { contextSize, batchSize, threads, kvType, flashAttention, sequences }) {
    try {
        return await model.createContext({
            ...(sequences !== undefined ? { sequences } : {}),  // contextSize is per sequence
            contextSize,
            batchSize,
            threads: { ideal: threads, min: threads },
            flashAttention,
            experimentalKvCacheKeyType: kvType,
            experimentalKvCacheValueType: kvType,
            performanceTracking: true,
            ignoreMemorySafetyChecks: true,
            failedCreationRemedy: false,
        });
    } catch (e) {
        fail(`llama.cpp could not create a context (size ${contextSize}, kv ${kvType}): ${e.message}`);
    }
}

function contextConfig(ctx, threads) {
    return {
        threads,
        context_size: ctx.contextSize,
        batch_size: ctx.batchSize,
        kv_cache_type_k: ctx.kvCacheKeyType,
        kv_cache_type_v: ctx.kvCacheValueType,
        flash_attention: ctx.flashAttention,
    };
}

// Full softmax at temperature 1 over every logit (logits: Map token → logit), in double precision.
function softmaxTop(logits, top, withLogits) {
    let maxLogit = -Infinity;
    for (const v of logits.values()) if (v > maxLogit) maxLogit = v;
    let sum = 0;
    for (const v of logits.values()) sum += Math.exp(v - maxLogit);
    const entries = [...logits.entries()];
    entries.sort((a, b) => b[1] - a[1] || a[0] - b[0]);
    return entries.slice(0, top).map(([id, logit]) => {
        const p = Math.exp(logit - maxLogit) / sum;
        return withLogits ? [id, p, logit] : [id, p];
    });
}

// Token ids from --tokens "1,2,3" or --ids-file F; undefined when neither is given.
function idsFromFlags(flags) {
    if (flags.tokens !== undefined) return parseIds(flags.tokens, "--tokens");
    if (flags["ids-file"] === undefined) return undefined;
    let text;
    try {
        text = fs.readFileSync(flags["ids-file"], "utf8");
    } catch (e) {
        fail(`--ids-file: ${e.message}`);
    }
    return parseIds(text, flags["ids-file"]);
}

async function cmdProbs(flags) {
    const ids = idsFromFlags(flags);
    if (ids === undefined) fail("probs needs --tokens or --ids-file");
    const top = intFlag(flags, "top", 20, { min: 1 });
    const nGen = intFlag(flags, "n", 32, { min: 0 });
    const withLogits = !!flags["with-logits"];

    const { llama, logLines } = await loadLlama(flags);
    const model = await loadModel(llama, flags);
    const nVocab = vocabSize(model);
    for (const id of ids) if (id >= nVocab) fail(`token id ${id} is outside the vocabulary (${nVocab})`);
    const threads = threadsOf(flags, llama);
    const need = ids.length + nGen + 1;
    const ctx = await makeContext(model, {
        contextSize: Math.max(256, need),
        batchSize: intFlag(flags, "batch", Math.min(512, Math.max(256, need)), { min: 1 }),
        threads,
        kvType: kvTypeOption(flags, "f32"),
        flashAttention: flashAttnOption(flags, "off"),
    });
    const seq = ctx.getSequence();

    // Small jobs: every position returns all raw logits and the softmax is done here in double
    // precision. Large ones (a real vocabulary over many positions would be tens of millions of
    // Map entries): llama.cpp returns the top logits plus totalLogitWeight = Σ exp(logit - max)
    // over the whole vocabulary (float sum in node-llama-cpp's addon), still the full softmax.
    const fullLogits = flags["normalizer"] === "full" ||
        (flags["normalizer"] !== "llama" && nVocab * ids.length <= 4_000_000);
    const last = ids.length - 1;
    const input = ids.map((id, i) => [id, {
        generateNext: fullLogits
            ? { logits: true, token: i === last }
            : { logits: { filter: { includeTop: Math.min(top, nVocab) } }, totalLogitWeight: true, token: i === last },
    }]);
    const out = await seq.controlledEvaluate(input);
    const positions = [];
    for (let i = 0; i < ids.length; i++) {
        const logits = out[i]?.next?.logits;
        if (fullLogits) {
            if (!logits || logits.size !== nVocab)
                fail(`position ${i}: llama.cpp returned ${logits ? logits.size : 0} logits, expected ${nVocab}`);
            positions.push({ pos: i, top: softmaxTop(logits, top, withLogits) });
        } else {
            const weight = out[i]?.next?.totalLogitWeight;
            if (!logits || logits.size === 0 || !(weight > 0)) fail(`position ${i}: llama.cpp returned no logits`);
            const entries = [...logits.entries()].sort((a, b) => b[1] - a[1] || a[0] - b[0]);
            const maxLogit = entries[0][1];
            positions.push({
                pos: i,
                top: entries.slice(0, top).map(([id, l]) => {
                    const p = Math.exp(l - maxLogit) / weight;
                    return withLogits ? [id, p, l] : [id, p];
                }),
            });
        }
    }
    const greedy = [];
    let next = out[ids.length - 1].next.token;
    for (let g = 0; g < nGen; g++) {
        if (next == null) fail(`greedy step ${g}: llama.cpp returned no token`);
        greedy.push(next);
        if (g + 1 === nGen) break;
        const r = await seq.controlledEvaluate([[next, { generateNext: { token: true } }]]);
        next = r[0]?.next?.token;
    }
    const result = {
        positions,
        greedy,
        n_vocab: nVocab,
        config: { ...contextConfig(ctx, threads), normalizer: fullLogits ? "full_logits_double" : "llama_total_logit_weight",
                  cpu_backend: cpuBackend(logLines) },
    };
    await ctx.dispose();
    await model.dispose();
    await emit(result);
}

// llama_perf_context_print lines: "prompt eval time = X ms / N tokens", "eval time = X ms / N runs".
function parsePerf(lines) {
    const text = lines.join("");
    const grab = (re) => {
        const m = text.match(re);
        return m ? { ms: Number(m[1]), n: Number(m[2]) } : null;
    };
    return {
        prompt: grab(/prompt eval time\s*=\s*([\d.]+)\s*ms\s*\/\s*(\d+)\s*tokens/),
        decode: grab(/(?<!prompt )eval time\s*=\s*([\d.]+)\s*ms\s*\/\s*(\d+)\s*runs/),
    };
}

async function cmdBench(flags) {
    const promptTokens = intFlag(flags, "prompt-tokens", 128, { min: 1 });
    const nGen = intFlag(flags, "gen", 64, { min: 1 });
    const reps = intFlag(flags, "reps", 3, { min: 1 });
    const { llama, logLines } = await loadLlama(flags);
    const model = await loadModel(llama, flags);
    const backend = cpuBackend(logLines);
    const nVocab = vocabSize(model);
    const threads = threadsOf(flags, llama);
    const need = promptTokens + nGen + 1;
    const ctx = await makeContext(model, {
        contextSize: Math.max(256, need),
        batchSize: intFlag(flags, "batch", Math.max(1, Math.min(512, promptTokens)), { min: 1 }),
        threads,
        kvType: kvTypeOption(flags, "f16"),
        flashAttention: flashAttnOption(flags, "auto"),
    });

    // Deterministic pseudo-random prompt over the vocabulary.
    let state = 12345;
    const prompt = Array.from({ length: promptTokens }, () => {
        state = (state * 1103515245 + 12345) % 2147483648;
        return state % nVocab;
    });

    const rows = [];
    for (let rep = 0; rep <= reps; rep++) {  // rep 0 warms up and is not counted
        const seq = ctx.getSequence();
        await ctx.printTimings();  // resets llama.cpp's perf counters
        logLines.length = 0;
        const input = prompt.map((id, i) => (i === prompt.length - 1 ? [id, { generateNext: { token: true } }] : id));
        const t0 = process.hrtime.bigint();
        const out = await seq.controlledEvaluate(input);
        const t1 = process.hrtime.bigint();
        await ctx.printTimings();
        const perfPrompt = parsePerf(logLines).prompt;
        logLines.length = 0;

        let next = out[prompt.length - 1].next.token;
        const t2 = process.hrtime.bigint();
        for (let g = 0; g < nGen; g++) {
            const r = await seq.controlledEvaluate([[next, { generateNext: { token: true } }]]);
            next = r[0].next.token;
        }
        const t3 = process.hrtime.bigint();
        await ctx.printTimings();
        const perfDecode = parsePerf(logLines).decode;
        logLines.length = 0;
        seq.dispose();
        if (rep === 0) continue;
        rows.push({
            prompt_wall_s: Number(t1 - t0) / 1e9,
            decode_wall_s: Number(t3 - t2) / 1e9,
            prompt_perf: perfPrompt,
            decode_perf: perfDecode,
        });
    }
    const havePerf = rows.every((r) => r.prompt_perf && r.decode_perf && r.prompt_perf.n > 0 && r.decode_perf.n > 0);
    const promptWall = median(rows.map((r) => promptTokens / r.prompt_wall_s));
    const decodeWall = median(rows.map((r) => nGen / r.decode_wall_s));
    const promptPerf = havePerf ? median(rows.map((r) => (r.prompt_perf.n * 1000) / r.prompt_perf.ms)) : null;
    const decodePerf = havePerf ? median(rows.map((r) => (r.decode_perf.n * 1000) / r.decode_perf.ms)) : null;
    const result = {
        prompt_tokens_per_s: promptPerf ?? promptWall,
        decode_tokens_per_s: decodePerf ?? decodeWall,
        source: havePerf ? "llama_perf_context" : "wall_clock",
        prompt: { tokens: promptTokens, tokens_per_s_perf: promptPerf, tokens_per_s_wall: promptWall },
        decode: { tokens: nGen, tokens_per_s_perf: decodePerf, tokens_per_s_wall: decodeWall },
        reps,
        runs: rows,
        config: { ...contextConfig(ctx, threads), cpu_backend: backend },
    };
    await ctx.dispose();
    await model.dispose();
    await emit(result);
}

// parallel: sequence s's prompt (deterministic; bench/bench_parallel.py computes the same ids).
function parallelPrompt(s, promptTokens, nVocab) {
    let state = 12345 + 7919 * s;
    return Array.from({ length: promptTokens }, () => {
        state = (state * 1103515245 + 12345) % 2147483648;
        return state % nVocab;
    });
}

async function cmdParallel(flags) {
    const nSeq = intFlag(flags, "sequences", 4, { min: 1 });
    const promptTokens = intFlag(flags, "prompt-tokens", 32, { min: 1 });
    const nGen = intFlag(flags, "gen", 32, { min: 1 });
    const { llama, logLines } = await loadLlama(flags);
    const model = await loadModel(llama, flags);
    const backend = cpuBackend(logLines);
    const nVocab = vocabSize(model);
    const threads = threadsOf(flags, llama);
    const need = promptTokens + nGen + 1;
    const ctx = await makeContext(model, {
        contextSize: Math.max(256, need),
        batchSize: intFlag(flags, "batch", Math.max(1, Math.min(512, nSeq * promptTokens)), { min: 1 }),
        threads,
        kvType: kvTypeOption(flags, "f16"),
        flashAttention: flashAttnOption(flags, "auto"),
        sequences: nSeq,
    });
    const prompts = Array.from({ length: nSeq }, (_, s) => parallelPrompt(s, promptTokens, nVocab));

    // One round: every sequence's prompt, then G-1 further tokens, all sequences concurrently.
    // The same P sequences serve both rounds (a disposed sequence's id comes back asynchronously).
    const seqs = prompts.map(() => ctx.getSequence());
    async function round() {
        for (const seq of seqs) await seq.clearHistory();
        const t0 = process.hrtime.bigint();
        const first = await Promise.all(seqs.map((seq, s) => seq.controlledEvaluate(
            prompts[s].map((id, i) => (i === promptTokens - 1 ? [id, { generateNext: { token: true } }] : id)))
            .then((out) => out[promptTokens - 1].next.token)));
        const t1 = process.hrtime.bigint();
        await ctx.printTimings();  // resets llama.cpp's perf counters: what follows is the decode phase
        logLines.length = 0;
        // Lockstep: each step issues every sequence's call in the same tick, so that they share one
        // batch. (Free-running per-sequence loops do not: each sequence's result resolves on its
        // own and re-queues alone, and most steps ran one token at a time.)
        const generated = first.map((t) => [t]);
        for (let g = 1; g < nGen; g++) {
            const outs = await Promise.all(seqs.map((seq, s) =>
                seq.controlledEvaluate([[generated[s][g - 1], { generateNext: { token: true } }]])));
            outs.forEach((r, s) => {
                const next = r[0]?.next?.token;
                if (next == null) throw new Error(`sequence ${s}: llama.cpp returned no token`);
                generated[s].push(next);
            });
        }
        const t2 = process.hrtime.bigint();
        await ctx.printTimings();
        const perf = parsePerf(logLines);
        logLines.length = 0;
        return { t0, t1, t2, generated, perf };
    }

    await round();  // warm-up, not counted
    const { t0, t1, t2, generated, perf } = await round();
    for (const seq of seqs) seq.dispose();
    const wall = Number(t2 - t0) / 1e9, decodeWall = Number(t2 - t1) / 1e9;
    const tokens = generated.reduce((n, g) => n + g.length, 0);
    const result = {
        wall_s: wall,
        tokens,
        tok_per_s: tokens / wall,
        prompt_wall_s: Number(t1 - t0) / 1e9,
        decode_wall_s: decodeWall,
        decode_tokens: nSeq * (nGen - 1),
        decode_tok_per_s: nGen > 1 ? (nSeq * (nGen - 1)) / decodeWall : null,
        sequences: nSeq,
        prompt_tokens: promptTokens,
        gen: nGen,
        includes_prompt: true,
        perf_decode_phase: { batched_tokens: perf.prompt?.n ?? null, single_token_runs: perf.decode?.n ?? null },
        greedy_heads: generated.map((g) => g.slice(0, 8)),
        config: { ...contextConfig(ctx, threads), sequences: nSeq, cpu_backend: backend },
    };
    await ctx.dispose();
    await model.dispose();
    await emit(result);
}

// grammar: generation under a GBNF grammar (or none: the baseline), decode phase timed.
async function cmdGrammar(flags) {
    const nGen = intFlag(flags, "gen", 64, { min: 1 });
    const warmupGen = intFlag(flags, "warmup-gen", 8, { min: 0 });
    const temperature = flags.temp === undefined ? 0 : Number(flags.temp);
    if (!Number.isFinite(temperature) || temperature < 0) fail(`--temp must be a number >= 0, got '${flags.temp}'`);
    const seed = intFlag(flags, "seed", 0, { min: 0 });
    const topK = intFlag(flags, "top-k", 40, { min: 0 });
    const topP = flags["top-p"] === undefined ? 0.95 : Number(flags["top-p"]);
    const minP = flags["min-p"] === undefined ? 0.05 : Number(flags["min-p"]);
    if (!(topP > 0 && topP <= 1)) fail(`--top-p must be in (0, 1], got '${flags["top-p"]}'`);
    if (!(minP >= 0 && minP <= 1)) fail(`--min-p must be in [0, 1], got '${flags["min-p"]}'`);
    const ignoreEos = !!flags["ignore-eos"];
    let gbnf = null;
    if (flags["grammar-file"] !== undefined) {
        try {
            gbnf = fs.readFileSync(flags["grammar-file"], "utf8");
        } catch (e) {
            fail(`--grammar-file: ${e.message}`);
        }
        if (ignoreEos) fail("--ignore-eos applies only without --grammar-file (a grammar ends with EOG)");
    }

    const { llama, logLines } = await loadLlama(flags);
    const model = await loadModel(llama, flags);
    const backend = cpuBackend(logLines);
    const nVocab = vocabSize(model);
    let prompt = idsFromFlags(flags);
    if (prompt === undefined) {
        let state = 12345;  // bench's pseudo-random prompt
        prompt = Array.from({ length: intFlag(flags, "prompt-tokens", 32, { min: 1 }) }, () => {
            state = (state * 1103515245 + 12345) % 2147483648;
            return state % nVocab;
        });
    }
    for (const id of prompt) if (id >= nVocab) fail(`token id ${id} is outside the vocabulary (${nVocab})`);
    let grammar = null;
    if (gbnf !== null) {
        try {
            grammar = await llama.createGrammar({ grammar: gbnf });
        } catch (e) {
            fail(`llama.cpp refused the grammar in ${flags["grammar-file"]}: ${e.message}`);
        }
    }
    const { LlamaGrammarEvaluationState } = await import("node-llama-cpp");
    const threads = threadsOf(flags, llama);
    const need = prompt.length + Math.max(nGen, warmupGen) + 2;
    const ctx = await makeContext(model, {
        contextSize: Math.max(256, need),
        batchSize: intFlag(flags, "batch", Math.max(1, Math.min(512, prompt.length)), { min: 1 }),
        threads,
        kvType: kvTypeOption(flags, "f16"),
        flashAttention: flashAttnOption(flags, "auto"),
    });
    const seq = ctx.getSequence();
    const sampling = temperature > 0 ? { temperature, seed, topK, topP, minP } : { temperature: 0 };

    // Warm-up (not counted): the prompt and a few unconstrained tokens, then a clean history.
    if (warmupGen > 0) {
        let n = 0;
        const it = seq.evaluate(prompt, { ...sampling, yieldEogToken: true });
        for await (const _ of it) if (++n >= warmupGen) break;
        await seq.clearHistory();
    }

    // One generation. evaluate() decodes the prompt, samples, yields a token and, when asked for
    // the next one, decodes that token and samples again; the grammar state is accepted on every
    // sampled token inside node-llama-cpp's sampleToken (EOG excepted).
    const grammarState = grammar ? new LlamaGrammarEvaluationState({ model, grammar }) : undefined;
    const ids = [];
    let ended = "limit", tFirst = null, tEnd = null, faultsFirst = null, faultsEnd = null;
    const faults = () => { const u = process.resourceUsage(); return [u.minorPageFault, u.majorPageFault]; };
    const t0 = process.hrtime.bigint();
    const it = seq.evaluate(prompt, { ...sampling, grammarEvaluationState: grammarState, yieldEogToken: true });
    for await (const token of it) {
        const now = process.hrtime.bigint();
        if (tFirst === null) {
            tFirst = now;
            faultsFirst = faults();
        }
        tEnd = now;
        faultsEnd = faults();
        if (model.isEogToken(token) && !ignoreEos) {
            ended = "eos";
            break;
        }
        ids.push(token);
        if (ids.length >= nGen) break;
    }
    if (tFirst === null) fail("llama.cpp generated nothing");
    const decodeS = Number(tEnd - tFirst) / 1e9;
    // Evaluations between the first token and the end: one per token after the first, plus the
    // one that produced EOG when that ended the generation.
    const decodeEvals = ended === "eos" ? ids.length : ids.length - 1;
    const result = {
        tokens: ids.length,
        decode_s: decodeS,
        text: model.detokenize(ids),
        decode_evals: decodeEvals,
        decode_tok_per_s: decodeEvals > 0 && decodeS > 0 ? decodeEvals / decodeS : null,
        ended,
        prompt_tokens: prompt.length,
        prompt_s: Number(tFirst - t0) / 1e9,  // prompt evaluation + the first token's sampling
        // Page faults of this process in the decode window (the weights are mmapped: a first touch
        // of an expert's pages, even from the page cache, is a minor fault).
        decode_page_faults: { minor: faultsEnd[0] - faultsFirst[0], major: faultsEnd[1] - faultsFirst[1] },
        ids,
        grammar: gbnf !== null,
        sampling: temperature > 0 ? { kind: "seeded", temperature, seed, top_k: topK, top_p: topP, min_p: minP }
                                  : { kind: "greedy" },
        config: { ...contextConfig(ctx, threads), cpu_backend: backend, warmup_gen: warmupGen },
    };
    seq.dispose();
    await ctx.dispose();
    await model.dispose();
    await emit(result);
}

async function cmdInfo(flags) {
    const { llama, logLines } = await loadLlama(flags);
    const model = await loadModel(llama, flags);
    const result = {
        architecture: model.fileInfo.metadata?.general?.architecture ?? null,
        name: model.fileInfo.metadata?.general?.name ?? null,
        description: model.typeDescription,
        n_vocab: vocabSize(model),
        n_params: model._model?.getTotalParameters?.() ?? null,
        size: model.size,
        train_ctx: model.trainContextSize,
        n_embd: model.embeddingVectorSize,
        vocabulary_type: model.vocabularyType,
        bos: model.tokens.bos,
        eos: model.tokens.eos,
        n_tensors: model.fileInfo.totalTensorCount ?? model.fileInfo.fullTensorInfo?.length ?? null,
        default_kv_cache_type_k: model.defaultContextKvCacheKeyType,
        default_kv_cache_type_v: model.defaultContextKvCacheValueType,
        default_flash_attention: model.defaultContextFlashAttention,
        cpu_math_cores: llama.cpuMathCores,
        llama_cpp_release: llama.llamaCppRelease?.release ?? null,
        cpu_backend: cpuBackend(logLines),
    };
    await model.dispose();
    await emit(result);
}

const { cmd, flags } = parseArgs(process.argv.slice(2));
const commands = { probs: cmdProbs, bench: cmdBench, parallel: cmdParallel, grammar: cmdGrammar, info: cmdInfo };
if (!commands[cmd]) fail(`usage: llama_ref.mjs probs|bench|parallel|grammar|info --model F.gguf ... (got '${cmd ?? ""}')`);
try {
    await commands[cmd](flags);
    process.exit(0);
} catch (e) {
    fail(e?.stack ?? String(e));
}
