#!/usr/bin/env bash
# Proof that `asv continuous` catches a slowed CP block, and stays quiet for a harmless commit.
#
#   bash benchmarks/demo_regression.sh [WORKDIR]            # isolated virtualenv (+~1 min for torch)
#   CPBENCH_DEMO_FAST=1 bash benchmarks/demo_regression.sh  # reuse this Python's packages (seconds)
#
# It copies the working tree (tracked + untracked, not ignored files) into WORKDIR/repo, makes three
# commits there, and runs asv on them:
#   base  → the code as it is
#   noop  → a comment added to cpbench/nn/layers.py            `asv continuous -f 1.5 base noop` must exit 0
#   slow  → CPBlock.forward runs its layers 3× (a regression) `asv continuous -f 1.5 noop slow` must exit 1
# Only TrackCPBlock (the CP block's time ratio to its conv, seeded factors, torch-cpu, 1 thread) is run.
# asv builds and installs each commit into its own virtualenv, so the commits really differ.
# With CPBENCH_DEMO_FAST=1 the virtualenv sees this Python's site-packages (torch etc. are not
# reinstalled; the commit's cpbench wheel is still installed into the virtualenv and shadows them).
# Exit status: 0 when both verdicts are as expected, 1 otherwise. WORKDIR is kept for inspection.
set -uo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-$(mktemp -d -t cpbench-asv-demo.XXXXXX)}"
REPO="$WORK/repo"
FACTOR="${CPBENCH_DEMO_FACTOR:-1.5}"
mkdir -p "$WORK"
rm -rf "$REPO"
mkdir -p "$REPO"

# the working tree (what a developer has now, committed or not), without caches or results
(cd "$SRC" && git ls-files -z --cached --others --exclude-standard \
  | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | (cd "$REPO" && tar xf -)

export PYENV_ROOT="${PYENV_ROOT:-$HOME/.pyenv}"   # pyenv's shims still work after HOME moves
export HOME="$WORK/home"          # asv's machine file (~/.asv-machine.json) stays in WORKDIR
mkdir -p "$HOME"
export GIT_AUTHOR_NAME=demo GIT_AUTHOR_EMAIL=demo@example.invalid
export GIT_COMMITTER_NAME=demo GIT_COMMITTER_EMAIL=demo@example.invalid
if [ -n "${CPBENCH_DEMO_FAST:-}" ]; then
  export VIRTUALENV_SYSTEM_SITE_PACKAGES=true
fi

cd "$REPO"
git init -q -b main .
git add -A && git commit -qm "base"
printf '\n# harmless change for the asv regression demo\n' >> cpbench/nn/layers.py
git commit -qam "noop: a comment"
cat >> cpbench/nn/layers.py <<'EOF'


def _slow_forward(self, x):  # deliberate regression for the asv demo: the block runs 3 times
    for _ in range(2):
        nn.Sequential.forward(self, x)
    return nn.Sequential.forward(self, x)


CPBlock.forward = _slow_forward
EOF
git commit -qam "slow: CPBlock.forward runs 3x"
git log --oneline

asv machine --yes --machine asv-demo > /dev/null
ASV=(asv continuous --factor "$FACTOR" --bench TrackCPBlock --machine asv-demo --show-stderr)

echo "== asv continuous base → noop (expect exit 0)"
start=$SECONDS
"${ASV[@]}" HEAD~2 HEAD~1 2>&1 | tee "$WORK/noop.log"
noop_rc=${PIPESTATUS[0]}
echo "exit $noop_rc ($((SECONDS - start)) s)"

echo "== asv continuous noop → slow (expect exit 1)"
start=$SECONDS
"${ASV[@]}" HEAD~1 HEAD 2>&1 | tee "$WORK/slow.log"
slow_rc=${PIPESTATUS[0]}
echo "exit $slow_rc ($((SECONDS - start)) s)"

echo "== verdict: noop exit $noop_rc (want 0), slow exit $slow_rc (want non-zero); logs in $WORK"
if [ "$noop_rc" -eq 0 ] && [ "$slow_rc" -ne 0 ] && grep -q "PERFORMANCE DECREASED" "$WORK/slow.log"; then
  echo "OK: asv continuous caught the slowed CP block and passed the harmless commit"
  exit 0
fi
echo "UNEXPECTED: see the logs above"
exit 1
