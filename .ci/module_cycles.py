#!/usr/bin/env python3
"""Prints the largest import cycle among the library's files and fails when it exceeds a bound.

An edge goes from a file to the file that *defines* an item it names through a `crate::…` path
(in `use` declarations, with nested braces, and inline), a `super::…` path, or the macro's
`crate::__private::…` items. `mod` declarations and `pub use` re-exports do not count as edges:
a path through a re-export is followed to the file that defines the item. Test code
(`#[cfg(test)]` modules, `tests.rs` files) and `src/bin` are left out. The strongly connected
sets are Tarjan's; the largest must have at most `--max` files (default 2).

    python3 .ci/module_cycles.py [--max N] [--verbose]
"""

import argparse
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def strip_comments_and_strings(text):
    """Removes comments, string and char literals (keeps line structure)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    if text[i] == "\n":
                        out.append("\n")
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + len(m.group(0)))
            end = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]) or text.startswith("'\\u{", i):
            j = text.find("'", i + 1 if text[i + 1] != "\\" else i + 3)
            out.append("' '")
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def remove_test_modules(text):
    """Drops `#[cfg(test)] mod x { … }` blocks and `#[cfg(test)] mod x;` declarations."""
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*([;{])", text)
        if not m:
            return text
        if m.group(3) == ";":
            text = text[:m.start()] + text[m.end():]
            continue
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        text = text[:m.start()] + "\n" * text.count("\n", m.start(), i) + text[i:]


class Module:
    def __init__(self, path, file, text):
        self.path = path  # e.g. ("consensus", "network")
        self.file = file
        self.text = text
        self.children = {}  # name -> Module
        self.items = set()  # names defined here
        self.reexports = {}  # name -> absolute path (tuple) it re-exports
        self.globs = []  # absolute module paths glob re-exported (pub use x::*)


def module_file(dir_path, name):
    for candidate in (os.path.join(dir_path, name + ".rs"), os.path.join(dir_path, name, "mod.rs")):
        if os.path.exists(candidate):
            return candidate
    return None


ITEM = re.compile(
    r"^\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?(?:unsafe\s+|async\s+|const\s+(?=fn)|extern\s+\"[^\"]*\"\s+)*"
    r"(?:fn|struct|enum|trait|type|const|static|union|macro_rules!)\s+(\w+)",
    re.M,
)
MOD_DECL = re.compile(r"^\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", re.M)
INLINE_MOD = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*\{", re.M)
USE = re.compile(r"\b(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", re.S)


def load(path, file):
    with open(file, encoding="utf-8") as f:
        text = remove_test_modules(strip_comments_and_strings(f.read()))
    module = Module(path, file, text)
    module.items = set(ITEM.findall(text))
    # Inline modules (e.g. `pub mod __private { … }`, the guide's empty modules) belong to
    # this file: their items count as defined here, their names as children in this file.
    for m in INLINE_MOD.finditer(text):
        module.items.add(m.group(1))
    base = os.path.dirname(file)
    if not (file.endswith("mod.rs") or file.endswith("lib.rs")):
        base = os.path.join(base, os.path.splitext(os.path.basename(file))[0])
    for name in MOD_DECL.findall(text):
        if name == "tests":
            continue
        child_file = module_file(base, name)
        if child_file and not child_file.endswith(os.sep + "tests.rs"):
            module.children[name] = load(path + (name,), child_file)
    return module


def expand_use_tree(tree):
    """`a::{b, c::{d, e as f}, self}` -> [("a","b"), ("a","c","d"), ("a","c","e"), ("a",)]."""
    tree = re.sub(r"\s+", "", tree)
    results = []

    def walk(prefix, s):
        parts = split_top(s)
        for part in parts:
            if not part:
                continue
            brace = part.find("{")
            if brace >= 0:
                head = part[:brace].rstrip(":")
                inner = part[brace + 1:part.rfind("}")]
                walk(prefix + tuple(x for x in head.split("::") if x), inner)
            else:
                part = part.split("as")[0] if re.search(r"\bas\b", part.replace("::", " ")) else part
                part = re.sub(r"as\w+$", "", part) if "as" in part and not part.endswith("::*") else part
                segs = tuple(x for x in part.split("::") if x)
                if segs == ("self",):
                    results.append(prefix)
                else:
                    results.append(prefix + segs)

    walk((), tree)
    return results


def split_top(s):
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def use_paths(text):
    """(is_pub, path tuple, alias) of every `use` in `text`."""
    found = []
    for m in USE.finditer(text):
        is_pub = bool(m.group(1))
        raw = re.sub(r"\s+", " ", m.group(2))
        for segs in expand_use_tree_with_alias(raw):
            found.append((is_pub,) + segs)
    return found


def expand_use_tree_with_alias(raw):
    out = []
    for path in expand_use_tree_alias(raw):
        out.append(path)
    return out


def expand_use_tree_alias(raw):
    """Like expand_use_tree but keeps `as` aliases: yields (path, alias)."""
    s = raw.strip()
    results = []

    def walk(prefix, s):
        for part in split_top(s):
            part = part.strip()
            if not part:
                continue
            brace = part.find("{")
            if brace >= 0:
                head = part[:brace].strip().rstrip(":").strip()
                inner = part[brace + 1:part.rfind("}")]
                walk(prefix + tuple(x.strip() for x in head.split("::") if x.strip()), inner)
            else:
                alias = None
                m = re.match(r"^(.*?)\s+as\s+(\w+)$", part)
                if m:
                    part, alias = m.group(1), m.group(2)
                segs = tuple(x.strip() for x in part.split("::") if x.strip())
                if segs == ("self",):
                    segs = ()
                    path = prefix
                else:
                    path = prefix + segs
                results.append((path, alias or (path[-1] if path else None)))

    walk((), s)
    return results


def build(root):
    modules = {}

    def index(module):
        modules[module.path] = module
        for child in module.children.values():
            index(child)

    index(root)
    return modules


def absolute(module, segs):
    """A use/inline path as an absolute tuple from the crate root, or None when external."""
    if not segs:
        return None
    if segs[0] == "crate":
        return tuple(segs[1:])
    if segs[0] == "super":
        base = list(module.path)
        i = 0
        while i < len(segs) and segs[i] == "super":
            # a file `a/b.rs` is module (a, b); `super` of it is (a,)
            base = base[:-1]
            i += 1
        return tuple(base) + tuple(segs[i:])
    if segs[0] == "self":
        return tuple(module.path) + tuple(segs[1:])
    # a path starting at a child module of this one (2018 uniform paths)
    if segs[0] in module.children:
        return tuple(module.path) + tuple(segs)
    return None


def resolve(modules, path, depth=0):
    """The file that defines the item at absolute `path` (following re-exports)."""
    if depth > 20 or not path:
        return None
    # longest module prefix
    for k in range(len(path), -1, -1):
        prefix = tuple(path[:k])
        if prefix in modules:
            module = modules[prefix]
            rest = path[k:]
            if not rest:
                return module.file
            name = rest[0]
            if name in module.reexports:
                return resolve(modules, module.reexports[name] + tuple(rest[1:]), depth + 1)
            if name in module.items:
                return module.file
            for glob in module.globs:
                target = resolve(modules, glob + tuple(rest), depth + 1)
                if target:
                    return target
            return module.file
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, default=2)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--layers", action="store_true",
                        help="also print the files by layer (0: uses no other file of the crate)")
    args = parser.parse_args()
    root = load((), os.path.join(SRC, "lib.rs"))
    modules = build(root)
    # Re-exports first (they are followed, not counted).
    for module in modules.values():
        for is_pub, path, alias in use_paths(module.text):
            if not is_pub or not path:
                continue
            target = absolute(module, path)
            if target is None:
                continue
            if path[-1] == "*":
                module.globs.append(target[:-1])
            elif alias:
                module.reexports[alias] = target
    edges = {m.file: set() for m in modules.values()}
    for module in modules.values():
        text = module.text
        # remove `pub use` re-export lines from edge scanning; keep private uses
        targets = []
        for is_pub, path, alias in use_paths(text):
            if is_pub or not path:
                continue
            target = absolute(module, path)
            if target is not None:
                targets.append(target[:-1] if target and target[-1] == "*" else target)
        body = USE.sub(" ", text)
        for m in re.finditer(r"\b((?:crate|super)(?:::\w+)+)", body):
            segs = tuple(m.group(1).split("::"))
            target = absolute(module, segs)
            if target is not None:
                targets.append(target)
        for target in targets:
            file = resolve(modules, target)
            if file and file != module.file:
                edges[module.file].add(file)
    rel = lambda f: os.path.relpath(f, os.path.join(SRC, ".."))
    components = tarjan(edges)
    components.sort(key=len, reverse=True)
    largest = components[0] if components else []
    print(f"module cycles: {len(edges)} files; largest strongly connected set has {len(largest)} file(s) (bound {args.max})")
    for component in components:
        if len(component) > 1:
            print("  cycle of", len(component), ":", ", ".join(sorted(rel(f) for f in component)))
            if args.verbose:
                for f in sorted(component):
                    inside = sorted(rel(t) for t in edges[f] if t in component)
                    print("     ", rel(f), "->", ", ".join(inside))
    if args.layers:
        component_of = {f: i for i, c in enumerate(components) for f in c}
        layer = {}

        def depth(i, seen=()):
            if i in layer:
                return layer[i]
            targets = {component_of[t] for f in components[i] for t in edges[f]} - {i}
            layer[i] = 1 + max((depth(t) for t in targets), default=-1)
            return layer[i]

        by_layer = {}
        for i, component in enumerate(components):
            by_layer.setdefault(depth(i), []).extend(rel(f) for f in component)
        for level in sorted(by_layer):
            print(f"  layer {level}: " + ", ".join(sorted(by_layer[level])))
    if len(largest) > args.max:
        print(f"module cycles: the largest cycle has {len(largest)} files, more than {args.max}: "
              "move the item that closes it (run with --verbose for the edges)", file=sys.stderr)
        return 1
    return 0


def tarjan(edges):
    index, low, on, stack, result = {}, {}, set(), [], []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            result.append(component)

    for v in list(edges):
        if v not in index:
            visit(v)
    return result


if __name__ == "__main__":
    sys.exit(main())
