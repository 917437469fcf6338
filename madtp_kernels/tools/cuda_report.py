"""Resource report of the compiled extension's kernels, read from its fatbin without a GPU.

    python -m madtp_kernels.tools.cuda_report [--require] [--json PATH] [--binary PATH]

For every kernel in madtp_kernels._C and every architecture it was built for: registers, static shared memory,
stack and local memory (spills), local loads/stores in the SASS, and tensor-core instructions. This is the
ptxas -v information of the build, taken from the installed binary (so it describes what users run, and works
when the build log is gone). It also lists the PTX embedded (what the driver compiles for GPUs newer than every
SASS arch) and checks the binary against what _C says it holds (`cuda_archs`, which the dispatcher trusts).
Exit status 1 if any kernel spills, if the binary and its declared archs differ, or, with --require, if _C is not
built. --binary reports on another file with a fatbin (an object from nvcc -c, say) instead of _C.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import shutil
import subprocess
import sys

from .aot import _RESOURCE, _SASS_OPCODE, _tool

_ARCH = re.compile(r"^arch = (sm_\w+)", re.M)
_USAGE_FUNCTION = re.compile(r"^\s*Function (\S+):\s*\n\s*(.*)$", re.M)
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$", re.M)
_PTX_FILE = re.compile(r"^PTX file\s+\d+: \S*\.sm_(\w+)\.ptx\s*$", re.M)


@dataclasses.dataclass
class KernelUsage:
    kernel: str
    arch: str
    registers: int
    shared_bytes: int
    stack_bytes: int
    local_bytes: int
    spill_ops: int = 0
    mma: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0 or self.spill_ops > 0


def _sections(text: str) -> list[tuple[str, str]]:
    """(arch, text) for each architecture section of a cuobjdump listing."""
    marks = list(_ARCH.finditer(text))
    return [(m.group(1), text[m.end():marks[i + 1].start() if i + 1 < len(marks) else len(text)])
            for i, m in enumerate(marks)]


def _demangle(names: list[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines(), strict=True))


def inspect(binary: str) -> list[KernelUsage]:
    cuobjdump = _tool("cuobjdump")
    usage = subprocess.run([cuobjdump, "-res-usage", binary], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([cuobjdump, "-sass", binary], capture_output=True, text=True, check=True).stdout
    kernels: dict[tuple[str, str], KernelUsage] = {}
    for arch, section in _sections(usage):
        for name, line in _USAGE_FUNCTION.findall(section):
            r = {k: int(v) for k, v in _RESOURCE.findall(line)}
            kernels[(arch, name)] = KernelUsage(name, arch, r.get("REG", 0), r.get("SHARED", 0), r.get("STACK", 0),
                                                r.get("LOCAL", 0))
    for arch, section in _sections(sass):
        marks = list(_SASS_FUNCTION.finditer(section))
        for i, m in enumerate(marks):
            body = section[m.end():marks[i + 1].start() if i + 1 < len(marks) else len(section)]
            opcodes = collections.Counter(op.group(1) for op in _SASS_OPCODE.finditer(body))
            entry = kernels.get((arch, m.group(1)))
            if entry is not None:
                entry.spill_ops = opcodes["LDL"] + opcodes["STL"]
                entry.mma = {op: n for op, n in sorted(opcodes.items()) if op.endswith("MMA")}
    names = _demangle(sorted({k.kernel for k in kernels.values()}))
    for k in kernels.values():
        k.kernel = names[k.kernel]
    return sorted(kernels.values(), key=lambda k: (k.kernel, k.arch))


def embedded_ptx(binary: str) -> list[str]:
    """The PTX virtual archs embedded in `binary`, as compute_XY names."""
    listing = subprocess.run([_tool("cuobjdump"), "-lptx", binary], capture_output=True, text=True)
    if listing.returncode != 0 and "does not contain" not in listing.stderr + listing.stdout:
        listing.check_returncode()
    return sorted({f"compute_{v}" for v in _PTX_FILE.findall(listing.stdout)})


def held_archs(binary: str, rows: list[KernelUsage] | None = None) -> list[str]:
    """Every -gencode target the binary holds: its SASS archs, then its PTX."""
    rows = inspect(binary) if rows is None else rows
    return sorted({r.arch for r in rows}) + embedded_ptx(binary)


def format_table(rows: list[KernelUsage]) -> str:
    header = ("kernel", "arch", "regs", "smem", "stack", "local", "spill ops", "mma", "status")
    table = [header] + [(k.kernel, k.arch, k.registers, k.shared_bytes, k.stack_bytes, k.local_bytes, k.spill_ops,
                         " ".join(f"{op}:{n}" for op, n in k.mma.items()) or "-", "SPILLS" if k.spills else "ok")
                        for k in rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require", action="store_true", help="fail if madtp_kernels._C is not built")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--binary", help="report on this file's fatbin instead of madtp_kernels._C")
    args = parser.parse_args(argv)
    declared = None
    if args.binary:
        binary = args.binary
    else:
        try:
            import madtp_kernels._C as extension
        except ImportError as e:
            print(f"madtp_kernels._C is not built ({e})")
            return 1 if args.require else 0
        from madtp_kernels import _dispatch

        binary, declared = extension.__file__, sorted(_dispatch.cuda_archs())
    rows = inspect(binary)
    print(format_table(rows))
    ptx = embedded_ptx(binary)
    print("PTX: " + (", ".join(ptx) + " (JIT-compiled by the driver on newer GPUs)" if ptx else
                     "none: GPUs past the SASS archs get 'no kernel image'"))
    held = sorted({r.arch for r in rows} | set(ptx))
    mismatch = declared is not None and held != declared
    if mismatch:
        print(f"the binary holds {held}, but _C declares {declared} (cuda_archs): the dispatcher would pick it "
              "where it cannot run", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    spilling = [f"{r.kernel} ({r.arch})" for r in rows if r.spills]
    if spilling:
        print(f"{len(spilling)} kernel(s) spill: " + "; ".join(spilling), file=sys.stderr)
    print(f"{len(rows)} kernel builds, {len({r.arch for r in rows})} architectures, {len(spilling)} spilling")
    return 1 if spilling or mismatch or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
