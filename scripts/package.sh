#!/usr/bin/env bash
# Builds the Debian packages `coffer` and `coffer-milter` (docs/install.md):
# a release build of the three binaries, then `cargo deb` for each crate.
#
#   scripts/package.sh [--deb-version VERSION] [--fast]
#
# --fast: lighter compression (quicker, larger files; the package test's upgrade pair).
# Needs cargo-deb (.ci/run installs the pinned version). Prints the paths of the two
# .deb files on stdout, one a line; progress goes to stderr. The files land in
# $CARGO_TARGET_DIR/debian/ (default target/debian/).
set -euo pipefail
cd "$(dirname "$0")/.."

deb_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --deb-version) deb_args+=(--deb-version "$2"); shift 2 ;;
        --deb-version=*) deb_args+=(--deb-version "${1#*=}"); shift ;;
        --fast) deb_args+=(--fast); shift ;;
        *) echo "usage: scripts/package.sh [--deb-version VERSION] [--fast]" >&2; exit 2 ;;
    esac
done

if ! cargo deb --version >/dev/null 2>&1; then
    echo "cargo-deb is not installed: cargo install cargo-deb --version 3.8.0 --locked" >&2
    exit 2
fi

# Man pages and docs are packaged as they are; a roff error would only show at `man`.
for page in packaging/man/*.[158]; do
    if out=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null) && [ -n "$out" ]; then
        echo "$page: $out" >&2
        exit 1
    fi
done

printf '==> cargo build --release --locked -p coffer-archiver -p coffer-milter\n' >&2
cargo build --release --locked -p coffer-archiver -p coffer-milter >&2

for crate in coffer-archiver coffer-milter; do
    printf '==> cargo deb -p %s --no-build --strip %s\n' "$crate" "${deb_args[*]:-}" >&2
    # cargo-deb prints the path of the package it wrote as its last line.
    cargo deb -p "$crate" --no-build --locked --strip "${deb_args[@]}" | tail -n 1
done
