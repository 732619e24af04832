#!/usr/bin/env bash
# Prepares .whl/ on this (CPU) machine for a GPU machine whose Python already holds CUDA torch but
# not the rest of this project's stack (the lent device machines: Python 3.12, x86-64, no network):
# DeepSpeed built here as a pure-Python wheel (its ops are compiled there on first use, if at all),
# Ray and pydantic and their missing dependencies as cp312 manylinux wheels, versions as this
# checkout's .venv has them. bench/gpu_suite.sh installs .whl/ there when it finds no .venv.
#
#   bash .ci/setup && bash bench/gpu_wheels.sh     # then carry .whl (about 50 MB) with the call
#
# Ray's wheel (79 MB) is slimmed to fit a 64 MiB transfer with the repository: its Java jar, the
# dashboard's web client and RLlib, none of which a Ray of include_dashboard=False and Python
# workers loads, are left out (and out of its RECORD).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || { echo "gpu_wheels.sh: no .venv here; run 'bash .ci/setup' first" >&2; exit 2; }
dest=.whl
rm -rf "$dest" && mkdir -p "$dest"

# Packages the device image lacks (its list: /work/.library/device/KINDS.md), pinned to this venv's.
names=(ray pydantic pydantic-core annotated-types typing-inspection hjson jsonschema referencing rpds-py
       jsonschema-specifications)
pins=$(.venv/bin/python - "${names[@]}" <<'PY'
import importlib.metadata as md, sys
print(" ".join(f"{n}=={md.version(n)}" for n in sys.argv[1:]))
PY
)
# shellcheck disable=SC2086 # one word per pin
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" $pins
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation \
    "deepspeed==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("deepspeed"))')" -w "$dest"

.venv/bin/python - "$dest"/ray-*.whl <<'PY'
import os, sys, zipfile
path = sys.argv[1]
dropped = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/")
slim = path + ".slim"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
    for info in src.infolist():
        if info.filename.startswith(dropped):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line for line in data.splitlines(keepends=True)
                            if not line.decode().startswith(dropped))
        out.writestr(info, data)  # the same ZipInfo: permissions (raylet, gcs_server) kept
os.replace(slim, path)
PY
du -sh "$dest"
ls "$dest"
