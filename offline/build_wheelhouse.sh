#!/usr/bin/env bash
# Build an offline wheelhouse of sfi-sglang + SGLang 0.5.17 for an air-gapped GPU machine.
#
# Runs on a networked x86-64 machine (any Python 3 with pip). The wheels are cp312
# manylinux x86_64, for a target with Python 3.12, torch 2.11.0 (CUDA) and triton 3.6.0
# already installed (as on NVIDIA's PyTorch images); add more with EXTRA_PKGS.
#
#   bash offline/build_wheelhouse.sh [OUTDIR] [CHUNK_MIB]
#   then on the target:  . offline/install.sh OUTDIR/chunk*   (installs into /tmp/site)
#     OUTDIR     default: <current git checkout>/.whl      (must be git-ignored: add /.whl/ to .git/info/exclude)
#     CHUNK_MIB  default: 55               (each `run` call may carry <= 64 MiB in all)
#
# Result: OUTDIR/chunk1, OUTDIR/chunk2, ... each <= CHUNK_MIB, each with a MANIFEST.txt.
# Downloads are cached in OUTDIR/_dl (full wheels) and OUTDIR/_slim (repacked wheels),
# so a second run downloads nothing and only re-splits.  Idempotent.
#
# What is left out on purpose (see README.md): everything already in the device image
# (torch 2.11.0, triton 3.6.0, numpy, aiohttp, requests, psutil, huggingface-hub, ...),
# as on the lent H100/H200 machines this was proven on,
# and sglang deps not imported on the plain server / bench path (flash-attn-4, cutlass-dsl,
# deep-gemm, tilelang, helion, quack, outlines, llguidance, datasets, modelscope, torchao, ...).
# sglang-kernel is repacked without FA3 (flash_ops, 1.07 GiB), flashmla, infllm and sm100
# ops -> only the triton and flashinfer attention backends work, on sm90 (H100/H200).
# xgrammar is repacked without its static library lib/libxgrammar.a (62 MiB, build-time only).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(git rev-parse --show-toplevel 2>/dev/null || pwd)"   # default OUTDIR: <current git checkout>/.whl
OUT="$(mkdir -p "${1:-$REPO/.whl}" && cd "${1:-$REPO/.whl}" && pwd)"
CHUNK_MIB="${2:-55}"
PY="${PYTHON:-python3}"
DL="$OUT/_dl"; SLIM="$OUT/_slim"
mkdir -p "$DL" "$SLIM"

# name==version, pinned (what was proven on the device; see README.md)
PKGS=(
  sglang==0.5.17
  sglang-kernel==0.4.5          # slimmed below
  flashinfer-python==0.6.15.post1
  apache-tvm-ffi==0.1.11
  xgrammar==0.2.1               # slimmed below
  # sglang pins transformers 5.12.1; the device's 5.17.0 fails at import:
  # "ValueError: 'qwen3_asr' is already used by a Transformers config".  transformers
  # 5.12.1 checks tokenizers>=0.22.0,<=0.23.0 at import (device has 0.23.2; 0.23.0 has
  # no wheel on PyPI) -> carry tokenizers 0.22.2 too.
  transformers==5.12.1 tokenizers==0.22.2
  # HTTP server
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34
  opentelemetry-api==1.45.2     # fastapi 0.165 imports it
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0
  typing-inspection==0.4.5 typing-extensions==4.16.0
  # sglang runtime imports
  orjson==3.13.0 pyzmq==27.3.0 msgspec==0.22.0 pybase64==1.5.1 setproctitle==1.3.8
  partial-json-parser==0.2.1.1.post7 zstandard==0.25.0 interegular==0.3.3
  gguf==0.19.0 dill==0.4.1 compressed-tensors==0.20.0 loguru==0.7.3
  openai==2.6.1 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 openai-harmony==0.0.4
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
  # sglang/utils.py imports IPython.display at top level (pulled in by weight loading)
  ipython==9.18.1 ipython-pygments-lexers==1.1.1 jedi==0.20.1 parso==0.8.7
  matplotlib-inline==0.2.2 traitlets==5.16.1 pexpect==4.9.0 ptyprocess==0.7.0
  prompt-toolkit==3.0.53 wcwidth==0.9.4 stack-data==0.6.3 executing==2.3.0
  asttokens==3.0.2 pure-eval==0.2.4 decorator==5.3.1
)
# extra pins from the environment, e.g. EXTRA_PKGS="llguidance==1.7.6"
read -r -a EXTRA <<<"${EXTRA_PKGS:-}"
PKGS+=("${EXTRA[@]}")

