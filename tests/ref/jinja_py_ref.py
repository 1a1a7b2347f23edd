#!/usr/bin/env python3
"""Reference chat-template rendering with Python's jinja2, set up as Hugging Face transformers'
apply_chat_template sets it up (transformers/utils/chat_template_utils.py, _compile_jinja_template):
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
extensions=[jinja2.ext.loopcontrols]), the tojson filter replaced by HF's own (json.dumps with
ensure_ascii=False and the indent / separators / sort_keys options), and the globals
raise_exception(msg) (raises TemplateError(msg)) and strftime_now(fmt) (datetime.now().strftime).
transformers also adds its AssistantTracker extension (the {% generation %} tag), left out here.

    python3 jinja_py_ref.py --cases <cases.json>

cases.json: [{"template": "<source>" | "template_file": "<path>", "context": {...}}, ...]
  Each case names its template either inline ("template") or by a file path ("template_file",
  relative paths are taken from the current directory). A template is compiled once however many
  cases use it. The context's keys become the template's variables, as transformers passes
  messages=..., tools=..., add_generation_prompt=... and the special tokens as keyword arguments.
stdout: one JSON array (ASCII, \\u escapes), one entry per case in order: {"ok": true, "text": "..."}
  or {"ok": false, "error": "..."} (a syntax error, an unreadable file, raise_exception(), or any
  other exception raised while rendering).
Only the standard library and jinja2 are used.
"""
import json
import sys
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers overrides jinja2's tojson, which escapes HTML characters and has fewer options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)


def make_env():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def describe(e):
    text = str(e)
    name = type(e).__name__
    return f"{name}: {text}" if text else name


def main(argv):
    if "--cases" not in argv or argv.index("--cases") + 1 >= len(argv):
        print("usage: python3 jinja_py_ref.py --cases <cases.json>", file=sys.stderr)
        return 2
    with open(argv[argv.index("--cases") + 1], encoding="utf-8") as f:
        cases = json.load(f)
    if not isinstance(cases, list):
        print("jinja_py_ref: the cases file must hold a JSON array", file=sys.stderr)
        return 2

    env = make_env()
    compiled = {}  # source -> ("ok", Template) | ("error", message)

    def compile_source(source):
        entry = compiled.get(source)
        if entry is None:
            try:
                entry = ("ok", env.from_string(source))
            except Exception as e:  # TemplateSyntaxError and anything else the parser raises
                entry = ("error", "parse: " + describe(e))
            compiled[source] = entry
        return entry

    results = []
    for c in cases:
        source = c.get("template") if isinstance(c, dict) else None
        if not isinstance(source, str):
            path = c.get("template_file") if isinstance(c, dict) else None
            if not isinstance(path, str):
                results.append({"ok": False, "error": "case has no template"})
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    source = f.read()
            except OSError as e:
                results.append({"ok": False, "error": f"read {path}: {e}"})
                continue
        kind, value = compile_source(source)
        if kind == "error":
            results.append({"ok": False, "error": value})
            continue
        context = c.get("context")
        if context is None:
            context = {}
        try:
            text = value.render(**context) if isinstance(context, dict) else value.render()
            text.encode("utf-8")  # lone surrogates cannot be compared byte for byte
            results.append({"ok": True, "text": text})
        except RecursionError:
            results.append({"ok": False, "error": "RecursionError"})
        except Exception as e:
            results.append({"ok": False, "error": describe(e)})
    sys.stdout.write(json.dumps(results, ensure_ascii=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
