#!/usr/bin/env python3
"""Interop check for `ftconv ollama`: the Modelfile's TEMPLATE, executed as Ollama executes a Messages-mode
template (by Go's text/template through ollama_render.go, or by ftconv's embedded renderer), must give the
same text as transformers' apply_chat_template(..., add_generation_prompt=True) on canned conversations.

  ollama_check.py make DIR TEMPLATE_FILE BOS EOS      # an HF-style folder carrying a chat template
  ollama_check.py check --model DIR --modelfile FILE --ftconv BIN [--go BIN]

Conversations the chat template refuses (raise_exception) are skipped, as decisions.md says. Tools
conversations are compared only when the TEMPLATE has a .Tools section, with every embedded JSON value
compared by content (Ollama's `json` cannot reproduce `tojson(indent=...)`). A leading BOS the chat template
writes is dropped (the runtime adds it). Prints one line per conversation; exits 1 on any difference.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

SYS = {"role": "system", "content": "You are a pirate. Answer in one sentence."}
U1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "Arr, it be Paris, matey."}
U2 = {"role": "user", "content": 'And of "Germany"? Say it in <b>bold</b> & {braces}.'}
TU = {"role": "user", "content": "What's the weather like in Paris today?"}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
CONVERSATIONS = [
    ("user", [U1], None),
    ("system+user", [SYS, U1], None),
    ("user/assistant/user", [U1, A1, U2], None),
    ("system+user/assistant/user", [SYS, U1, A1, U2], None),
    ("tools: user", [TU], [TOOL]),
    ("tools: system+user", [SYS, TU], [TOOL]),
]


def make(args):
    os.makedirs(args.dir, exist_ok=True)
    with open(args.template, encoding="utf-8") as f:
        tpl = f.read()
    with open(os.path.join(args.dir, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, f)
    tc = {"bos_token": args.bos or None, "eos_token": args.eos, "chat_template": tpl}
    with open(os.path.join(args.dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tc, f, ensure_ascii=False, indent=2)


def read_modelfile(path):
    """TEMPLATE and SYSTEM bodies of a Modelfile ftconv wrote (\"\"\"-quoted, as its emitter rule says)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out = {}
    for kw in ("TEMPLATE", "SYSTEM"):
        start = text.find("\n" + kw + ' """')
        if start < 0:
            continue
        body_start = start + len(kw) + 5
        end = text.find('"""\n', body_start)
        out[kw] = text[body_start:end]
    return out


def canonical(s):
    """Every JSON object / non-empty array embedded in s, in a canonical form."""
    dec = json.JSONDecoder()
    out, i = [], 0
    while i < len(s):
        if s[i] in "{[":
            try:
                v, end = dec.raw_decode(s, i)
                if isinstance(v, dict) or (isinstance(v, list) and v):
                    out.append(json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False))
                    i = end
                    continue
            except ValueError:
                pass
        out.append(s[i])
        i += 1
    return "".join(out)


def hf_renderer(model_dir):
    """apply_chat_template through AutoTokenizer when the folder has a tokenizer; else the function it calls
    (render_jinja_template) with the special tokens of tokenizer_config.json."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        template = tok.chat_template
        bos = tok.bos_token

        def render(messages, tools):
            return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)

        return render, template, bos, "AutoTokenizer.apply_chat_template"
    except Exception:
        pass
    from transformers.utils.chat_template_utils import render_jinja_template

    with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        tc = json.load(f)
    template = tc["chat_template"]
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    special = {k: tc[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if tc.get(k) is not None}

    def render(messages, tools):
        out, _ = render_jinja_template(
            conversations=[messages], tools=tools, chat_template=template, add_generation_prompt=True, **special
        )
        return out[0]

    return render, template, special.get("bos_token"), "render_jinja_template (apply_chat_template's renderer)"


def check(args):
    import datetime

    mf = read_modelfile(args.modelfile)
    if "TEMPLATE" not in mf:
        print(f"FAIL no TEMPLATE in {args.modelfile}")
        return 1
    render, jinja, bos, how = hf_renderer(args.model)
    print(f"reference: transformers {how}; Ollama side: {'Go text/template' if args.go else 'ftconv embedded renderer'}")
    tmp = tempfile.mkdtemp()
    tpath = os.path.join(tmp, "template")
    with open(tpath, "w", encoding="utf-8") as f:
        f.write(mf["TEMPLATE"])
    spath = "-"
    if "SYSTEM" in mf:
        spath = os.path.join(tmp, "system")
        with open(spath, "w", encoding="utf-8") as f:
            f.write(mf["SYSTEM"])
    has_tools = ".Tools" in mf["TEMPLATE"]
    failures = 0
    for name, messages, tools in CONVERSATIONS:
        if tools and not has_tools:
            continue
        try:
            expected = render(messages, tools)
        except Exception as e:  # the chat template refuses this conversation
            print(f"skip {name}: the chat template refuses it ({type(e).__name__}: {str(e)[:80]})")
            continue
        if bos and "bos_token" in jinja and expected.startswith(bos):
            expected = expected[len(bos):]
        if "currentDate" in mf["TEMPLATE"]:
            today = datetime.date.today()
            import re
            for fmt in set(re.findall(r"strftime_now\(\s*[\"']([^\"']*)[\"']\s*\)", jinja)) | {"%d %b %Y"}:
                expected = expected.replace(today.strftime(fmt), today.isoformat())
        cpath = os.path.join(tmp, "conv.json")
        with open(cpath, "w", encoding="utf-8") as f:
            json.dump({"messages": messages, "tools": tools or []}, f, ensure_ascii=False)
        if args.go:
            cmd = [args.go, tpath, spath, cpath]
        else:
            cmd = [args.ftconv, "ollama", "--render", args.modelfile, "--conversation", cpath]
        p = subprocess.run(cmd, capture_output=True)
        if p.returncode != 0:
            print(f"FAIL {name}: renderer failed: {p.stderr.decode(errors='replace').strip()}")
            failures += 1
            continue
        got = p.stdout.decode("utf-8")
        if args.go:
            # the embedded renderer must agree with Go byte for byte
            q = subprocess.run(
                [args.ftconv, "ollama", "--render", args.modelfile, "--conversation", cpath], capture_output=True
            )
            if q.stdout.decode("utf-8") != got:
                print(f"FAIL {name}: ftconv's embedded renderer differs from Go's text/template")
                print(f"    go:     {got!r}\n    ftconv: {q.stdout.decode('utf-8', errors='replace')!r}")
                failures += 1
                continue
        same = canonical(expected) == canonical(got) if tools else expected == got
        if same:
            print(f"ok {name}")
        else:
            failures += 1
            a, b = (canonical(expected), canonical(got)) if tools else (expected, got)
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"FAIL {name}: first difference at {n}")
            print(f"    transformers: {a[max(0, n - 30):n + 50]!r}\n    ollama:       {b[max(0, n - 30):n + 50]!r}")
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir")
    m.add_argument("template")
    m.add_argument("bos")
    m.add_argument("eos")
    c = sub.add_parser("check")
    c.add_argument("--model", required=True)
    c.add_argument("--modelfile", required=True)
    c.add_argument("--ftconv", required=True)
    c.add_argument("--go")
    args = ap.parse_args()
    if args.cmd == "make":
        make(args)
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