PLAT=()
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux_2_5_x86_64 \
         manylinux1_x86_64; do PLAT+=(--platform "$p"); done

norm() { echo "$1" | tr 'A-Z-.' 'a-z__'; }     # wheel file names use lower_case_with_underscores

echo "== downloading into $DL"
for spec in "${PKGS[@]}"; do
  [[ "$spec" == \#* || -z "$spec" ]] && continue
  name="${spec%%==*}"; ver="${spec#*==}"
  if ls "$DL" | grep -qi "^$(norm "$name")-${ver}-.*\.whl$"; then continue; fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --abi cp312 --abi abi3 --abi none "${PLAT[@]}" -d "$DL" "$spec" \
      2> >(grep -v "^WARNING: Location" >&2)
done

echo "== building the sfi-sglang wheel"
rm -f "$DL"/sfi_sglang-*.whl
"$PY" -m pip wheel -q --no-deps -w "$DL" "$HERE/.."

echo "== slimming sglang-kernel and xgrammar into $SLIM"
SK="$(ls "$DL"/sglang_kernel-0.4.5-*.whl)"
[ -f "$SLIM/$(basename "$SK")" ] || "$PY" "$HERE/slim_wheel.py" "$SK" "$SLIM" \
  --drop 'sgl_kernel/flash_ops*.so' --drop 'sgl_kernel/flashmla_ops*.so' \
  --drop 'sgl_kernel/infllm_ops*.so' --drop 'sgl_kernel/sm100/*' >/dev/null
XG="$(ls "$DL"/xgrammar-0.2.1-*.whl)"
[ -f "$SLIM/$(basename "$XG")" ] || "$PY" "$HERE/slim_wheel.py" "$XG" "$SLIM" --drop 'xgrammar/lib/*' >/dev/null

echo "== splitting into chunks of <= ${CHUNK_MIB} MiB"
rm -rf "$OUT"/chunk[0-9]*
"$PY" - "$DL" "$SLIM" "$OUT" "$CHUNK_MIB" <<'EOF'
import os, re, shutil, sys
dl, slim, out, cap = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]) * 2**20
def key(f):  # distribution name, normalised
    return re.sub(r"[-_.]+", "_", f.split("-")[0]).lower()
wheels = {key(f): os.path.join(dl, f) for f in os.listdir(dl) if f.endswith(".whl")}
for f in os.listdir(slim):
    if f.endswith(".whl"):
        wheels[key(f)] = os.path.join(slim, f)  # slim copy replaces the full one
items = sorted(wheels.values(), key=os.path.getsize, reverse=True)
chunks = []  # first-fit decreasing
for w in items:
    s = os.path.getsize(w)
    if s > cap:
        sys.exit(f"{w} ({s/2**20:.1f} MiB) is larger than a chunk")
    for c in chunks:
        if c["size"] + s <= cap:
            c["files"].append(w); c["size"] += s; break
    else:
        chunks.append({"files": [w], "size": s})
n = len(chunks)
names = [f"chunk{i+1}" for i in range(n)]
for i, c in enumerate(chunks):
    d = os.path.join(out, names[i]); os.makedirs(d)
    for w in c["files"]:
        os.link(w, os.path.join(d, os.path.basename(w))) if os.stat(w).st_dev == os.stat(d).st_dev \
            else shutil.copy2(w, d)
    with open(os.path.join(d, "MANIFEST.txt"), "w") as m:
        m.write(f"# {names[i]} of {n}; all chunks: {' '.join(names)}\n")
        m.write("".join(os.path.basename(w) + "\n" for w in sorted(c["files"])))
    print(f"{names[i]}: {c['size']/2**20:6.1f} MiB, {len(c['files'])} wheels")
print(f"total: {sum(c['size'] for c in chunks)/2**20:.1f} MiB in {n} chunks under {out}")
EOF
du -sh "$OUT"/chunk* | sed 's/^/du: /'
