"""The accelerator run's check of optimised programs: nothing the CPU backend puts in a program survived elsewhere.

`check_program(text)` reads the text of a compiled program (`jax.jit(f).lower(...).compile().as_text()`,
XLA's optimised HLO) and lists what only `nfnet_jax.cpu` puts there, or what costs an accelerator
for nothing:

- `conditional`: a branch left in the program (a `lax.cond`, or a `lax.platform_dependent` lowered
  for several platforms) where the program should be one straight line;
- `loop`: a `while` loop; NFNets have none, but the CPU backend runs large inference batches a
  chunk at a time in a `lax.scan` (`cpu.in_chunks`);
- `cpu call`: a custom call into a CPU library: the backend's oneDNN convolutions, XLA:CPU's own
  oneDNN or MKL calls;
- `zero added`: an addition of an all-zero constant (through broadcasts, conversions and reshapes),
  e.g. a residual branch that is always zero, which XLA did not fold away;
- `grouped convolutions split`: a model with grouped convolutions whose program has none: the CPU
  backend runs them one group at a time.

Only the standard library: the test suite checks programs compiled for the CPU with it, with the
CPU backend off (clean) and on (each finding), so that the check on a GPU program means something.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

# Custom-call targets that name a CPU library: nfnet_jax's oneDNN FFI targets ('nfnet_onednn_conv_*'),
# XLA:CPU's own '__onednn$...' rewrites, MKL.
CPU_CALL = re.compile(r'onednn|mkl|dnnl', re.IGNORECASE)
# An instruction: `[ROOT] %name = type opcode(operands), attributes`. The opcode is the first lower-case word
# followed by '(' after whitespace: a type (`f32[2,3]{1,0}`, a tuple of them) never holds one.
INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*\S.*?\s(?P<op>[a-z][\w-]*)\((?P<rest>.*)$')
GPU_CONVOLUTION = '__cudnn$conv'  # XLA:GPU's convolutions are custom calls into cuDNN, their groups kept
# Instructions through which an all-zero constant stays all zero.
ZERO_PRESERVING = frozenset({'broadcast', 'convert', 'bitcast', 'bitcast-convert', 'reshape', 'copy', 'transpose'})


@dataclass(frozen=True)
class Instruction:
    name: str
    op: str
    operands: tuple[str, ...]
    literal: str | None  # a constant's value as printed: '0', '{0, 0}', or '{...}' when XLA elided it
    line: str


@dataclass
class ProgramCheck:
    """What `check_program` found: each kind of finding with its count and first instruction, and the program's
    instructions, convolutions and custom-call targets counted."""

    findings: dict[str, dict[str, Any]] = field(default_factory=dict)
    instructions: int = 0
    convolutions: int = 0
    grouped_convolutions: int = 0
    custom_calls: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.findings

    def add(self, kind: str, why: str, instruction: Instruction | None) -> None:
        finding = self.findings.setdefault(kind, dict(why=why, count=0, first=None))
        finding['count'] += 1
        if finding['first'] is None and instruction is not None:
            finding['first'] = instruction.line.strip()[:300]

    def record(self) -> dict[str, Any]:
        """As the JSON report keeps it."""
        return asdict(self) | dict(clean=self.clean)


def operand_text(rest: str) -> tuple[str, list[str]]:
    """The text inside an instruction's operand parentheses, and its comma-separated parts (types hold commas too)."""
    depth, parts, start = 1, [], 0
    for index, char in enumerate(rest):
        depth += {'(': 1, '[': 1, '{': 1, ')': -1, ']': -1, '}': -1}.get(char, 0)
        if depth == 0:
            return rest[:index], [*parts, rest[start:index]]
        if depth == 1 and char == ',':
            parts.append(rest[start:index])
            start = index + 1
    return rest, [*parts, rest[start:]]


def parse(text: str) -> list[Instruction]:
    """Every instruction of an HLO module's text, in every computation (fused ones included)."""
    instructions = []
    for line in text.splitlines():
        match = INSTRUCTION.match(line)
        if not match:
            continue
        inside, parts = operand_text(match['rest'])
        op = match['op']
        literal = inside.strip() if op == 'constant' else None
        # An operand is its name, after its type where the text gives one: 'f32[2]{0} %x.1' or '%x.1' or 'x.1'.
        names = (part.split()[-1].lstrip('%') for part in parts if part.strip())
        operands = () if op == 'constant' else tuple(names)
        instructions.append(Instruction(match['name'].lstrip('%'), op, operands, literal, line))
    return instructions


def is_zero_literal(literal: str) -> bool:
    """Whether a printed constant is all zeros ('0', '-0', '{0, 0}', '{{0}}'); False for an elided one ('{...}')."""
    values = [v for v in re.split(r'[{},\s]+', literal) if v]
    try:
        return bool(values) and all(float(v) == 0 for v in values)
    except ValueError:  # '...', 'true', a tuple
        return False


def check_program(text: str, grouped: bool = True) -> ProgramCheck:
    """The findings (see the module's docstring) in a compiled program's text; `grouped`: the model has grouped
    convolutions, so the program should too."""
    instructions = parse(text)
    by_name = {instruction.name: instruction for instruction in instructions}
    check = ProgramCheck(instructions=len(instructions))

    def zero(name: str, depth: int = 0) -> bool:
        instruction = by_name.get(name)
        if instruction is None or depth > 8:
            return False
        if instruction.op == 'constant':
            return instruction.literal is not None and is_zero_literal(instruction.literal)
        return (
            instruction.op in ZERO_PRESERVING
            and bool(instruction.operands)
            and zero(instruction.operands[0], depth + 1)
        )

    calls: Counter[str] = Counter()
    for instruction in instructions:
        target = re.search(r'custom_call_target="([^"]+)"', instruction.line)
        if instruction.op == 'convolution' or (target and target[1].startswith(GPU_CONVOLUTION)):
            check.convolutions += 1
            groups = re.search(r'(?:feature|batch)_group_count=(\d+)', instruction.line)
            check.grouped_convolutions += bool(groups and int(groups[1]) > 1)
        if instruction.op == 'conditional':
            check.add('conditional', 'a branch in the program (lax.cond, or a multi-platform lowering)', instruction)
        elif instruction.op == 'while':
            check.add('loop', 'a while loop (the CPU backend runs large batches in chunks: cpu.in_chunks)', instruction)
        elif instruction.op == 'add' and any(zero(name) for name in instruction.operands):
            check.add('zero added', 'an all-zero constant added (a residual that is always zero)', instruction)
        if instruction.op == 'custom-call' and target:
            calls[target[1]] += 1
            if CPU_CALL.search(target[1]):
                check.add('cpu call', f'a custom call into a CPU library ({target[1]})', instruction)
    check.custom_calls = dict(calls)
    if grouped and check.convolutions and not check.grouped_convolutions:
        check.add(
            'grouped convolutions split', 'no grouped convolution left (the CPU backend runs a group at a time)', None
        )
    return check
