"""A small classic-BPF interpreter for seccomp filters (test helper, no dependencies).

It runs the bytes `compile_bpf` exports (an array of `struct sock_filter`) against a
`struct seccomp_data` and returns the 32-bit value the filter returns, the way the
kernel's seccomp does (kernel/seccomp.c, include/uapi/linux/filter.h, Linux 6.18).

Only the opcodes that make sense for seccomp are implemented; anything else raises
`UnknownOpcode`, so a new libseccomp that emits something unexpected fails loudly
instead of being silently misinterpreted.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

# include/uapi/linux/bpf_common.h: instruction classes, sizes, modes, ops, sources
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = range(8)
BPF_W = 0x00
BPF_IMM, BPF_ABS, BPF_MEM, BPF_LEN = 0x00, 0x20, 0x60, 0x80
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH, BPF_NEG = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80)
BPF_MOD, BPF_XOR = 0x90, 0xA0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_K, BPF_X = 0x00, 0x08
BPF_A = 0x10  # for BPF_RET: return the accumulator
BPF_TAX, BPF_TXA = 0x00, 0x80  # BPF_MISC ops
BPF_MEMWORDS = 16  # include/uapi/linux/filter.h
BPF_MAXINSNS = 4096  # include/uapi/linux/bpf_common.h

# include/uapi/linux/seccomp.h: struct seccomp_data is 64 bytes
# { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
SECCOMP_DATA_SIZE = 64

# include/uapi/linux/seccomp.h: return action values (upper 16 bits) and data mask
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
SECCOMP_RET_DATA = 0x0000FFFF

# include/uapi/linux/audit.h
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_ARCH_ARM = 0x40000028

_M32 = 0xFFFFFFFF


class UnknownOpcode(ValueError):
    pass


class BadFilter(ValueError):
    pass


@dataclass(frozen=True)
class Insn:
    code: int
    jt: int
    jf: int
    k: int


@dataclass
class SeccompData:
    nr: int
    arch: int
    args: Sequence[int] = field(default_factory=lambda: (0,) * 6)
    instruction_pointer: int = 0

    def pack(self) -> bytes:
        args = [a & 0xFFFFFFFFFFFFFFFF for a in self.args] + [0] * (6 - len(self.args))
        # native little-endian layout (x86_64, aarch64): struct seccomp_data
        return struct.pack("<iIQ6Q", self._signed_nr(), self.arch & _M32,
                           self.instruction_pointer, *args)

    def _signed_nr(self) -> int:
        nr = self.nr & _M32
        return nr - (1 << 32) if nr & 0x80000000 else nr


def decode(bpf: bytes) -> list[Insn]:
    """Split exported bytes into instructions.

    include/uapi/linux/filter.h: struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }
    """
    if len(bpf) % 8:
        raise BadFilter(f"length {len(bpf)} is not a multiple of 8")
    return [Insn(*struct.unpack_from("<HBBI", bpf, off)) for off in range(0, len(bpf), 8)]


def run(bpf: bytes | Sequence[Insn], data: SeccompData, *, max_steps: int = 100000) -> int:
    """Return the filter's verdict (a SECCOMP_RET_* value including its data bits)."""
    insns = decode(bpf) if isinstance(bpf, bytes | bytearray) else list(bpf)
    if not insns or len(insns) > BPF_MAXINSNS:
        raise BadFilter(f"{len(insns)} instructions (allowed 1..{BPF_MAXINSNS})")
    packet = data.pack()
    a = x = 0
    mem = [0] * BPF_MEMWORDS
    pc = 0
    steps = 0
    while True:
        if pc >= len(insns):
            raise BadFilter(f"fell off the end at pc={pc}")
        steps += 1
        if steps > max_steps:
            raise BadFilter("too many steps")  # classic BPF only jumps forward; cannot happen
        ins = insns[pc]
        code, k = ins.code, ins.k
        cls = code & 0x07
        pc += 1
        if cls == BPF_LD:
            mode, size = code & 0xE0, code & 0x18
            if size != BPF_W:
                raise UnknownOpcode(f"pc={pc - 1}: seccomp allows only 32-bit loads "
                                    f"(code {code:#x})")
            if mode == BPF_ABS:
                # kernel/seccomp.c seccomp_check_filter: aligned, inside seccomp_data
                if k % 4 or k + 4 > SECCOMP_DATA_SIZE:
                    raise BadFilter(f"pc={pc - 1}: load at offset {k}")
                a = struct.unpack_from("<I", packet, k)[0]
            elif mode == BPF_IMM:
                a = k
            elif mode == BPF_MEM:
                a = mem[_memidx(k)]
            elif mode == BPF_LEN:
                a = SECCOMP_DATA_SIZE
            else:
                raise UnknownOpcode(f"pc={pc - 1}: code {code:#x}")
        elif cls == BPF_LDX:
            mode, size = code & 0xE0, code & 0x18
            if size != BPF_W:
                raise UnknownOpcode(f"pc={pc - 1}: code {code:#x}")
            if mode == BPF_IMM:
                x = k
            elif mode == BPF_MEM:
                x = mem[_memidx(k)]
            elif mode == BPF_LEN:
                x = SECCOMP_DATA_SIZE
            else:
                raise UnknownOpcode(f"pc={pc - 1}: code {code:#x}")
        elif cls == BPF_ST:
            mem[_memidx(k)] = a
        elif cls == BPF_STX:
            mem[_memidx(k)] = x
        elif cls == BPF_ALU:
            op = code & 0xF0
            src = x if code & BPF_X else k
            a = _alu(op, a, src, code, pc - 1)
        elif cls == BPF_JMP:
            op = code & 0xF0
            if op == BPF_JA:
                pc += k
                continue
            src = x if code & BPF_X else k
            if op == BPF_JEQ:
                cond = a == src
            elif op == BPF_JGT:
                cond = a > src
            elif op == BPF_JGE:
                cond = a >= src
            elif op == BPF_JSET:
                cond = bool(a & src)
            else:
                raise UnknownOpcode(f"pc={pc - 1}: jump op {op:#x}")
            pc += ins.jt if cond else ins.jf
        elif cls == BPF_RET:
            src_bits = code & 0x18
            if src_bits == BPF_K:
                return k
            if src_bits == BPF_A:
                return a
            raise UnknownOpcode(f"pc={pc - 1}: code {code:#x}")
        elif cls == BPF_MISC:
            if code & 0xF8 == BPF_TAX:
                x = a
            elif code & 0xF8 == BPF_TXA:
                a = x
            else:
                raise UnknownOpcode(f"pc={pc - 1}: code {code:#x}")
        else:  # pragma: no cover - all eight classes are handled above
            raise UnknownOpcode(f"pc={pc - 1}: code {code:#x}")


