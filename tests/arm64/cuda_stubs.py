"""Stub libraries for the CUDA libraries that PyPI's aarch64 torch wheel (a CUDA build) links
against, so that it imports and runs on the CPU under qemu-user without them: every symbol the
torch libraries take from a library that is not there, under its version, as a function that
returns 100 (never called on the CPU). The unversioned ones (libcuda's, which torch opens only
when asked for CUDA) go in one more stub that every other stub depends on.

    python cuda_stubs.py TORCH_LIB SYSROOT OUT
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REST = "libelmd_stub_rest.so"


def readelf(*args: str) -> str:
    return subprocess.run(["readelf", *args], capture_output=True, text=True, check=True).stdout


def main(torch_lib: Path, sysroot: Path, out: Path) -> None:
    system = [p for d in ("lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu") for p in (sysroot / d).glob("*.so*")]
    present = {p.name for p in torch_lib.iterdir()} | {p.name for p in system}
    libraries = [p for p in torch_lib.glob("*.so*") if p.is_file()]
    missing: dict[str, set[tuple[str, str]]] = {}  # soname -> {(symbol, version)}
    version_of: dict[str, str] = {}  # version name -> the missing library that defines it
    wanted: set[tuple[str, str]] = set()
    for library in libraries:
        for soname in re.findall(r"\(NEEDED\).*\[(.+)\]", readelf("-dW", str(library))):
            if soname not in present:
                missing.setdefault(soname, set())
        source = None
        for line in readelf("-VW", str(library)).splitlines():
            if found := re.search(r"File: (\S+)", line):
                source = found.group(1)
            elif (found := re.search(r"Name: (\S+)", line)) and source and source not in present:
                version_of[found.group(1)] = source
        for line in readelf("--dyn-syms", "-W", str(library)).splitlines():
            parts = line.split()
            if len(parts) >= 8 and parts[6] == "UND":
                symbol, _, version = parts[7].partition("@")
                wanted.add((symbol, version.lstrip("@")))
    defined = set()
    for library in [*libraries, *system]:
        for line in readelf("--dyn-syms", "-W", str(library)).splitlines():
            parts = line.split()
            if len(parts) >= 8 and parts[6] not in ("UND", "Ndx"):
                defined.add(parts[7].partition("@")[0])
    for symbol, version in wanted:
        if version in version_of:
            missing.setdefault(version_of[version], set()).add((symbol, version))
    rest = {(s, "") for s, v in wanted if not v and s not in defined and re.fullmatch(r"[A-Za-z]\w*", s)}
    out.mkdir(parents=True, exist_ok=True)
    for soname, symbols in [(REST, rest), *sorted(missing.items())]:
        source = out / f"{soname}.c"
        source.write_text("".join(f"int {s}(void) {{ return 100; }}\n" for s, _ in sorted(symbols)))
        command = ["aarch64-linux-gnu-gcc", "-shared", "-fPIC", "-fno-builtin", "-w", "-o", str(out / soname), str(source),
                   f"-Wl,-soname,{soname}"]
        versions = sorted({v for _, v in symbols if v})
        if versions:
            script = out / f"{soname}.map"
            script.write_text("".join(f"{v} {{ global: {'; '.join(s for s, w in sorted(symbols) if w == v)}; }};\n"
                                      for v in versions))
            command.append(f"-Wl,--version-script,{script}")
        if soname != REST:
            command += [f"-L{out}", "-Wl,--no-as-needed", f"-l:{REST}"]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]))
