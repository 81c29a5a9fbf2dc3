"""What a compiled XLA program runs: kernels, matrix products, copies, read from ``compiled.as_text()``.

    text = jax.jit(f).lower(*args).compile().as_text()
    stats = hlostats.summarize(text)          # the innermost while loop's body if there is one, else ENTRY
    stats["kernels"], stats["copies"]["bytes"]

Only computations that run as a sequence of kernels are counted: ENTRY and what it reaches through while
loops, conditionals and calls. A fusion is one kernel, whatever its body; its kind says what it is
(``kLoop`` elementwise, ``kInput`` a reduction, ``kCustom`` a matrix product emitted by Triton or a
library, ``kOutput`` a product with an epilogue). A decode loop's body is one step of it, so the counts
of ``scope="step"`` are per generated token.

Categories (each with a count and the bytes of its outputs):

* ``gemms``: matrix products: library calls (custom-calls whose target names cuBLAS/cuBLASLt), Triton
  and library fusions (``kCustom``/``kOutput`` fusions, CPU library fusions), unfused ``dot`` ops.
* ``dots_as_reductions``: ``kInput`` fusions made from a ``dot_general`` (a matrix-vector product that
  XLA rewrote into multiply + reduce: its metadata still names the dot).
* ``copies``, ``concatenates``, ``dynamic_update_slices``, ``slices``, ``transposes``: ops of that name,
  or fusions named after one (XLA names a fusion after its root: ``loop_concatenate_fusion``).
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["computations", "markdown_rows", "shape_bytes", "summarize"]

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) (\(.*\)) -> .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4}
_BYTES.update({"s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16})
# Ops that launch nothing (bookkeeping, control flow: their bodies are counted themselves).
_FREE = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "conditional",
    "call",
    "after-all",
    "opt-barrier",
    "partition-id",
    "replica-id",
    "add-dependency",
}
_NAMED = {
    "copies": ("copy",),
    "concatenates": ("concatenate",),
    "dynamic_update_slices": ("dynamic-update-slice", "dynamic_update_slice"),
    "slices": ("slice",),
    "transposes": ("transpose",),
}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string ("f32[2,64]{1,0}", or a tuple of them: their sum)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _BYTES:
            total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _split_shape(rest: str) -> tuple[str, str]:
    """'f32[2]{0} add(%a, %b), ...' → ('f32[2]{0}', 'add(%a, %b), ...'); tuple shapes keep their parens."""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


def computations(text: str) -> tuple[dict[str, list[dict[str, Any]]], str | None]:
    """({computation name: its instructions}, the ENTRY's name) of an HLO module's text.

    Each instruction is {name, shape, opcode, line}.
    """
    comps: dict[str, list[dict[str, Any]]] = {}
    entry, current = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.startswith("}"):
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        shape, tail = _split_shape(match.group(2))
        opcode = tail.split("(", 1)[0].strip()
        comps[current].append(dict(name=match.group(1), shape=shape, opcode=opcode, line=line))
    return comps, entry


def _callees(instruction: dict[str, Any]) -> list[str]:
    """Computations an instruction runs as kernels of their own (not fusion bodies or reducers)."""
    line, opcode = instruction["line"], instruction["opcode"]
    names = re.findall(r"(?:body|condition|true_computation|false_computation)=%?([\w.\-]+)", line)
    branches = re.search(r"branch_computations=\{([^}]*)\}", line)
    if branches:
        names += [n.strip().lstrip("%") for n in branches.group(1).split(",")]
    if opcode == "call":
        names += re.findall(r"to_apply=%?([\w.\-]+)", line) + re.findall(r"calls=%?([\w.\-]+)", line)
    return names


def _scope(comps, entry: str, scope: str) -> list[str]:
    """The computations counted: "program" = ENTRY and all it reaches; "step" = the body of the outermost
    while loop and all it reaches (the program itself if it has no loop). A loop nested in the step (a
    layer loop not unrolled) has its body counted once, though it runs once per iteration."""
    reached, order, bodies = set(), [], []

    def visit(name: str, depth: int):
        if name in reached or name not in comps:
            return
        reached.add(name)
        order.append(name)
        for instruction in comps[name]:
            if instruction["opcode"] == "while":
                body = re.search(r"body=%?([\w.\-]+)", instruction["line"])
                if body:
                    bodies.append((depth + 1, body.group(1)))
            for callee in _callees(instruction):
                visit(callee, depth + 1 if instruction["opcode"] == "while" else depth)

    visit(entry, 0)
    if scope == "program" or not bodies:
        return order
    _, body = min(bodies)
    reached.clear()
    order.clear()
    visit(body, 0)
    return order


def summarize(text: str, scope: str = "step") -> dict[str, Any]:
    """Counts of what runs in a compiled program's text (see the module doc); ``scope`` "step" or
    "program"."""
    comps, entry = computations(text)
    if entry is None:
        raise ValueError("summarize: no ENTRY computation in the text; pass compiled.as_text().")
    counted = _scope(comps, entry, scope)
    stats: dict[str, Any] = dict(scope=scope, computations=len(counted), kernels=0, fusion_kinds={})
    stats["nested_loops"] = sum(i["opcode"] == "while" for name in counted for i in comps[name])
    for key in ("gemms", "dots_as_reductions", *_NAMED):
        stats[key] = dict(count=0, bytes=0)
    stats["gemm_targets"] = {}
    stats["largest"] = []  # (bytes, name) of the largest copies / concatenates / updates

    def add(key, instruction):
        size = shape_bytes(instruction["shape"])
        stats[key]["count"] += 1
        stats[key]["bytes"] += size
        if key in ("copies", "concatenates", "dynamic_update_slices", "transposes"):
            stats["largest"].append((size, instruction["name"]))

    for name in counted:
        for instruction in comps[name]:
            opcode, line, iname = instruction["opcode"], instruction["line"], instruction["name"]
            if opcode in _FREE:
                continue
            stats["kernels"] += 1
            kind = None
            if opcode == "fusion":
                kind = (re.search(r"kind=(k\w+)", line) or [None, "?"])[1]
                stats["fusion_kinds"][kind] = stats["fusion_kinds"].get(kind, 0) + 1
            if opcode == "custom-call":
                target = (re.search(r'custom_call_target="([^"]+)"', line) or [None, "?"])[1]
                if re.search(r"cublas|matmul|gemm", target, re.IGNORECASE):
                    add("gemms", instruction)
                    stats["gemm_targets"][target] = stats["gemm_targets"].get(target, 0) + 1
                continue
            is_dot = "dot_general" in line or opcode == "dot"
            if opcode == "dot" or kind in ("kCustom", "kOutput"):
                add("gemms", instruction)
                label = "dot" if opcode == "dot" else _custom_kind(line, kind)
                stats["gemm_targets"][label] = stats["gemm_targets"].get(label, 0) + 1
                continue
            if kind == "kInput" and is_dot:
                add("dots_as_reductions", instruction)
            for key, words in _NAMED.items():
                if opcode in words or (opcode == "fusion" and any(w in iname for w in words)):
                    add(key, instruction)
                    break
    stats["largest"] = [dict(bytes=b, name=n) for b, n in sorted(stats["largest"], reverse=True)[:5]]
    return stats


def _custom_kind(line: str, kind: str) -> str:
    match = re.search(r'"kind":"([^"]+)"', line)
    return match.group(1) if match else kind


def markdown_rows(name: str, stats: dict[str, Any]) -> list[str]:
    """Cells of one row of the table of ``COLUMNS`` for a program's summary."""

    def counted(key):
        entry = stats[key]
        return f"{entry['count']} ({entry['bytes'] / 2**20:.3g} MiB)" if entry["count"] else "0"

    kinds = ", ".join(f"{k} {n}" for k, n in sorted(stats["fusion_kinds"].items())) or "–"
    return [
        name,
        str(stats["kernels"]),
        kinds,
        counted("gemms"),
        counted("dots_as_reductions"),
        counted("copies"),
        counted("concatenates"),
        counted("dynamic_update_slices"),
        counted("slices"),
        counted("transposes"),
        str(stats["nested_loops"]),
    ]


COLUMNS = [
    "program",
    "kernels",
    "fusions by kind",
    "matrix products",
    "dots as reductions",
    "copies",
    "concatenates",
    "dynamic-update-slices",
    "slices",
    "transposes",
    "nested loops",
]