def _memidx(k: int) -> int:
    if k >= BPF_MEMWORDS:
        raise BadFilter(f"scratch memory index {k}")
    return k


def _alu(op: int, a: int, src: int, code: int, pc: int) -> int:
    if op == BPF_ADD:
        return (a + src) & _M32
    if op == BPF_SUB:
        return (a - src) & _M32
    if op == BPF_MUL:
        return (a * src) & _M32
    if op == BPF_DIV:
        if src == 0:
            raise BadFilter(f"pc={pc}: division by zero")
        return a // src
    if op == BPF_MOD:
        if src == 0:
            raise BadFilter(f"pc={pc}: division by zero")
        return a % src
    if op == BPF_OR:
        return a | src
    if op == BPF_AND:
        return a & src
    if op == BPF_XOR:
        return a ^ src
    if op == BPF_LSH:
        return (a << src) & _M32 if src < 32 else 0
    if op == BPF_RSH:
        return a >> src if src < 32 else 0
    if op == BPF_NEG:
        return (-a) & _M32
    raise UnknownOpcode(f"pc={pc}: ALU code {code:#x}")


def opcodes(bpf: bytes) -> set[int]:
    """The distinct opcodes a filter uses."""
    return {ins.code for ins in decode(bpf)}


def disassemble(bpf: bytes) -> str:
    """Readable listing (for debugging test failures)."""
    lines = []
    for i, ins in enumerate(decode(bpf)):
        lines.append(f"{i:4d}: code={ins.code:#06x} jt={ins.jt:3d} jf={ins.jf:3d} k={ins.k:#010x}")
    return "\n".join(lines)


def verdict_action(verdict: int) -> int:
    """The action part of a verdict (SECCOMP_RET_ACTION_FULL)."""
    return verdict & SECCOMP_RET_ACTION_FULL


def errno_verdict(err: int) -> int:
    return SECCOMP_RET_ERRNO | (err & SECCOMP_RET_DATA)
