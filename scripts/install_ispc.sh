#!/usr/bin/env bash
# Install Intel ISPC (Debian trixie's `ispc` package, 1.26) into a project-local
# folder, without touching the system.
#
# Usage: bash scripts/install_ispc.sh [DEST]      (DEST defaults to <repo>/.ispc)
#
# How it works:
#   * ispc is not packaged for bookworm, so the trixie .debs of ispc and of its
#     whole run-time dependency closure (libllvm19, libc6, libstdc++6, ...) are
#     fetched with `apt-get download` through a PRIVATE apt configuration
#     (private sources file, lists, cache and an empty dpkg status under
#     DEST/.work). The system's apt sources, lists, cache and dpkg database
#     are never modified, and nothing is installed system-wide
#     (doing so would replace bookworm's libc6 and break the machine).
#   * The .debs are unpacked with `dpkg -x` into DEST/root.
#   * DEST/bin/ispc is a small sh wrapper that runs the real binary through the
#     private (trixie) dynamic loader with --library-path pointing at the
#     private libraries, so the host's bookworm glibc is never mixed in.
#
# Signatures: the trixie Release file is checked against
# /usr/share/keyrings/debian-archive-keyring.gpg (bookworm's keyring package
# 2023.3+deb12u2 and later already carries the trixie keys). If that keyring is
# too old, the script fetches bookworm's newest `debian-archive-keyring` .deb
# (verified with the system keyring) through the same private apt setup,
# unpacks it privately and uses its keyring. `trusted=yes` is never used.
#
# Idempotent: if DEST/bin/ispc --version already works, it prints the version
# and exits 0. ISPC_FORCE=1 forces a reinstall.
set -Eeuo pipefail

log() { printf 'install_ispc: %s\n' "$*"; }
die() { printf 'install_ispc: ERROR: %s\n' "$*" >&2; exit 1; }
trap 'printf "install_ispc: ERROR: command failed (line %s): %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

MIRROR="${ISPC_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE="trixie"
WANT_VERSION_PREFIX="1.26"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
DEST="${1:-$REPO_ROOT/.ispc}"
mkdir -p "$DEST" || die "cannot create $DEST"
DEST="$(cd "$DEST" && pwd)"
WRAPPER="$DEST/bin/ispc"

# ---------------------------------------------------------------- fast path --
if [ "${ISPC_FORCE:-0}" != "1" ] && [ -x "$WRAPPER" ]; then
    if ver="$("$WRAPPER" --version 2>/dev/null)" && [ -n "$ver" ]; then
        log "already installed: $WRAPPER"
        log "$ver"
        exit 0
    fi
    log "existing $WRAPPER does not work; reinstalling"
fi

# ------------------------------------------------------------ preconditions --
[ "$(uname -s)" = "Linux" ] || die "only Linux is supported"
case "$(uname -m)" in
    x86_64|amd64) ;;
    *) die "only x86_64 is supported (this is $(uname -m))" ;;
esac
for tool in apt-get apt-cache dpkg dpkg-deb; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (a Debian-based system is required)"
done

START_TS=$(date +%s)
log "installing ISPC from Debian $SUITE into $DEST"

WORK="$DEST/.work"
STAGE="$DEST/.root.new"
rm -rf "$WORK" "$STAGE"
mkdir -p "$WORK/etc" "$WORK/lists/partial" "$WORK/cache/archives/partial" \
         "$WORK/state" "$WORK/debs" "$WORK/keyring-root"
: > "$WORK/state/status"   # empty private dpkg status: nothing counts as installed

# Private apt options. Every path apt might write to is inside $WORK.
apt_opts() {  # $1 = sources.list file
    printf '%s\n' \
        -o "Dir::Etc::SourceList=$1" \
        -o "Dir::Etc::SourceParts=/dev/null" \
        -o "Dir::Etc::Preferences=/dev/null" \
        -o "Dir::Etc::PreferencesParts=/dev/null" \
        -o "Dir::State=$WORK/state" \
        -o "Dir::State::Lists=$WORK/lists" \
        -o "Dir::State::Status=$WORK/state/status" \
        -o "Dir::Cache=$WORK/cache" \
        -o "Dir::Cache::Archives=$WORK/cache/archives" \
        -o "Dir::Cache::pkgcache=" \
        -o "Dir::Cache::srcpkgcache=" \
        -o "APT::Architecture=amd64" \
        -o "APT::Architectures=amd64" \
        -o "Acquire::Languages=none" \
        -o "APT::Sandbox::User=root" \
        -o "APT::Get::AllowUnauthenticated=false" \
        -o "Acquire::AllowInsecureRepositories=false"
}

