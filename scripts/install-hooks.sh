#!/usr/bin/env bash
# Installs a git pre-commit hook in this checkout that runs the fast gates before
# every commit: `cargo fmt --check`, clippy on the whole workspace (warnings are
# errors, as in CI), and the unit tests of the libraries (no broker, no end-to-end
# tests: those are `scripts/test.sh`). Skip it once with `git commit --no-verify`.
#
#   scripts/install-hooks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
hook="$(git rev-parse --git-path hooks)/pre-commit"
mkdir -p "$(dirname "$hook")"
cat > "$hook" <<'HOOK'
#!/usr/bin/env bash
# Installed by scripts/install-hooks.sh.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
cargo fmt --all --check || { echo "pre-commit: run cargo fmt --all" >&2; exit 1; }
cargo clippy --workspace --all-targets --locked -q -- -D warnings
cargo test --workspace --lib --locked -q
HOOK
chmod +x "$hook"
echo "installed $hook"
