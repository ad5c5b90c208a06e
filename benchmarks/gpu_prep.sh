#!/usr/bin/env bash
# Prepares, on this machine, what benchmarks/gpu_check.sh needs on the device machine, which has no
# network: everything goes into benchmarks/.cache/gpu_check/ (ignored by git), the one folder the
# device `run` call names in `carry` (not benchmarks/.cache itself: label_efficiency.py keeps its
# unpacked CIFAR-10 and runs there, hundreds of MB).
#
#   benchmarks/.cache/gpu_check/wheels/ lightly 1.6.0 and the dependencies the device's python3
#                                       lacks (hydra-core, omegaconf, antlr4-python3-runtime; it has
#                                       torch, torchvision, pytorch-lightning, tqdm, pyyaml, numpy...),
#                                       all pure-Python wheels, installed there with --no-deps
#   benchmarks/.cache/gpu_check/cifar10_jpg.tar.gz   the CIFAR-10 JPEG archive (19 MB), sha256 checked
#   benchmarks/.cache/gpu_check/source.json   the commit this was prepared from (the device copy has no .git)
#
#   bash benchmarks/gpu_prep.sh            # PYTHON=... to use another interpreter's pip
#
# Needs pip and the package index here; ../shared/datasets/cifar10_jpg beside the checkout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CACHE=benchmarks/.cache/gpu_check
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
ARCHIVE=../shared/datasets/cifar10_jpg/cifar10_jpg.tar.gz
ARCHIVE_SHA256=f894bb7213c9a373fd45814540b6bbc69674f3b1228079af0f7015ce342ea6bb
# The versions this checkout's .venv resolved for lightly 1.6.0 (pyproject's bench extra).
WHEELS=(lightly==1.6.0 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3)

mkdir -p "$CACHE/wheels"
rm -f "$CACHE"/wheels/*.whl
# pip wheel: downloads a wheel where the index has one and builds one from the sdist otherwise
# (antlr4-python3-runtime 4.9.3 ships only an sdist); all four are pure Python (py3-none-any).
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$CACHE/wheels" "${WHEELS[@]}"
for wheel in "$CACHE"/wheels/*.whl; do
  [[ $wheel == *-none-any.whl ]] || { echo "error: $wheel is not a pure-Python wheel" >&2; exit 1; }
done

if [[ ! -f $ARCHIVE ]]; then
  echo "error: $ARCHIVE not found (the shared datasets folder beside the checkout)" >&2
  exit 1
fi
cp -f "$ARCHIVE" "$CACHE/cifar10_jpg.tar.gz"
echo "$ARCHIVE_SHA256  $CACHE/cifar10_jpg.tar.gz" | sha256sum --check --quiet

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$([[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && echo true || echo false)
printf '{"commit": "%s", "dirty": %s, "prepared_utc": "%s"}\n' "$commit" "$dirty" \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$CACHE/source.json"

# What travels: tracked + untracked-not-ignored files, plus the carried folder; 64 MiB in all.
tree_bytes=$( (git ls-files -z --cached --others --exclude-standard 2>/dev/null || true) |
  xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
cache_bytes=$(du -sb "$CACHE" | cut -f1)
total=$((tree_bytes + cache_bytes))
ls -l "$CACHE" "$CACHE/wheels"
printf 'working tree %.1f MiB + %s %.1f MiB = %.1f MiB of the 64 MiB a device call carries\n' \
  "$(echo "$tree_bytes / 1048576" | bc -l)" "$CACHE" "$(echo "$cache_bytes / 1048576" | bc -l)" \
  "$(echo "$total / 1048576" | bc -l)"
if ((total > 60 * 1048576)); then
  echo "error: over 60 MiB; remove what need not travel" >&2
  exit 1
fi
