"""What a compiled XLA program does, read from its HLO text: matmul FLOPs with loops counted, and collectives.

XLA's own `cost_analysis()` counts a `while` body once, so a `lax.scan` over 25 layers (or over micro-batches, or
over attention's key blocks) counts as one layer. Here the matmuls (`dot`, and `convolution`, which TPU programs use
for them) are summed over the call graph with each loop body times its trip count (read from the loop's condition)
and each `conditional` at its costliest branch: what the program would run if every branch did its work.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1,
    "s4": 1,
    "u4": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
}
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")


@dataclasses.dataclass
class Instruction:
  name: str
  type: str  # the result type text: `bf16[8,128]{1,0}` or a tuple `(s32[], f32[4])`
  op: str  # `dot`, `fusion`, `while`, ...
  operands: List[str]  # operand instruction names
  args: str  # the text between the op's parentheses (a constant's value)
  attributes: str  # everything after the operand list


def _arrays(type_text: str) -> List[Tuple[str, List[int]]]:
  return [
      (dtype, [int(d) for d in dims.split(",") if d])
      for dtype, dims in _ARRAY.findall(type_text)
      if dtype in _DTYPE_BYTES
  ]


def _closing(text: str, start: int) -> int:
  """Index just past the bracket that closes the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def _parse_instruction(line: str) -> Optional[Instruction]:
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  rest = line[match.end() :]
  if rest.startswith("("):
    end = _closing(rest, 0)
  else:
    end = rest.find(" ")
  type_text, rest = rest[:end], rest[end:].lstrip()
  paren = rest.find("(")
  if paren < 0:
    return None
  op = rest[:paren]
  close = _closing(rest, paren)
  operands = re.findall(r"%([\w.\-]+)", rest[paren:close])
  return Instruction(match.group(1), type_text, op, operands, rest[paren + 1 : close - 1], rest[close:])


