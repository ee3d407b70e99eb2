# shellcheck shell=bash
# Sourced by the scripts that build. The build directory lives outside the clone so that a fresh
# clone starts warm, which means several checkouts can share it. Cargo decides what to rebuild
# from file times: a fresh clone's files are newer than every artifact, so it rebuilds what it
# must, but an older checkout used after another one built finds the other's binaries "fresh"
# and runs them — another commit's code, and test binaries that read files from the other
# checkout's path (CARGO_MANIFEST_DIR is compiled in). So the first build from a checkout other
# than the last one drops this workspace's own artifacts; dependencies stay warm.

# claim_target_dir REPO_ROOT TARGET_DIR
claim_target_dir() {
  local root dir=$2 marker
  root=$(cd "$1" && pwd -P)
  marker="$dir/.sse-fanout-checkout"
  mkdir -p "$dir"
  local last=unknown
  [[ -f $marker ]] && last=$(<"$marker")
  if [[ $last != "$root" && ( -d $dir/release || -d $dir/debug ) ]]; then
    echo "==> $dir was last built from $last: rebuilding this workspace's crates for $root"
    for profile in release dev; do
      (cd "$root" && CARGO_TARGET_DIR=$dir cargo clean --quiet --profile "$profile" \
        -p sse-fanout -p sse-loadtest -p sse-wire)
    done
  fi
  printf '%s\n' "$root" >"$marker"
}
