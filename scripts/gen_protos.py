"""Generate the Python gRPC modules from protos/ into services/atlasflow/<name>/v1/.

protos/atlasflow/<name>/v1/*.proto  ->  services/atlasflow/<name>/v1/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py
(the import package `atlasflow` is the directory `services/atlasflow/`).

    python scripts/gen_protos.py          # write
    python scripts/gen_protos.py --check  # exit 1 if the committed code is stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
SERVICES = ROOT / "services" / "atlasflow"


def generate(out: Path) -> list[Path]:
    """Run protoc on every proto into `out`; return the generated files relative to `out`."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out) for p in out.rglob("*.py*") if p.is_file())


def target_of(rel: Path) -> Path:
    # rel = atlasflow/<name>/v1/<file>; services/atlasflow/ is the atlasflow package.
    return SERVICES.joinpath(*rel.parts[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generated = generate(out)
        stale = []
        for rel in generated:
            dest = target_of(rel)
            if ns.check:
                if not dest.exists() or not filecmp.cmp(out / rel, dest, shallow=False):
                    stale.append(str(dest.relative_to(ROOT)))
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out / rel, dest)
                init = dest.parent / "__init__.py"
                if not init.exists():
                    init.write_text('"""Generated protobuf modules (scripts/gen_protos.py)."""\n')
        if ns.check and stale:
            print("stale generated code (run scripts/gen_protos.py):", *stale, sep="\n  ")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
