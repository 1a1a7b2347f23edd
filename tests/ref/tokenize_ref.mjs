// Reference tokenization with llama.cpp (node-llama-cpp, prebuilt CPU build).
//   node tokenize_ref.mjs <model.gguf> <in.json> <out.json>
// in.json:  {"strings": ["...", ...]}
// out.json: {"plain": [[ids], ...], "special": [[ids], ...], "detok_special": ["...", ...],
//            "eos": id, "bos": id, "eot": id}
// "plain" is llama_tokenize(text, add_special=false, parse_special=false), "special" the same
// with parse_special=true; "detok_special" detokenizes "special" with special tokens rendered.
// Strings travel in files, never on the command line, since they may contain anything.
import { readFileSync, writeFileSync } from "node:fs";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const [modelPath, inPath, outPath] = process.argv.slice(2);
if (!modelPath || !inPath || !outPath) {
    console.error("usage: node tokenize_ref.mjs <model.gguf> <in.json> <out.json>");
    process.exit(2);
}
const input = JSON.parse(readFileSync(inPath, "utf8"));
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath, vocabOnly: true });

const plain = [];
const special = [];
const detokSpecial = [];
for (const s of input.strings) {
    plain.push(model.tokenize(s, false));
    const ids = model.tokenize(s, true);
    special.push(ids);
    detokSpecial.push(model.detokenize(ids, true));
}
writeFileSync(outPath, JSON.stringify({
    plain,
    special,
    detok_special: detokSpecial,
    eos: model.tokens.eos ?? -1,
    bos: model.tokens.bos ?? -1,
    eot: model.tokens.eot ?? -1,
}));
await model.dispose();
await llama.dispose();
