"""Compile every Triton kernel of madtp_kernels ahead of time and report its resources, without a GPU.

    python -m madtp_kernels.tools.aot [--arch 80 90] [--json PATH] [--module MODULE ...]

Every module in `madtp_kernels.triton` exports `AOT_SPECS` (a list of `madtp_kernels.triton.AotSpec`): the
specialisations its launchers use. Each is compiled with `triton.compile` for each architecture, and its
cubin is read back with the `cuobjdump` that ships with Triton:
  regs       registers per thread
  smem       shared memory per block in bytes (Triton's dynamic allocation plus any static)
  stack      per-thread stack frame in bytes; Triton kernels keep no local arrays, so any stack is spilling
  spill ops  local-memory loads/stores (LDL/STL) in the SASS
  mma        tensor-core instructions in the SASS (HMMA, HGMMA, IMMA, ...), by opcode
Exit status 1 if any specialisation fails to compile or spills, else 0.

The `@triton.jit` decorator returns an interpreter stand-in when TRITON_INTERPRET is set, which cannot be
compiled; the tool then runs itself again in a child process with the variable removed.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import traceback

from madtp_kernels.triton import AotSpec

_INTERPRET_VAR = "TRITON_INTERPRET"
# An instruction line of `cuobjdump -sass`: /*0a30*/  [@!P0] OPCODE.MODIFIERS operands ;
_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_RESOURCE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")


@dataclasses.dataclass
class Result:
    kernel: str
    spec: str
    arch: int
    num_warps: int
    registers: int | None = None
    shared_bytes: int | None = None
    stack_bytes: int | None = None
    spill_ops: int | None = None
    mma: dict[str, int] = dataclasses.field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.stack_bytes == 0 and self.spill_ops == 0


def discover(modules: list[str] | None = None) -> list[AotSpec]:
    """The AOT_SPECS of the given modules, or of every module in madtp_kernels.triton."""
    if modules is None:
        import madtp_kernels.triton as package
        modules = [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    specs = []
    for name in modules:
        specs.extend(getattr(importlib.import_module(name), "AOT_SPECS", []))
    return specs + bf16_twins(specs)


def _bf16_key(spec: AotSpec) -> tuple:
    return (spec.name, tuple(sorted((k, v.replace("fp16", "bf16")) for k, v in spec.signature.items())),
            tuple(sorted(spec.constexprs.items())), spec.num_warps, spec.num_stages)


def bf16_twins(specs: list[AotSpec]) -> list[AotSpec]:
    """A bf16 copy of every fp16 specialisation that has none: Triton's interpreter cannot check bf16 kernels on
    CPU (its bf16 tl.dot is wrong), so this build is where each one a launcher may take in bf16 compiles."""
    have = {_bf16_key(s) for s in specs if any("bf16" in v for v in s.signature.values())}
    twins = []
    for s in specs:
        if any("fp16" in v for v in s.signature.values()) and _bf16_key(s) not in have:
            have.add(_bf16_key(s))
            twins.append(dataclasses.replace(
                s, signature={k: v.replace("fp16", "bf16") for k, v in s.signature.items()},
                label=(s.label.replace("fp16", "bf16") if "fp16" in s.label else f"bf16 {s.label}") + " (bf16 twin)"))
    return twins


def _full_signature(spec: AotSpec) -> dict[str, str]:
    names = list(spec.kernel.arg_names)
    unknown = (set(spec.signature) | set(spec.constexprs) | set(spec.divisible_by_16)) - set(names)
    if unknown:
        raise ValueError(f"spec names arguments the kernel does not have: {sorted(unknown)}")
    missing = [n for n in names if n not in spec.signature and n not in spec.constexprs]
    if missing:
        raise ValueError(f"spec gives no type for arguments {missing}")
    return {n: "constexpr" if n in spec.constexprs else spec.signature[n] for n in names}


def _tool(name: str) -> str:
    import triton
    return getattr(triton.knobs.nvidia, name).path


def _inspect_cubin(cubin: bytes, result: Result) -> None:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                               text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout
    resources = {k: int(v) for k, v in _RESOURCE.findall(usage)}
    result.registers = resources["REG"]
    result.stack_bytes = resources["STACK"] + resources["LOCAL"]
    result.shared_bytes += resources["SHARED"]
    opcodes = collections.Counter(m.group(1) for m in _SASS_OPCODE.finditer(sass))
    result.spill_ops = opcodes["LDL"] + opcodes["STL"]
    result.mma = {op: n for op, n in sorted(opcodes.items()) if op.endswith("MMA")}


def compile_spec(spec: AotSpec, arch: int) -> Result:
    """Compile one specialisation for sm_<arch>; compile errors are returned in Result.error, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget

    name = getattr(spec.kernel, "__name__", repr(spec.kernel))
    result = Result(name, spec.label, arch, spec.num_warps)
    try:
        if not isinstance(spec.kernel, triton.runtime.JITFunction):
            raise TypeError(f"{name} is not a triton.jit kernel (was it decorated under {_INTERPRET_VAR}?)")
        signature = _full_signature(spec)
        arg_index = list(spec.kernel.arg_names).index
        attrs = {(arg_index(n),): [["tt.divisibility", 16]] for n in spec.divisible_by_16}
        source = triton.compiler.ASTSource(fn=spec.kernel, signature=signature, constexprs=dict(spec.constexprs),
                                           attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        result.shared_bytes = compiled.metadata.shared
        _inspect_cubin(compiled.asm["cubin"], result)
    except Exception as e:  # any failure is reported per specialisation; the run goes on
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        # A CompilationError starts with the source location and ends with the cause.
        cause = lines[-1] if isinstance(e, triton.CompilationError) else lines[0]
        result.error = f"{type(e).__name__}: {cause}"
        traceback.print_exc(file=sys.stderr)
    return result


def run(specs: list[AotSpec], archs: list[int]) -> list[Result]:
    return [compile_spec(spec, arch) for spec in specs for arch in archs]


def format_table(results: list[Result]) -> str:
    header = ("kernel", "specialisation", "arch", "warps", "regs", "smem", "stack", "spill ops", "mma", "status")
    rows = [header]
    for r in results:
        mma = " ".join(f"{op}:{n}" for op, n in r.mma.items()) or "0"
        status = "ok" if r.ok else (r.error or "SPILLS")
        fields = (r.registers, r.shared_bytes, r.stack_bytes, r.spill_ops, mma) if r.error is None else ("-",) * 5
        rows.append((r.kernel, r.spec, f"sm_{r.arch}", r.num_warps, *fields, status))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row[:-1], widths, strict=True)) + "  " + str(row[-1])
             for row in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m madtp_kernels.tools.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    parser.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    parser.add_argument("--module", action="append", metavar="MODULE",
                        help="compile the AOT_SPECS of this module instead of madtp_kernels.triton.* (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if os.environ.get(_INTERPRET_VAR, "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != _INTERPRET_VAR}
        env["PYTHONPATH"] = os.pathsep.join(sys.path)  # the child must find the modules this process found
        child_argv = sys.argv[1:] if argv is None else argv
        return subprocess.run([sys.executable, "-m", "madtp_kernels.tools.aot", *child_argv], env=env).returncode
    results = run(discover(args.module), args.arch)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) | {"ok": r.ok} for r in results], f, indent=2)
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(results)} specialisations failed or spill", file=sys.stderr)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
