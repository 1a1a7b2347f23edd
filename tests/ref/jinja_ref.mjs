// Reference chat-template rendering with @huggingface/jinja (the Jinja interpreter that
// node-llama-cpp and transformers.js use for chat templates; its Template applies trim_blocks and
// lstrip_blocks as transformers' apply_chat_template does).
//   node jinja_ref.mjs --cases <cases.json>
// cases.json: [{"template": "<source>" | "template_file": "<path>", "context": {...}}, ...]
//   Each case names its template either inline ("template") or by a file path ("template_file",
//   relative paths are taken from the current directory). A template is parsed once however many
//   cases use it, so one process renders a whole template × conversation grid.
// stdout: one JSON array, one entry per case in order: {"ok": true, "text": "..."} or
//   {"ok": false, "error": "..."} (a parse error, an unreadable file, raise_exception(), or any
//   other runtime error).
// Globals besides the context's keys are the library's own (a context may not redefine them):
// raise_exception(msg) throws Error(msg) as transformers' does, range(), strftime_now(fmt) (the
// current local time; %Y %m %d %b %B %H %M %%), and true/false/none/True/False/None.
// Object key order is the order in the JSON file (JavaScript keeps string-key insertion order,
// except that integer-like keys such as "1" come first: avoid those in contexts).
import { readFileSync } from "node:fs";
import { Template } from "@huggingface/jinja";

const args = process.argv.slice(2);
const at = args.indexOf("--cases");
if (at < 0 || !args[at + 1]) {
    console.error("usage: node jinja_ref.mjs --cases <cases.json>");
    process.exit(2);
}
const cases = JSON.parse(readFileSync(args[at + 1], "utf8"));
if (!Array.isArray(cases)) {
    console.error("jinja_ref: the cases file must hold a JSON array");
    process.exit(2);
}

const message = (e) => (e instanceof Error ? e.message : String(e));
const parsed = new Map(); // source -> {template} | {error}
function compile(source) {
    let entry = parsed.get(source);
    if (!entry) {
        try {
            entry = { template: new Template(source) };
        } catch (e) {
            entry = { error: `parse: ${message(e)}` };
        }
        parsed.set(source, entry);
    }
    return entry;
}

const results = cases.map((c) => {
    let source = c.template;
    if (typeof source !== "string") {
        if (typeof c.template_file !== "string") return { ok: false, error: "case has no template" };
        try {
            source = readFileSync(c.template_file, "utf8");
        } catch (e) {
            return { ok: false, error: `read ${c.template_file}: ${message(e)}` };
        }
    }
    const entry = compile(source);
    if (entry.error) return { ok: false, error: entry.error };
    try {
        return { ok: true, text: entry.template.render(c.context ?? {}) };
    } catch (e) {
        return { ok: false, error: message(e) };
    }
});
process.stdout.write(JSON.stringify(results));
