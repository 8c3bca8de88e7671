#!/usr/bin/env bash
# Runs CI on a fresh, minimal Debian 12: bootstraps bookworm with `debootstrap --variant=minbase`
# into a temporary directory, clones this checkout's committed HEAD into it (/root/moefold), and
# runs `bash .ci/run` (CI=true) there in a chroot. No CUDA toolkit in the chroot, on purpose.
# Needs root. Uses the Debian mirror of this machine's apt sources and writes those sources into
# the chroot. Prints the exit status, the ctest summary lines and the elapsed time. KEEP=1 keeps
# the temporary directory (its path is printed); FRESH_CHECK_TMP picks where it goes (/var/tmp).
# Not part of CI: `sudo scripts/fresh-check.sh` (30-60 minutes on 2 cores).
set -euo pipefail
{ # read whole before it runs: editing this file during a run does not change the run
start=$(date +%s)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
suite=bookworm

if [ "$(id -u)" -ne 0 ]; then
  echo "fresh-check: needs root (debootstrap, mount, chroot)" >&2
  exit 1
fi
sha=$(git -C "$repo" rev-parse HEAD)
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
  echo "fresh-check: note: uncommitted changes are not checked, only HEAD $sha"
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap
fi

# The machine's apt source files: sources.list, sources.list.d/*.list and *.sources.
source_files=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && source_files+=("$f")
done

# The mirror for debootstrap: the first URI that serves suite $suite itself (one-line "deb URI
# SUITE ..." or deb822 "URIs:"/"Suites:" stanzas), else deb.debian.org.
find_mirror() {
  local f
  for f in "${source_files[@]}"; do
    case "$f" in
      *.sources)
        awk -v suite="$suite" '
          function flush() { if (deb && uri != "" && has) { print uri; found = 1; exit } uri = ""; has = 0; deb = 0 }
          /^[ \t]*$/ { flush(); next }
          /^[ \t]*#/ { next }
          tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
          tolower($1) == "uris:" { uri = $2 }
          tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) has = 1 }
          tolower($1) == "enabled:" && tolower($2) == "no" { deb = 0 }
          END { if (!found) flush() }' "$f" ;;
      *)
        awk -v suite="$suite" '
          $1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                        if ($(i + 1) == suite) { print $i; exit } }' "$f" ;;
    esac
  done | head -n 1
}
mirror=$(find_mirror)
mirror=${mirror:-http://deb.debian.org/debian}

# A machine whose sources are https has ca-certificates, or its apt would not work.
include=()
if [ ${#source_files[@]} -gt 0 ] &&
   grep -hvE '^[[:space:]]*#' "${source_files[@]}" | grep -qE '(^|[[:space:]])https://'; then
  include=(--include=ca-certificates)
fi

root=$(mktemp -d "${FRESH_CHECK_TMP:-/var/tmp}/moefold-fresh.XXXXXX")
mounts=()
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  local status=$? m i
  for (( i = ${#mounts[@]} - 1; i >= 0; i-- )); do
    m=${mounts[i]}
    umount -R "$m" 2>/dev/null || umount -R -l "$m" 2>/dev/null || true
  done
  if grep -qF " $root/" /proc/self/mountinfo; then
    echo "fresh-check: something is still mounted under $root; not removing it" >&2
  elif [ "${KEEP:-0}" = 1 ]; then
    echo "fresh-check: kept $root"
  else
    rm -rf --one-file-system "$root"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "fresh-check: debootstrap --variant=minbase ${include[*]:+${include[*]} }$suite $root $mirror"
debootstrap --variant=minbase "${include[@]}" "$suite" "$root" "$mirror" > "$root.debootstrap.log" 2>&1 || {
  tail -n 30 "$root.debootstrap.log" >&2
  rm -f "$root.debootstrap.log"
  echo "fresh-check: debootstrap failed" >&2
  exit 1
}
rm -f "$root.debootstrap.log"

# The same apt sources as this machine (and the keyrings they name that the chroot lacks).
rm -f "$root/etc/apt/sources.list"
for f in "${source_files[@]}"; do
  cp "$f" "$root$f"
done
if [ ${#source_files[@]} -gt 0 ]; then
  sed -nE -e 's/.*signed-by=([^] ,]+).*/\1/p' -e 's/^[[:space:]]*Signed-By:[[:space:]]*(\/[^[:space:]]+).*/\1/p' \
      "${source_files[@]}" | sort -u | while read -r key; do
    if [ -f "$key" ] && [ ! -e "$root$key" ]; then
      mkdir -p "$root$(dirname "$key")"
      cp "$key" "$root$key"
    fi
  done
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"

# The repository at HEAD, as a clone.
git clone --quiet --no-checkout "$repo" "$root/root/moefold"
git -C "$root/root/moefold" -c advice.detachedHead=false checkout --quiet --detach "$sha"

mount -t proc proc "$root/proc"; mounts+=("$root/proc")
for d in sys dev; do
  mount --rbind "/$d" "$root/$d"; mounts+=("$root/$d")
  mount --make-rslave "$root/$d"
done

echo "fresh-check: running .ci/run on $(git -C "$repo" log -1 --format='%h %s' "$sha")"
pass=()
for v in MOEFOLD_JOBS MOEFOLD_SKIP_TSAN; do
  [ -n "${!v:-}" ] && pass+=("$v=${!v}")
done
set +e
chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" CI=true \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${pass[@]}" \
    /bin/bash -c 'cd /root/moefold && bash .ci/run' 2>&1 | tee "$root/root/ci.log"
status=${PIPESTATUS[0]}
set -e

echo "== fresh-check (Debian 12 minbase, $sha)"
grep -E 'tests passed, [0-9]+ tests failed out of' "$root/root/ci.log" || echo "no ctest summary"
echo "fresh-check: .ci/run exit status $status; elapsed $(( $(date +%s) - start )) s"
exit "$status"
}
