#!/usr/bin/env bash
# The wheels scripts/gpu_services_check.py needs on the GPU machine, in .whl-services/, within one call's 64 MiB.
#
# The GPU machine has torch, transformers, peft, accelerate, sentence-transformers, pandas, numpy and their
# dependencies, but no Gradio and no Chroma, and no network. Everything together is about 160 MB; this keeps what
# the app and the Chroma server import: the training wheels of ../shared/gpu/wheels.sh (run it first: .whl/),
# bitsandbytes with only its CUDA 13 libraries (the machine's torch is built for CUDA 13), Gradio without its web
# frontend (the check drives the app through its API, never a page), chromadb, and their small dependencies
# (not onnxruntime, kubernetes or uvloop, which nothing here imports; pytz, which Gradio imports and the GPU
# machine lacks, is kept). Measured 2026-11-29: 63.9 MB.
#
#   ../shared/gpu/wheels.sh && scripts/gpu_service_wheels.sh
#   then, on the GPU machine (carry .whl-services), begin the command with wheels.sh's install line, on
#   .whl-services/*.whl instead of .whl/*.whl.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
[ -d .whl ] || { echo "no .whl/: run ../shared/gpu/wheels.sh first" >&2; exit 2; }
grep -qx '/.whl-services/' .git/info/exclude 2>/dev/null || echo '/.whl-services/' >> .git/info/exclude
out=.whl-services
rm -rf "$out" && mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform any)
for n in 17 24 27 28 31 34 35; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
versions=$(python3 -c 'import tomllib; d=tomllib.load(open("pyproject.toml","rb"))["project"]["dependencies"];
print(" ".join(x for x in d if x.split("==")[0] in ("gradio", "gradio_client", "chromadb")))')
python3 -m pip download -q "${plat[@]}" -d "$tmp/all" $versions 'filelock>=3.12' sniffio jsonpointer 2>/dev/null

# Present on the GPU machine, or imported by nothing the check runs.
skip='^(numpy|pandas|pillow|tokenizers|hf_xet|huggingface_hub|pyyaml|tzdata|requests|urllib3|idna|certifi|'
skip+='packaging|filelock|fsspec|jinja2|markupsafe|typing_extensions|tqdm|python_dateutil|six|onnxruntime|'
skip+='kubernetes|uvloop|httptools|watchfiles)-'
for wheel in "$tmp"/all/*.whl; do
  basename "$wheel" | grep -Eq "$skip" || cp "$wheel" "$out/"
done
for wheel in .whl/*.whl; do
  case $(basename "$wheel") in bitsandbytes-*|hf_transfer-*|charset_normalizer-*) ;; *) cp "$wheel" "$out/" ;; esac
done

repack() {  # repack WHEEL without the paths matched by the find expression that follows
  local wheel=$1; shift
  rm -rf "$tmp/x" && mkdir "$tmp/x"
  (cd "$tmp/x" && python3 -m zipfile -e "$wheel" . && find . "$@" -exec rm -rf {} + && rm -f "$wheel" \
     && python3 -m zipfile -c "$wheel" ./*)
}
cp .whl/bitsandbytes-*.whl "$out/"
repack "$root/$out/$(basename .whl/bitsandbytes-*.whl)" -name 'libbitsandbytes_*.so' ! -name '*cuda130*'
repack "$root/$out/$(basename "$out"/gradio-[0-9]*.whl)" \( -path './gradio/templates/frontend/assets/*' \
  -o -path './gradio/templates/frontend/static/*' -o -path './gradio/templates/node' -o -path './gradio/media_assets' \)
du -sh "$out"
echo "$(cat "$out"/*.whl | wc -c) bytes of wheels; the call carries these and the working tree within 64 MiB"