private_apt_get() {  # $1 = sources.list file, rest = apt-get args
    local src="$1"; shift
    local -a opts
    mapfile -t opts < <(apt_opts "$src")
    apt-get -q "${opts[@]}" "$@"
}
private_apt_cache() {
    local src="$1"; shift
    local -a opts
    mapfile -t opts < <(apt_opts "$src")
    apt-cache "${opts[@]}" "$@"
}

write_sources() {  # $1 = file, $2 = keyring, $3 = suite
    printf 'deb [arch=amd64 signed-by=%s] %s %s main\n' "$2" "$MIRROR" "$3" > "$1"
}

# ------------------------------------------------------- private apt update --
SYS_KEYRING="${ISPC_SYSTEM_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}"
[ -r "$SYS_KEYRING" ] || die "$SYS_KEYRING not found (package debian-archive-keyring)"
TRIXIE_LIST="$WORK/etc/trixie.list"
write_sources "$TRIXIE_LIST" "$SYS_KEYRING" "$SUITE"

log "updating private apt lists for $SUITE (system apt state is not touched)"
if ! private_apt_get "$TRIXIE_LIST" update > "$WORK/update.log" 2>&1; then
    if grep -qE 'NO_PUBKEY|not signed|EXPKEYSIG|public key is not available' "$WORK/update.log"; then
        log "system keyring lacks the $SUITE keys; fetching bookworm's newest debian-archive-keyring privately"
        BOOK_LIST="$WORK/etc/bookworm.list"
        write_sources "$BOOK_LIST" "$SYS_KEYRING" bookworm
        private_apt_get "$BOOK_LIST" update > "$WORK/update-bookworm.log" 2>&1 \
            || { cat "$WORK/update-bookworm.log" >&2; die "private apt-get update for bookworm failed"; }
        (cd "$WORK/debs" && private_apt_get "$BOOK_LIST" download debian-archive-keyring) \
            > "$WORK/download-keyring.log" 2>&1 \
            || { cat "$WORK/download-keyring.log" >&2; die "could not download debian-archive-keyring"; }
        dpkg-deb -x "$WORK"/debs/debian-archive-keyring_*.deb "$WORK/keyring-root"
        rm -f "$WORK"/debs/debian-archive-keyring_*.deb
        NEW_KEYRING="$WORK/keyring-root/usr/share/keyrings/debian-archive-keyring.gpg"
        [ -r "$NEW_KEYRING" ] || die "keyring not found in the debian-archive-keyring package"
        # Start over with clean lists so bookworm's indexes do not mix in.
        rm -rf "$WORK/lists" && mkdir -p "$WORK/lists/partial"
        write_sources "$TRIXIE_LIST" "$NEW_KEYRING" "$SUITE"
        private_apt_get "$TRIXIE_LIST" update > "$WORK/update.log" 2>&1 \
            || { cat "$WORK/update.log" >&2; die "private apt-get update for $SUITE failed even with the newer keyring (the mirror's trixie keys are not trusted)"; }
    else
        cat "$WORK/update.log" >&2
        die "private apt-get update for $SUITE failed (is $MIRROR reachable?)"
    fi
fi
# apt-get update exits 0 on some fetch failures; make sure the index is there.
ls "$WORK/lists/"*"_dists_${SUITE}_main_binary-amd64_Packages"* >/dev/null 2>&1 \
    || { cat "$WORK/update.log" >&2; die "no $SUITE Packages index was downloaded (is $MIRROR reachable?)"; }

CANDIDATE="$(private_apt_cache "$TRIXIE_LIST" policy ispc | awk '/Candidate:/ {print $2}')"
[ -n "$CANDIDATE" ] && [ "$CANDIDATE" != "(none)" ] || die "package ispc not found in $SUITE"
log "ispc candidate version: $CANDIDATE"
case "$CANDIDATE" in
    "$WANT_VERSION_PREFIX"*) ;;
    *) log "WARNING: expected ispc $WANT_VERSION_PREFIX.x, $SUITE now has $CANDIDATE; continuing" ;;
