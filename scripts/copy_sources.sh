# Sourced by the scripts in this folder: copy_sources REPO DEST copies the
# sources of REPO into DEST: what git tracks plus new files it does not
# ignore, less virtual environments and tool caches; no build products.
copy_sources() {
    mkdir -p "$2"
    (cd "$1" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do
              case "$f" in .venv/*|venv/*|.tox/*|.benchmarks/*) continue ;; esac
              [ -f "$f" ] && printf '%s\0' "$f"
          done \
        | xargs -0 cp --parents -t "$2")
}
