"""A minimal Go `text/template` renderer: just enough to render Ollama chat templates in Python.

Why hand-written: Ollama builds prompts with Go templates, and there is no Go runtime here nor a
Python package that renders them. Template parity (ollama#6823) needs the exact string Ollama
would feed the model, so this implements the subset the ChatML templates use: text with `{{-`/`-}}`
trimming, `{{ .Field }}` / `$.Field` / `$var` lookups, `if`/`else if`/`else`, `range` (with
`$i, $x :=`), `$var :=`, parenthesised calls and the functions eq, ne, and, or, not, len, slice.
Anything else raises `TemplateError` instead of rendering something subtly different.
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+')


class TemplateError(ValueError):
    pass


def render(template: str, data: dict) -> str:
    nodes, rest = _parse(_lex(template), stop=())
    if rest:
        raise TemplateError(f"unexpected {{{{{rest[0][1]}}}}}")
    out: list[str] = []
    _exec(nodes, data, data, {"$": data}, out)
    return "".join(out)


def _lex(src: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)] with Go's whitespace trimming already applied."""
    items: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        items.append(("text", text))
        body = m.group(2).strip()
        if not body.startswith("/*"):  # comments render nothing
            items.append(("action", body))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = src[pos:]
    items.append(("text", tail.lstrip() if trim_next else tail))
    return items


def _parse(items, stop):
    """Nodes until an action whose keyword is in `stop`; returns (nodes, remaining items)."""
    nodes: list = []
    while items:
        kind, body = items[0]
        items = items[1:]
        if kind == "text":
            nodes.append(("text", body))
            continue
        word = body.split(None, 1)[0]
        if word in stop or (word == "else" and "else" in stop):
            return nodes, [(kind, body)] + items
        if word == "if":
            branches, else_body = [], []
            cond = body[2:].strip()
            while True:
                block, items = _parse(items, stop=("else", "end"))
                branches.append((cond, block))
                closing = items[0][1]
                items = items[1:]
                if closing == "end":
                    break
                if closing.startswith("else if "):
                    cond = closing[len("else if "):].strip()
                    continue
                else_body, items = _parse(items, stop=("end",))
                items = items[1:]
                break
            nodes.append(("if", branches, else_body))
        elif word == "range":
            spec = body[len("range"):].strip()
            names, expr = [], spec
            if ":=" in spec:
                lhs, expr = spec.split(":=", 1)
                names = [n.strip() for n in lhs.split(",")]
            block, items = _parse(items, stop=("end",))
            if not items:
                raise TemplateError("range without end")
            items = items[1:]
            nodes.append(("range", names, expr.strip(), block))
        elif re.match(r"^\$\w*\s*:?=", body):
            name, expr = re.split(r"\s*:?=\s*", body, maxsplit=1)
            nodes.append(("set", name, expr))
        elif word in ("end", "else", "with", "define", "template", "block"):
            raise TemplateError(f"unsupported or unbalanced action {{{{{body}}}}}")
        else:
            nodes.append(("out", body))
    return nodes, []


def _exec(nodes, dot, root, scope: dict, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            value = _eval(node[1], dot, scope)
            out.append("" if value is None else str(value))
        elif kind == "set":
            scope[node[1]] = _eval(node[2], dot, scope)
        elif kind == "if":
            for cond, block in node[1]:
                if _truthy(_eval(cond, dot, scope)):
                    _exec(block, dot, root, dict(scope), out)
                    break
            else:
                _exec(node[2], dot, root, dict(scope), out)
        elif kind == "range":
            _, names, expr, block = node
            for i, item in enumerate(_eval(expr, dot, scope) or []):
                inner = dict(scope)
                if len(names) == 2:
                    inner[names[0]], inner[names[1]] = i, item
                elif names:
                    inner[names[0]] = item
                _exec(block, item, root, inner, out)


_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truthy(a),
    "len": len,
    "slice": lambda seq, start=0, stop=None: seq[start:stop],  # Go: slice x 1 == x[1:]
}


def _eval(expr: str, dot, scope: dict):
    tokens = _TOKEN.findall(expr)
    value, rest = _eval_command(tokens, dot, scope)
    if rest:
        raise TemplateError(f"cannot evaluate {expr!r} (pipes are not supported)")
    return value


def _eval_command(tokens, dot, scope):
    """A call `fn arg...` or a single operand, up to a closing parenthesis."""
    head = tokens[0]
    if head in _FUNCS or head in ("and", "or"):
        args, tokens = [], tokens[1:]
        while tokens and tokens[0] != ")":
            arg, tokens = _eval_operand(tokens, dot, scope)
            args.append(arg)
        if head == "and":
            return next((a for a in args if not _truthy(a)), args[-1]), tokens
        if head == "or":
            return next((a for a in args if _truthy(a)), args[-1]), tokens
        return _FUNCS[head](*args), tokens
    return _eval_operand(tokens, dot, scope)


def _eval_operand(tokens, dot, scope):
    tok, rest = tokens[0], tokens[1:]
    if tok == "(":
        value, rest = _eval_command(rest, dot, scope)
        if not rest or rest[0] != ")":
            raise TemplateError("unbalanced parenthesis")
        return value, rest[1:]
    if tok.startswith('"'):
        return bytes(tok[1:-1], "utf-8").decode("unicode_escape"), rest
    if re.fullmatch(r"-?\d+", tok):
        return int(tok), rest
    if tok in ("true", "false"):
        return tok == "true", rest
    if tok.startswith("$"):
        var, _, path = tok.partition(".")
        if var not in scope:
            raise TemplateError(f"undefined variable {var}")
        return _field(scope[var], path), rest
    if tok.startswith("."):
        return _field(dot, tok[1:]), rest
    raise TemplateError(f"unsupported token {tok!r}")


def _field(value: Any, path: str):
    for name in filter(None, path.split(".")):
        value = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
    return value


def _truthy(v) -> bool:
    return bool(v)  # Go: false, 0, nil and empty strings / slices / maps are false, as in Python