esac

# ----------------------------------------------- dependency closure + fetch --
# Hard (Depends/Pre-Depends) run-time closure of ispc; virtual packages
# (shown as <name>) are dropped, their providers are listed separately.
mapfile -t PKGS < <(
    private_apt_cache "$TRIXIE_LIST" depends --recurse --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances ispc \
    | grep -v '^ ' | grep -v '^<' | sort -u
)
[ "${#PKGS[@]}" -gt 1 ] || die "could not resolve the dependencies of ispc"
for must in ispc libllvm19 libc6 libstdc++6 libgcc-s1; do
    printf '%s\n' "${PKGS[@]}" | grep -qx "$must" || PKGS+=("$must")
done
log "fetching ${#PKGS[@]} packages: ${PKGS[*]}"
(cd "$WORK/debs" && private_apt_get "$TRIXIE_LIST" download "${PKGS[@]}") \
    > "$WORK/download.log" 2>&1 \
    || { cat "$WORK/download.log" >&2; die "apt-get download failed"; }

# ----------------------------------------------------------------- unpack --
log "unpacking into $DEST/root"
mkdir -p "$STAGE"
for deb in "$WORK"/debs/*.deb; do
    dpkg-deb -x "$deb" "$STAGE" || die "dpkg-deb -x failed for $(basename "$deb")"
done
# Keep only what running ispc needs.
rm -rf "$STAGE/usr/share/doc" "$STAGE/usr/share/man" "$STAGE/usr/share/lintian" \
       "$STAGE/usr/share/gdb" "$STAGE/usr/share/locale" "$STAGE/usr/share/info"

LIBDIR=usr/lib/x86_64-linux-gnu
LOADER=""
for cand in "$LIBDIR/ld-linux-x86-64.so.2" lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \
            usr/lib64/ld-linux-x86-64.so.2 lib64/ld-linux-x86-64.so.2; do
    if [ -e "$STAGE/$cand" ]; then LOADER="$cand"; break; fi
done
[ -n "$LOADER" ] || die "private dynamic loader not found after unpacking libc6"
[ -x "$STAGE/usr/bin/ispc" ] || die "usr/bin/ispc not found after unpacking"

rm -rf "$DEST/root"
mv "$STAGE" "$DEST/root"

# ---------------------------------------------------------------- wrapper --
mkdir -p "$DEST/bin"
cat > "$WRAPPER.tmp" <<EOF
#!/bin/sh
# Generated by scripts/install_ispc.sh: runs Debian $SUITE's ispc $CANDIDATE
# through its own private dynamic loader and libraries (see DEST/root).
here=\$(dirname "\$(readlink -f "\$0")")
root=\$(dirname "\$here")/root
exec "\$root/$LOADER" --inhibit-cache \\
    --library-path "\$root/$LIBDIR:\$root/lib/x86_64-linux-gnu" \\
    "\$root/usr/bin/ispc" "\$@"
EOF
chmod 755 "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"

# Keep the install out of git without editing the repo's .gitignore.
printf '*\n' > "$DEST/.gitignore"

# ------------------------------------------------------------------ check --
log "checking the installed compiler"
VER="$("$WRAPPER" --version 2>&1)" || { printf '%s\n' "$VER" >&2; die "$WRAPPER --version failed"; }
CHECK="$WORK/check"
mkdir -p "$CHECK"
cat > "$CHECK/t.ispc" <<'EOF'
#define SCALE_ONE 1
export void scale(uniform float a[], uniform int n, uniform float s) {
    foreach (i = 0 ... n) { a[i] = a[i] * s * SCALE_ONE; }
}
EOF
(cd "$CHECK" && "$WRAPPER" --target=avx2-i32x8,avx512skx-x16 --pic -O2 \
    -o t.o -h t_ispc.h t.ispc) > "$CHECK/compile.log" 2>&1 \
    || { cat "$CHECK/compile.log" >&2; die "test compile with ispc failed"; }
for f in t.o t_avx2.o t_avx512skx.o t_ispc.h; do
    [ -s "$CHECK/$f" ] || die "test compile did not produce $f"
done

rm -rf "$WORK"
log "$VER"
log "done in $(( $(date +%s) - START_TS ))s: use $WRAPPER"