def parse_module(hlo_text: str) -> Tuple[Dict[str, List[Instruction]], Optional[str]]:
  """({computation name: instructions}, name of the ENTRY computation)."""
  computations: Dict[str, List[Instruction]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      computations[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif line.rstrip() == "}":  # (a custom call's config may span lines, one of which starts with "}}")
      current = None
    elif current is not None:
      instruction = _parse_instruction(line)
      if instruction is not None:
        computations[current].append(instruction)
  return computations, entry


def _elements(type_text: str) -> int:
  arrays = _arrays(type_text)
  return int(np.prod(arrays[0][1])) if arrays else 0


class _FlopCounter:
  """Matmul FLOPs of computations as {key of the op's metadata op_name: FLOPs}, memoised; loops times their trip
  counts, conditionals at their costliest branch."""

  def __init__(self, computations: Dict[str, List[Instruction]], key: Callable[[str], str]):
    self.computations = computations
    self.key = key
    self.types = {i.name: i.type for body in computations.values() for i in body}
    self.by_name = {i.name: i for body in computations.values() for i in body}
    self.memo: Dict[str, Dict[str, float]] = {}
    self.unknown_trip_counts = 0

  def computation(self, name: str) -> Dict[str, float]:
    if name not in self.memo:
      self.memo[name] = {}  # a (malformed) cycle counts nothing rather than recursing forever
      total: Dict[str, float] = collections.defaultdict(float)
      for i in self.computations.get(name, []):
        for k, v in self.instruction(i).items():
          total[k] += v
      self.memo[name] = dict(total)
    return self.memo[name]

  def instruction(self, i: Instruction) -> Dict[str, float]:
    if i.op in ("dot", "convolution"):
      flops = self._dot(i) if i.op == "dot" else self._convolution(i)
      op_name = re.search(r'op_name="([^"]*)"', i.attributes)
      return {self.key(op_name.group(1) if op_name else ""): flops} if flops else {}
    if i.op == "while":
      body = re.search(r"body=%([\w.\-]+)", i.attributes)
      condition = re.search(r"condition=%([\w.\-]+)", i.attributes)
      trips = self._trip_count(i, condition.group(1) if condition else None, body.group(1) if body else None)
      return {k: trips * v for k, v in self.computation(body.group(1)).items()} if body else {}
    if i.op == "conditional":
      branches = re.findall(
          r"%([\w.\-]+)",
          " ".join(
              re.findall(
                  r"(?:branch_computations=\{[^}]*\}|true_computation=%[\w.\-]+|false_computation=%[\w.\-]+)",
                  i.attributes,
              )
          ),
      )
      costs = [self.computation(b) for b in branches]
      return max(costs, key=lambda c: sum(c.values()), default={})
    out: Dict[str, float] = collections.defaultdict(float)
    if i.op in ("fusion", "call") or i.op.endswith("-start"):
      for called in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", i.attributes):
        for k, v in self.computation(called).items():
          out[k] += v
    return dict(out)

  def _dot(self, i: Instruction) -> float:
    lhs = _arrays(self.types.get(i.operands[0], "")) if i.operands else []
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attributes)
    if not lhs or not contracting:
      return 0.0
    dims = lhs[0][1]
    k = int(np.prod([dims[int(d)] for d in contracting.group(1).split(",") if d]))
    return 2.0 * _elements(i.type) * k

  def _convolution(self, i: Instruction) -> float:
    """2 x output batch x output features x input features per group x the (output, window) position pairs that
    land on real input elements, per spatial dim (TPU programs write batched matmuls as convolutions whose batch
    dims are spatial dims with a dilated input: only one window position per output is real)."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", i.attributes)
    lhs = _arrays(self.types.get(i.operands[0], "")) if i.operands else []
    rhs = _arrays(self.types.get(i.operands[1], "")) if len(i.operands) > 1 else []
    out = _arrays(i.type)
    if not labels or not lhs or not rhs or not out:
      return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    lhs_dims, rhs_dims, out_dims = lhs[0][1], rhs[0][1], out[0][1]
    if (len(lhs_labels), len(rhs_labels), len(out_labels)) != (len(lhs_dims), len(rhs_dims), len(out_dims)):
      return 0.0
    window = _window(i.attributes)
    pairs = 1
    for d, label in enumerate(sorted(c for c in out_labels if c.isdigit())):
      n, o = lhs_dims[lhs_labels.index(label)], out_dims[out_labels.index(label)]
      k = rhs_dims[rhs_labels.index(label)]
      stride, (pad_lo, _), lhs_dilate, rhs_dilate = (
          w[d] if d < len(w) else default
          for w, default in (
              (window["stride"], 1),
              (window["pad"], (0, 0)),
              (window["lhs_dilate"], 1),
              (window["rhs_dilate"], 1),
          )
      )
      extent = (n - 1) * lhs_dilate + 1
      pairs *= sum(
          1
          for x in range(o)
          for y in range(k)
          if 0 <= x * stride + y * rhs_dilate - pad_lo < extent
          and (x * stride + y * rhs_dilate - pad_lo) % lhs_dilate == 0
      )
    b, f = out_dims[out_labels.index("b")], out_dims[out_labels.index("f")]
    return 2.0 * b * f * rhs_dims[rhs_labels.index("i")] * pairs

  def _trip_count(self, loop: Instruction, condition: Optional[str], body: Optional[str] = None) -> int:
    """ceil((N - start) / step) for a loop whose condition is `counter < N` (or N > counter), counter's start read
    from the init tuple and its step from the body (XLA's windowed einsums step by 2: two chunks an iteration);
    1 (and counted as unknown) otherwise."""
    for i in self.computations.get(condition or "", []):
      if i.op != "compare" or len(i.operands) != 2:
        continue
      direction = re.search(r"direction=(\w+)", i.attributes)
      a, b = (self.by_name.get(n) for n in i.operands)
      if direction is None or a is None or b is None:
        continue
      direction = direction.group(1)
      if a.op == "constant" and b.op != "constant":
        a, b, direction = b, a, dict(LT="GT", GT="LT", LE="GE", GE="LE").get(direction, direction)
      if b.op != "constant" or a.op != "get-tuple-element" or direction not in ("LT", "LE"):
        continue
      limit = _constant_value(b)
      index = re.search(r"index=(\d+)", a.attributes)
      start = self._init_value(loop, int(index.group(1))) if index else None
      if limit is None or start is None:
        break
      step = self._step(body, int(index.group(1)))
      return max(-(-(limit - start + (direction == "LE")) // step), 0)
    self.unknown_trip_counts += 1
    return 1

  def _step(self, body: Optional[str], index: int) -> int:
    """What the body adds to tuple element `index` each iteration when its ROOT tuple holds
    `add(get-tuple-element(index), constant)`; else 1 (jax's own loops count by one)."""
    instructions = self.computations.get(body or "", [])
    root = next((i for i in reversed(instructions) if i.op == "tuple"), None)
    update = self.by_name.get(root.operands[index]) if root is not None and index < len(root.operands) else None
    if update is None or update.op != "add" or len(update.operands) != 2:
      return 1
    a, b = (self.by_name.get(n) for n in update.operands)
    if a is not None and a.op == "constant":
      a, b = b, a
    if a is None or b is None or a.op != "get-tuple-element" or b.op != "constant":
      return 1
    if not re.search(rf"index={index}\b", a.attributes):
      return 1
    step = _constant_value(b)
    return step if step and step > 0 else 1

  def _init_value(self, loop: Instruction, index: int) -> Optional[int]:
    init = self.by_name.get(loop.operands[0]) if loop.operands else None
    if init is None or init.op != "tuple" or index >= len(init.operands):
      return None
    element = self.by_name.get(init.operands[index])
    for _ in range(16):  # the compiler copies loop inits, sometimes several times
      if element is None or element.op not in ("copy", "bitcast") or not element.operands:
        break
      element = self.by_name.get(element.operands[0])
    return _constant_value(element) if element is not None and element.op == "constant" else None


def _window(attributes: str) -> Dict[str, list]:
  """A convolution's `window={size=2x4 stride=1x3 pad=0_0x3_3 lhs_dilate=2x4}` as per-dim lists (missing: empty)."""
  match = re.search(r"window=\{([^}]*)\}", attributes)
  fields = dict(part.split("=", 1) for part in match.group(1).split() if "=" in part) if match else {}
  ints = lambda key: [int(v) for v in fields[key].split("x")] if key in fields else []
  pads = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields else []
  return dict(stride=ints("stride"), pad=pads, lhs_dilate=ints("lhs_dilate"), rhs_dilate=ints("rhs_dilate"))


def _constant_value(i: Instruction) -> Optional[int]:
  return int(i.args) if re.fullmatch(r"-?\d+", i.args.strip()) else None


def matmul_flops_by(hlo_text: str, key: Callable[[str], str]) -> Tuple[Dict[str, float], int]:
  """({key(op_name): matmul FLOPs} of the ENTRY computation, loops whose trip count could not be read and were
  counted once). `op_name` is the jax name stack of the op (`jit(step)/jvp(BLT)/global_transformer/...`)."""
  computations, entry = parse_module(hlo_text)
  if entry is None:
    return {}, 0
  counter = _FlopCounter(computations, key)
  return counter.computation(entry), counter.unknown_trip_counts


def matmul_flops(hlo_text: str) -> Tuple[float, int]:
  """(matmul FLOPs of the ENTRY computation with loops times their trip counts and conditionals at their costliest
  branch, loops whose trip count could not be read and were counted once)."""
  by_name, unknown = matmul_flops_by(hlo_text, lambda _: "")
  return sum(by_name.values()), unknown


def count_collectives(hlo_text: str) -> Dict[str, Dict[str, int]]:
  """{kind: {"ops": instructions, "bytes": their result bytes}} in a compiled HLO module's text.

  Static counts: a collective inside a loop body (the micro-batch scan, a scanned layer stack) counts once.
  Async pairs count at their `-start`, whose tuple holds (operands, results): the results are counted.
  """
  out = {kind: dict(ops=0, bytes=0) for kind in COLLECTIVES}
  for line in hlo_text.splitlines():
    i = _parse_instruction(line)
    if i is None:
      continue
    kind = i.op[: -len("-start")] if i.op.endswith("-start") else i.op
    if kind not in out:
      continue
    sizes = [_DTYPE_BYTES[dtype] * int(np.prod(dims)) for dtype, dims in _arrays(i.type)]
    if i.op.endswith("-start") and len(sizes) >= 2:
      sizes = sizes[len(sizes) // 2 :]
    out[kind]["ops"] += 1
    out[kind]["bytes"] += int(sum(sizes))
  return out


def pallas_kernels(hlo_text: str) -> int:
  """Pallas (Mosaic) kernel calls in a compiled TPU program: opaque custom calls whose FLOPs no count above sees."""
  return len(re.findall(r'custom_call_target="tpu_custom_call"', hlo_text))


def while_loops(hlo_text: str) -> int:
  """`while` instructions in a compiled program (a scanned stack, grad accumulation, a blocked attention's loops)."""
  computations, _ = parse_module(hlo_text)
  return sum(1 for instructions in computations.values() for i in instructions if i.op == "while")
